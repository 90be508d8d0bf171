"""The report's figures as PNG bytes, drawn with matplotlib's Agg canvas from the analysis JSON.

Figures are built from the same documents that are written to ``analysis/*.json``, so what a
figure shows is exactly what the JSON holds. No pyplot (no global state, no display): each
figure is a :class:`matplotlib.figure.Figure` rendered by ``FigureCanvasAgg``; PNG metadata is
stripped so the bytes depend only on the data.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.common.precisions import by_display_order, display_rank

__all__ = [
    "FigureImage",
    "benchmark_bars",
    "build_figures",
    "cosine_heatmap",
    "layer_curves",
    "model_spread",
    "steering_bars",
]

_DPI = 110
_COLORS = (
    "#1b6ca8",
    "#d1495b",
    "#2e933c",
    "#edae49",
    "#6c4f9c",
    "#00798c",
    "#8d6a5f",
    "#555555",
)


@dataclass(frozen=True)
class FigureImage:
    """One figure: file name (``<name>.png``), title, caption and the PNG bytes."""

    name: str
    title: str
    caption: str
    png: bytes


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)).strip("_")


def _new(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def _precision_order(precisions: Sequence[str]) -> list[str]:
    """Display order of the precision table (services.common.precisions)."""
    return by_display_order(precisions)


def _color(precision: str) -> str:
    """One colour per precision across every figure (by its display rank)."""
    return _COLORS[display_rank(precision) % len(_COLORS)]


def _bar_group(
    ax: Any,
    x: Any,
    k: int,
    n: int,
    heights: Sequence[float],
    errors: tuple[Sequence[float], Sequence[float]],
    precision: str,
) -> None:
    """Bar ``k`` of ``n`` in every group at ``x``, with asymmetric error bars."""
    width = 0.8 / n
    ax.bar(
        x + (k - (n - 1) / 2) * width,
        heights,
        width,
        yerr=list(errors),
        capsize=2,
        label=precision,
        color=_color(precision),
    )


def steering_bars(steering: Mapping[str, Any], model: str) -> FigureImage | None:
    """Grouped bars: best steering score per trait (groups) and precision (bars), self-steered.

    One method per trait (the first found), add mode, direction ``+`` (ablation and steering
    away have their own rows in the tables). Error bars: the best run's bootstrap interval.
    """
    cells: dict[str, dict[str, Mapping[str, Any]]] = defaultdict(dict)
    method_of: dict[str, str] = {}
    for e in steering.get("entries", []):
        if e["model"] != model or e["steering"] != "self" or e["mode"] != "add":
            continue
        if e["direction"] != "+" or e["best"]["score"] is None:
            continue
        method_of.setdefault(e["trait"], e["method"])
        if e["method"] == method_of[e["trait"]]:
            cells[e["trait"]][e["precision"]] = e["best"]
    if not cells:
        return None
    traits = sorted(cells)
    precisions = _precision_order([p for c in cells.values() for p in c])
    fig = _new(max(5.0, 1.3 * len(traits) * max(1, len(precisions)) / 3 + 3), 3.8)
    ax = fig.add_subplot()
    x = np.arange(len(traits))
    for k, precision in enumerate(precisions):
        heights, lows, highs = [], [], []
        for t in traits:
            best = cells[t].get(precision)
            score = best["score"] if best else None
            heights.append(np.nan if score is None else score)
            low = best.get("low") if best else None
            high = best.get("high") if best else None
            lows.append(0.0 if low is None or score is None else score - low)
            highs.append(0.0 if high is None or score is None else high - score)
        _bar_group(ax, x, k, len(precisions), heights, (lows, highs), precision)
    ax.set_xticks(x, [f"{t}\n({method_of[t]})" for t in traits], fontsize=8)
    ax.set_ylabel("best trait score (0–100)")
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    ax.legend(fontsize=8, ncols=len(precisions), loc="upper center")
    ax.set_title(f"{model}: best steering score (self-steered, add +)", fontsize=10)
    return FigureImage(
        _slug("steering-bars", model),
        f"Best steering score per trait and precision — {model}",
        "Bars: mean trait score of the best coherent setting; error bars: its 95% bootstrap "
        "interval over questions. Source: steering_comparison.json.",
        _png(fig),
    )


def cosine_heatmap(vectors: Mapping[str, Any], model: str, method: str) -> FigureImage | None:
    """Traits x precisions: mean cosine vs the reference over the layer window (primary mode)."""
    cells: dict[tuple[str, str], float | None] = {}
    for e in vectors.get("entries", []):
        if e["model"] == model and e["method"] == method and e["primary"]:
            cells[(e["trait"], e["precision"])] = e["window"]["mean_cosine"]
    if not cells:
        return None
    traits = sorted({t for t, _ in cells})
    precisions = _precision_order([p for _, p in cells])
    grid = np.full((len(traits), len(precisions)), np.nan)
    for (t, p), v in cells.items():
        if v is not None:
            grid[traits.index(t), precisions.index(p)] = v
    fig = _new(1.4 + 1.1 * len(precisions), 1.2 + 0.55 * len(traits))
    ax = fig.add_subplot()
    image = ax.imshow(grid, vmin=0.5, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(precisions)), precisions)
    ax.set_yticks(range(len(traits)), traits, fontsize=8)
    for i in range(len(traits)):
        for j in range(len(precisions)):
            value = grid[i, j]
            text = "n/a" if np.isnan(value) else f"{value:.3f}"
            dark = not np.isnan(value) and (value > 0.9 or value < 0.6)
            ax.text(
                j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black"
            )
    fig.colorbar(image, ax=ax, label="mean cosine")
    lo, hi = vectors.get("layer_range", [0.2, 0.8])
    ax.set_title(f"{model} · {method}: cosine vs reference", fontsize=10)
    return FigureImage(
        _slug("cosine-heatmap", model, method),
        f"Vector cosine vs the reference — {model}, {method}",
        f"Mean per-layer cosine over depths {lo:g}–{hi:g} between each precision's vectors "
        "(primary vector mode) and the reference's. Robust > 0.95, broken < 0.80. "
        "Source: vector_comparison.json.",
        _png(fig),
    )


def layer_curves(vectors: Mapping[str, Any], model: str, trait: str) -> FigureImage | None:
    """Per-layer cosine vs depth, one panel per method, one line per precision (primary mode)."""
    entries = [
        e
        for e in vectors.get("entries", [])
        if e["model"] == model and e["trait"] == trait and e["primary"]
    ]
    if not entries:
        return None
    methods = list(dict.fromkeys(e["method"] for e in entries))
    precisions = _precision_order([e["precision"] for e in entries])
    fig = _new(3.6 * len(methods) + 0.8, 3.2)
    axes = fig.subplots(1, len(methods), squeeze=False, sharey=True)[0]
    lo, hi = vectors.get("layer_range", [0.2, 0.8])
    for ax, method in zip(axes, methods, strict=True):
        for e in entries:
            if e["method"] != method:
                continue
            denom = max(int(e["num_layers"]) - 1, 1)
            xs = [layer / denom for layer in e["layers"]]
            ys = [np.nan if c is None else c for c in e["cosine"]]
            k = precisions.index(e["precision"])
            ax.plot(
                xs, ys, marker=".", lw=1.2, color=_COLORS[k % len(_COLORS)], label=e["precision"]
            )
        ax.axvspan(lo, hi, color="#eeeeee", zorder=0)
        ax.axhline(0.95, color="#2e933c", lw=0.8, ls="--")
        ax.axhline(0.80, color="#d1495b", lw=0.8, ls="--")
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("depth (layer / (L − 1))")
        ax.set_xlim(0, 1)
    axes[0].set_ylabel("cosine vs reference")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"{model} · {trait}", fontsize=10)
    return FigureImage(
        _slug("layer-cosine", model, trait),
        f"Per-layer cosine vs the reference — {model}, {trait}",
        "Cosine between each precision's vector and the reference's at every captured layer; "
        "grey band: the averaging window; dashed: the 0.95 / 0.80 thresholds; gaps: layers "
        "with a zero-norm vector. Source: vector_comparison.json.",
        _png(fig),
    )


def model_spread(vectors: Mapping[str, Any]) -> FigureImage | None:
    """Per precision, each model's mean cosine (over traits and methods): spread across models."""
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for e in vectors.get("entries", []):
        if e["primary"] and e["window"]["mean_cosine"] is not None:
            values[(e["model"], e["precision"])].append(e["window"]["mean_cosine"])
    if not values:
        return None
    models = sorted({m for m, _ in values})
    precisions = _precision_order([p for _, p in values])
    fig = _new(1.8 + 1.0 * len(precisions), 3.4)
    ax = fig.add_subplot()
    for k, model in enumerate(models):
        ys = [
            float(np.mean(values[(model, p)])) if values.get((model, p)) else np.nan
            for p in precisions
        ]
        offset = (k - (len(models) - 1) / 2) * 0.06
        ax.plot(
            np.arange(len(precisions)) + offset,
            ys,
            marker="o",
            ls=":",
            color=_COLORS[k % len(_COLORS)],
            label=model,
        )
    ax.axhline(0.95, color="#2e933c", lw=0.8, ls="--")
    ax.axhline(0.80, color="#d1495b", lw=0.8, ls="--")
    ax.set_xticks(range(len(precisions)), precisions)
    ax.set_ylabel("mean cosine vs reference")
    ax.legend(fontsize=7, title="model")
    ax.set_title("Spread across models", fontsize=10)
    return FigureImage(
        "model-spread",
        "Spread of vector robustness across models",
        "Each point: one model's mean window cosine over its traits and methods (primary mode) "
        "at one precision. Source: vector_comparison.json.",
        _png(fig),
    )


