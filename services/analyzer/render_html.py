"""A self-contained ``report.html`` from the report's blocks: inline CSS, figures as data URIs."""

from __future__ import annotations

import base64
import html
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

__all__ = ["render_html"]

_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;max-width:1280px;margin:2em auto;
padding:0 1.5em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em;border-bottom:2px solid #ddd;padding-bottom:.2em}
h2{font-size:1.35em;margin-top:2em;border-bottom:1px solid #e5e5e5;padding-bottom:.15em}
h3{font-size:1.1em;margin-top:1.4em}
table{border-collapse:collapse;margin:.8em 0;font-size:.82em;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;white-space:nowrap}
th{background:#f5f5f7}
tr:nth-child(even) td{background:#fafafa}
caption{caption-side:bottom;text-align:left;font-size:.9em;color:#555;padding-top:.3em;white-space:normal}
figure{margin:1.2em 0}
figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.88em;color:#555}
.cls{font-weight:600;padding:0 .35em;border-radius:3px}
.robust{background:#d8f0dc;color:#17612a}
.degraded{background:#fbefd0;color:#7a5300}
.broken{background:#f7d7da;color:#8a1c27}
.na{background:#eee;color:#555}
details{margin:.6em 0}
nav a{margin-right:1em}
code{background:#f3f3f3;padding:0 .2em}
"""


def _html_text(text: str) -> str:
    # Inline `code` spans, everything escaped.
    parts = text.split("`")
    return "".join(
        f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts)
    )


def _html_cell(cell: Cell) -> str:
    if isinstance(cell, Badge):
        css = cell.label.rstrip("*").replace("n/a", "na")
        return f'<span class="cls {css}">{html.escape(cell.label)}</span>'
    return _html_text(cell)


def _html(blocks: Sequence[Block], out: list[str]) -> None:
    for b in blocks:
        if isinstance(b, Heading):
            anchor = f' id="{html.escape(b.anchor)}"' if b.anchor else ""
            out.append(f"<h{b.level}{anchor}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            out.append(f"<p>{_html_text(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_html_text(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            if not b.rows:
                out.append("<p><em>(no rows)</em></p>")
                continue
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
            body = "".join(
                "<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>"
                for row in b.rows
            )
            caption = f"<caption>{_html_text(b.caption)}</caption>" if b.caption else ""
            out.append(
                f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            )
        elif isinstance(b, FigureBlock):
            f = b.figure
            data = base64.b64encode(f.png).decode("ascii")
            out.append(
                f'<figure id="fig-{html.escape(f.name)}"><img alt="{html.escape(f.title)}" '
                f'src="data:image/png;base64,{data}"><figcaption><strong>'
                f"{html.escape(f.title)}.</strong> {html.escape(f.caption)}</figcaption></figure>"
            )
        elif isinstance(b, Details):
            out.append(f"<details><summary>{html.escape(b.summary)}</summary>")
            _html(b.blocks, out)
            out.append("</details>")


def render_html(blocks: Sequence[Block], title: str) -> str:
    """One self-contained HTML page: inline CSS, figures as data URIs, no scripts or links out."""
    body: list[str] = []
    nav = [
        f'<a href="#{b.anchor}">{html.escape(b.text)}</a>'
        for b in blocks
        if isinstance(b, Heading) and b.level == 2 and b.anchor
    ]
    _html(blocks[:2], body)
    body.append("<nav>" + "".join(nav) + "</nav>")
    _html(blocks[2:], body)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
