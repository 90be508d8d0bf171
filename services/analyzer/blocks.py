"""The report's block model (headings, paragraphs, tables, figures) and its cell formatting.

Sections build lists of blocks; :mod:`services.analyzer.render_markdown` and
:mod:`services.analyzer.render_html` render the same blocks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from services.analyzer.figures import FigureImage

__all__ = [
    "Badge",
    "Block",
    "Bullets",
    "Cell",
    "Details",
    "FigureBlock",
    "Heading",
    "Paragraph",
    "Table",
    "badge",
    "figure_blocks",
    "fmt_ci",
    "fmt_est",
    "fmt_num",
    "fmt_p",
    "fmt_test",
]


@dataclass(frozen=True)
class Badge:
    """A class label cell (robust / degraded / broken / n/a)."""

    label: str


Cell = str | Badge


@dataclass(frozen=True)
class Heading:
    level: int
    text: str
    anchor: str = ""


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    caption: str = ""


@dataclass(frozen=True)
class FigureBlock:
    figure: FigureImage


@dataclass
class Details:
    """Collapsible in HTML, inline in Markdown."""

    summary: str
    blocks: list[Block] = field(default_factory=list)


Block = Heading | Paragraph | Bullets | Table | FigureBlock | Details


# ---------------------------------------------------------------------------------------------
# Number formatting.


def fmt_num(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    return f"{float(x):.{nd}f}"


def fmt_ci(value: Any, low: Any, high: Any, nd: int = 3, scale: float = 1.0) -> str:
    def s(x: Any) -> Any:
        return None if x is None else float(x) * scale

    text = fmt_num(s(value), nd)
    if low is not None and high is not None and value is not None:
        text += f" [{fmt_num(s(low), nd)}, {fmt_num(s(high), nd)}]"
    return text


def fmt_est(d: Mapping[str, Any] | None, nd: int = 3, scale: float = 1.0) -> str:
    if not d:
        return "—"
    return fmt_ci(d.get("value"), d.get("low"), d.get("high"), nd, scale)


def fmt_p(x: Any) -> str:
    if x is None:
        return "—"
    return f"{x:.2e}" if x < 1e-3 else f"{x:.3f}"


def fmt_test(d: Mapping[str, Any] | None) -> str:
    if not d:
        return "—"
    if d.get("statistic") is None:
        return f"— ({d.get('reason', 'n/a')})"
    return f"{fmt_num(d['statistic'])} (p = {fmt_p(d.get('p_value'))}, n = {d.get('n')})"


def badge(c: Mapping[str, Any] | BaseModel | None) -> Cell:
    if not c:
        return "—"
    if isinstance(c, BaseModel):
        c = c.model_dump(by_alias=True)
    label = str(c.get("class", "n/a"))
    if c.get("settled") is False:
        return Badge(label + "*")
    return Badge(label)


def figure_blocks(figures: Sequence[FigureImage], prefix: str) -> list[Block]:
    return [FigureBlock(f) for f in figures if f.name.startswith(prefix)]