def benchmark_bars(benchmarks: Mapping[str, Any]) -> FigureImage | None:
    """Accuracy per benchmark (groups) and variant (bars) with 95% intervals."""
    rows = [e for e in benchmarks.get("entries", []) if e["accuracy"]["value"] is not None]
    if not rows:
        return None
    groups = sorted({(e["model"], e["benchmark"]) for e in rows})
    precisions = _precision_order([e["precision"] for e in rows])
    fig = _new(max(4.5, 1.2 * len(groups) * max(1, len(precisions)) / 3 + 3), 3.4)
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    for k, precision in enumerate(precisions):
        heights, lows, highs = [], [], []
        for g in groups:
            e = next(
                (
                    r
                    for r in rows
                    if (r["model"], r["benchmark"]) == g and r["precision"] == precision
                ),
                None,
            )
            acc = e["accuracy"] if e else None
            v = None if acc is None else acc["value"]
            heights.append(np.nan if v is None else 100 * v)
            lows.append(
                0.0 if v is None or acc is None or acc["low"] is None else 100 * (v - acc["low"])
            )
            highs.append(
                0.0 if v is None or acc is None or acc["high"] is None else 100 * (acc["high"] - v)
            )
        _bar_group(ax, x, k, len(precisions), heights, (lows, highs), precision)
    ax.set_xticks(x, [f"{b}\n{m}" for m, b in groups], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    ax.legend(fontsize=8, ncols=len(precisions), loc="upper center")
    ax.set_title("Capability benchmarks", fontsize=10)
    return FigureImage(
        "benchmark-accuracy",
        "Benchmark accuracy per precision",
        "Length-normalised accuracy with 95% Wilson intervals. Source: benchmark_comparison.json.",
        _png(fig),
    )


def build_figures(docs: Mapping[str, Mapping[str, Any]]) -> list[FigureImage]:
    """Every figure the report shows, in report order (sections pick theirs by name prefix)."""
    vectors = docs["vector_comparison.json"]
    steering = docs["steering_comparison.json"]
    out: list[FigureImage | None] = []
    models = sorted(
        {e["model"] for e in vectors.get("entries", [])}
        | {e["model"] for e in steering.get("entries", [])}
    )
    for model in models:
        out.append(steering_bars(steering, model))
    for model in models:
        methods = list(
            dict.fromkeys(e["method"] for e in vectors["entries"] if e["model"] == model)
        )
        out.extend(cosine_heatmap(vectors, model, m) for m in methods)
    for model in models:
        traits = sorted({e["trait"] for e in vectors["entries"] if e["model"] == model})
        out.extend(layer_curves(vectors, model, t) for t in traits)
    out.append(model_spread(vectors))
    out.append(benchmark_bars(docs["benchmark_comparison.json"]))
    return [f for f in out if f is not None]
