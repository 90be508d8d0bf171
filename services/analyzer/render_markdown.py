"""``report.md`` from the report's blocks; figures referenced as PNG files beside it."""

from __future__ import annotations

from collections.abc import Sequence

from services.analyzer.blocks import (
    Badge,
    Block,
    Bullets,
    Cell,
    Details,
    FigureBlock,
    Heading,
    Paragraph,
    Table,
)

__all__ = ["render_markdown"]


def _md_cell(cell: Cell) -> str:
    text = f"**{cell.label}**" if isinstance(cell, Badge) else cell
    return text.replace("|", "\\|").replace("\n", " ")


def _md(blocks: Sequence[Block], figure_dir: str, out: list[str]) -> None:
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Paragraph):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            if not b.rows:
                out.append("_(no rows)_")
                continue
            lines = [
                "| " + " | ".join(_md_cell(h) for h in b.headers) + " |",
                "|" + "|".join("---" for _ in b.headers) + "|",
            ]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            if b.caption:
                lines.append("")
                lines.append(f"_{b.caption}_")
            out.append("\n".join(lines))
        elif isinstance(b, FigureBlock):
            f = b.figure
            out.append(f"![{f.title}]({figure_dir}/{f.name}.png)\n\n_{f.caption}_")
        elif isinstance(b, Details):
            out.append(f"**{b.summary}**")
            _md(b.blocks, figure_dir, out)


def render_markdown(blocks: Sequence[Block], figure_dir: str = "figures") -> str:
    """Markdown; figures referenced as ``<figure_dir>/<name>.png``."""
    out: list[str] = []
    _md(blocks, figure_dir, out)
    return "\n\n".join(out) + "\n"
