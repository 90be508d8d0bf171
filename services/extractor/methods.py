"""Trait vectors for every layer from contrast activations (mean_diff, probe, pca), with diagnostics.

Inputs are activations ``pos: float[n_pos, L, H]`` and ``neg: float[n_neg, L, H]`` (train) and
optionally held-out ``val_pos``/``val_neg``. Each method returns a :class:`VectorSet`:

* ``mean_diff``: ``mean(pos) - mean(neg)`` per layer (float64 accumulation).
* ``probe``: scikit-learn ``LogisticRegression`` (lbfgs, L2, ``class_weight="balanced"``) on
  row-normalised activations (each row divided by its L2 norm), one fresh fit per layer run to
  convergence (``tol=PROBE_TOL`` on the projected gradient). Fits are not warm-started from the
  neighbouring layer: with sklearn's mean loss the gradient at a neighbour's optimum is already
  near a loose ``tol``, so lbfgs stopped after a few steps and the held-out AUROC depended on
  layer order. ``extras["converged"]`` says per layer whether lbfgs met ``tol`` inside
  ``max_iter``. The direction is the weight vector, sign-aligned with mean_diff and
  rescaled to the mean_diff norm so coefficients are comparable across methods; ``raw_norms``
  keeps the weight norm.
* ``pca``: the first principal component of paired differences ``pos_i - neg_j`` (RepE, Zou et al.
  2023). Rows are paired by pair id where ids are given and match, the rest at random (seeded).
  The PCA is uncentred: RepE shuffles the order inside each pair, so its differences have random
  signs and about zero mean; flipping row signs leaves ``D^T D`` unchanged, so the uncentred PCA of
  consistently ordered differences is that same component. Sign-aligned and rescaled like probe;
  ``raw_norms`` is the RMS length of the differences along it (``s1 / sqrt(n_pairs)``).

Diagnostics per layer:

* ``auroc``: held-out ROC AUC of the projection ``val @ vector`` (raw activations, for every
  method) with the label 1 = pos; rank-based with average ranks for ties. 0.5 on a zero-norm
  layer; NaN when there is no held-out data of both classes or the layer has non-finite values.
* ``norms``: L2 norm of the stored vector; ``zero_norm``: the mean difference is zero (to 1e-6
  relative to the mean activation norm) or the layer has non-finite input; its vector is all
  zeros for every method.
* ``massive_dim_energy``: the fraction of the vector's squared norm in the layer's *massive
  dimensions*, defined here as the ``massive_top_k`` (default 4) dimensions with the largest mean
  ``|activation|`` over the pooled train rows (pos and neg) at that layer. Sun et al. 2024,
  "Massive Activations in Large Language Models" (arXiv 2402.17762), find such activations in a
  handful of fixed dimensions; a top-k rule always yields a comparable number per layer, and
  ``massive_ratio`` (largest mean ``|a|`` over the median over dimensions) says how massive they
  really are (Sun et al. call ~100x and more massive). 0 on a zero-norm layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from services.common.contracts.vectors import FORMAT, VectorSet
from services.common.errors import InvalidArgument

__all__ = [
    "FORMAT",
    "MASSIVE_TOP_K",
    "METHODS",
    "PROBE_MAX_ITER",
    "PROBE_TOL",
    "Method",
    "VectorSet",
    "compute_vectors",
    "mean_diff",
    "pca",
    "probe",
]

Method = Literal["mean_diff", "probe", "pca"]
METHODS: tuple[Method, ...] = ("mean_diff", "probe", "pca")
MASSIVE_TOP_K = 4
# lbfgs stops when the largest projected-gradient entry is below PROBE_TOL. sklearn minimises the
# *mean* loss, so its gradients are small and its default 1e-4 stops short of the optimum on
# row-normalised activations; 1e-8 reaches it (held-out AUROC equal to a fit run to 1e-12).
PROBE_TOL = 1e-8
PROBE_MAX_ITER = 1000
_ZERO_RTOL = 1e-6

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]


# ---------------------------------------------------------------------------------------------
# Shared preparation: validated arrays, mean difference, zero/non-finite layers, massive dims.


def _activations(value: Any, name: str, *, shape: tuple[int, int] | None = None) -> F32:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise InvalidArgument(name, f"expected real numbers, got dtype {arr.dtype}")
    if arr.ndim != 3:
        raise InvalidArgument(name, f"expected shape [n, layers, hidden], got {list(arr.shape)}")
    if shape is not None and arr.shape[1:] != shape:
        raise InvalidArgument(
            name, f"has [layers, hidden] = {list(arr.shape[1:])}, expected {list(shape)}"
        )
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise InvalidArgument(name, f"has an empty layer or hidden axis: {list(arr.shape)}")
    return arr.astype(np.float32, copy=False)


def _nonfinite_layers(arr: F32) -> NDArray[np.bool_]:
    if arr.shape[0] == 0:
        return np.zeros(arr.shape[1], dtype=bool)
    return np.asarray(~np.isfinite(arr).all(axis=(0, 2)))


@dataclass
class _Context:
    pos: F32
    neg: F32
    val_pos: F32 | None
    val_neg: F32 | None
    layers: tuple[int, ...]
    mean_diff: F64  # [L, H], zero on bad layers
    zero: NDArray[np.bool_]
    nonfinite: NDArray[np.bool_]
    massive_dims: NDArray[np.int64]
    massive_ratio: F64
    meta: dict[str, Any]

    @property
    def ok(self) -> NDArray[np.bool_]:
        return ~self.zero


def _prepare(
    pos: Any,
    neg: Any,
    val_pos: Any,
    val_neg: Any,
    layers: Sequence[int] | None,
    massive_top_k: int,
    meta: Mapping[str, Any] | None,
) -> _Context:
    pos_a = _activations(pos, "pos")
    neg_a = _activations(neg, "neg", shape=pos_a.shape[1:])
    for name, arr in (("pos", pos_a), ("neg", neg_a)):
        if arr.shape[0] == 0:
            raise InvalidArgument(name, "needs at least one row")
    if (val_pos is None) != (val_neg is None):
        missing = "val_neg" if val_neg is None else "val_pos"
        raise InvalidArgument(missing, "val_pos and val_neg must be given together")
    vp = None if val_pos is None else _activations(val_pos, "val_pos", shape=pos_a.shape[1:])
    vn = None if val_neg is None else _activations(val_neg, "val_neg", shape=pos_a.shape[1:])
    n_layers, hidden = pos_a.shape[1], pos_a.shape[2]
    layer_ids = tuple(range(n_layers)) if layers is None else tuple(int(x) for x in layers)
    if len(layer_ids) != n_layers:
        raise InvalidArgument("layers", f"has {len(layer_ids)} entries for {n_layers} layers")
    if not 1 <= massive_top_k <= hidden:
        raise InvalidArgument("massive_top_k", f"must be in 1..{hidden}, got {massive_top_k}")

    nonfinite = _nonfinite_layers(pos_a) | _nonfinite_layers(neg_a)
    for val in (vp, vn):
        if val is not None:
            nonfinite |= _nonfinite_layers(val)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = pos_a.mean(axis=0, dtype=np.float64) - neg_a.mean(axis=0, dtype=np.float64)
        pooled_abs = (
            np.abs(pos_a).sum(axis=0, dtype=np.float64)
            + np.abs(neg_a).sum(axis=0, dtype=np.float64)
        ) / (pos_a.shape[0] + neg_a.shape[0])
        scale = (
            np.linalg.norm(pos_a, axis=2).sum(axis=0, dtype=np.float64)
            + np.linalg.norm(neg_a, axis=2).sum(axis=0, dtype=np.float64)
        ) / (pos_a.shape[0] + neg_a.shape[0])
    diff[nonfinite] = 0.0
    pooled_abs[nonfinite] = 0.0
    zero = nonfinite | (np.linalg.norm(diff, axis=1) <= _ZERO_RTOL * np.nan_to_num(scale))
    diff[zero] = 0.0

    top = np.argsort(-pooled_abs, axis=1, kind="stable")[:, :massive_top_k].astype(np.int64)
    median = np.median(pooled_abs, axis=1)
    largest = np.take_along_axis(pooled_abs, top[:, :1], axis=1)[:, 0]
    ratio = np.divide(largest, median, out=np.full(n_layers, np.inf), where=median > 0)
    ratio[largest == 0] = 0.0
    return _Context(
        pos=pos_a,
        neg=neg_a,
        val_pos=vp,
        val_neg=vn,
        layers=layer_ids,
        mean_diff=diff,
        zero=zero,
        nonfinite=nonfinite,
        massive_dims=top,
        massive_ratio=ratio,
        meta=dict(meta or {}),
    )


def _auroc(ctx: _Context, vectors: F64) -> F64:
    n_layers = vectors.shape[0]
    out = np.full(n_layers, np.nan)
    if ctx.val_pos is None or ctx.val_neg is None:
        return out
    n_p, n_n = ctx.val_pos.shape[0], ctx.val_neg.shape[0]
    if n_p == 0 or n_n == 0:
        return out
    from scipy.stats import rankdata

    vals = np.concatenate([ctx.val_pos, ctx.val_neg], axis=0)
    with np.errstate(invalid="ignore", over="ignore"):
        scores = np.einsum("nlh,lh->nl", vals, vectors.astype(np.float32), dtype=np.float64)
    scores[:, ctx.nonfinite] = 0.0
    ranks = rankdata(scores, axis=0)  # average ranks for ties
    u = ranks[:n_p].sum(axis=0) - n_p * (n_p + 1) / 2.0
    out = u / (n_p * n_n)
    out[ctx.zero] = 0.5
    out[ctx.nonfinite] = np.nan
    return np.asarray(out, dtype=np.float64)


def _align_and_rescale(ctx: _Context, directions: F64) -> F64:
    """Flip each direction onto the mean_diff side and give it the mean_diff norm."""
    md_norm = np.linalg.norm(ctx.mean_diff, axis=1)
    d_norm = np.linalg.norm(directions, axis=1)
    sign = np.where(np.einsum("lh,lh->l", directions, ctx.mean_diff) < 0, -1.0, 1.0)
    factor = np.divide(sign * md_norm, d_norm, out=np.zeros_like(d_norm), where=d_norm > 0)
    out = np.asarray(directions * factor[:, None], dtype=np.float64)
    out[ctx.zero] = 0.0
    return out


def _finish(
    ctx: _Context,
    method: str,
    vectors: F64,
    raw_norms: F64,
    params: dict[str, Any],
    extras: dict[str, NDArray[Any]],
) -> VectorSet:
    vectors = np.where(ctx.zero[:, None], 0.0, vectors)
    sq = vectors**2
    total = sq.sum(axis=1)
    massive = np.take_along_axis(sq, ctx.massive_dims, axis=1).sum(axis=1)
    energy = np.divide(massive, total, out=np.zeros_like(total), where=total > 0)
    raw = np.where(ctx.zero, 0.0, raw_norms)
    return VectorSet(
        method=method,
        vectors=vectors.astype(np.float32),
        auroc=_auroc(ctx, vectors),
        norms=np.sqrt(total),
        raw_norms=raw.astype(np.float64),
        massive_dim_energy=energy,
        massive_dims=ctx.massive_dims,
        massive_ratio=ctx.massive_ratio,
        zero_norm=ctx.zero.copy(),
        nonfinite=ctx.nonfinite.copy(),
        layers=ctx.layers,
        n_pos=int(ctx.pos.shape[0]),
        n_neg=int(ctx.neg.shape[0]),
        n_val_pos=0 if ctx.val_pos is None else int(ctx.val_pos.shape[0]),
        n_val_neg=0 if ctx.val_neg is None else int(ctx.val_neg.shape[0]),
        params=params,
        extras=extras,
        meta=dict(ctx.meta),
    )


# ---------------------------------------------------------------------------------------------
# Methods.


def _mean_diff(ctx: _Context, massive_top_k: int) -> VectorSet:
    return _finish(
        ctx,
        "mean_diff",
        ctx.mean_diff.copy(),
        np.linalg.norm(ctx.mean_diff, axis=1),
        {"massive_top_k": massive_top_k},
        {},
    )


def _row_normalised(x: F32) -> F32:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.asarray(np.divide(x, norms, out=np.zeros_like(x), where=norms > 0), dtype=np.float32)


def _probe(ctx: _Context, c: float, max_iter: int, massive_top_k: int) -> VectorSet:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if c <= 0:
        raise InvalidArgument("c", f"must be > 0, got {c}")
    if max_iter < 1:
        raise InvalidArgument("max_iter", f"must be >= 1, got {max_iter}")
    n_layers, hidden = ctx.mean_diff.shape
    y = np.concatenate([np.ones(ctx.pos.shape[0]), np.zeros(ctx.neg.shape[0])])
    directions = np.zeros((n_layers, hidden))
    weight_norms = np.zeros(n_layers)
    n_iter = np.zeros(n_layers, dtype=np.int64)
    converged = np.zeros(n_layers, dtype=bool)
    train_acc = np.full(n_layers, np.nan)
    for layer in np.flatnonzero(ctx.ok):
        x = np.concatenate([ctx.pos[:, layer], ctx.neg[:, layer]], axis=0)
        x = _row_normalised(x)
        # A fresh estimator per layer: the fit depends on this layer's data only.
        clf = LogisticRegression(
            C=c, solver="lbfgs", max_iter=max_iter, tol=PROBE_TOL, class_weight="balanced"
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(x, y)
        w = np.asarray(clf.coef_[0], dtype=np.float64)
        directions[layer] = w
        weight_norms[layer] = float(np.linalg.norm(w))
        n_iter[layer] = int(np.max(clf.n_iter_))
        converged[layer] = not any(issubclass(r.category, ConvergenceWarning) for r in caught)
        train_acc[layer] = float(clf.score(x, y))
    return _finish(
        ctx,
        "probe",
        _align_and_rescale(ctx, directions),
        weight_norms,
        {
            "C": c,
            "max_iter": max_iter,
            "tol": PROBE_TOL,
            "solver": "lbfgs",
            "class_weight": "balanced",
            "row_normalised": True,
            "massive_top_k": massive_top_k,
        },
        {"n_iter": n_iter, "converged": converged, "train_accuracy": train_acc},
    )


def _pairs(
    n_pos: int,
    n_neg: int,
    pos_ids: Sequence[str] | None,
    neg_ids: Sequence[str] | None,
    seed: int,
) -> tuple[NDArray[np.int64], NDArray[np.int64], str]:
    if (pos_ids is None) != (neg_ids is None):
        raise InvalidArgument(
            "neg_ids" if neg_ids is None else "pos_ids", "pos_ids and neg_ids go together"
        )
    pi: list[int] = []
    ni: list[int] = []
    left_pos, left_neg = list(range(n_pos)), list(range(n_neg))
    if pos_ids is not None and neg_ids is not None:
        if len(pos_ids) != n_pos:
            raise InvalidArgument("pos_ids", f"has {len(pos_ids)} ids for {n_pos} rows")
        if len(neg_ids) != n_neg:
            raise InvalidArgument("neg_ids", f"has {len(neg_ids)} ids for {n_neg} rows")
        by_id: dict[str, list[int]] = {}
        for j, pid in enumerate(neg_ids):
            by_id.setdefault(str(pid), []).append(j)
        used_neg: set[int] = set()
        left_pos = []
        for i, pid in enumerate(pos_ids):
            candidates = by_id.get(str(pid))
            if candidates:
                j = candidates.pop(0)
                pi.append(i)
                ni.append(j)
                used_neg.add(j)
            else:
                left_pos.append(i)
        left_neg = [j for j in range(n_neg) if j not in used_neg]
    matched = len(pi)
    if left_pos and left_neg:
        rng = np.random.default_rng(seed)
        lp = rng.permutation(np.asarray(left_pos))
        ln = rng.permutation(np.asarray(left_neg))
        k = min(len(lp), len(ln))
        pi += [int(v) for v in lp[:k]]
        ni += [int(v) for v in ln[:k]]
    mode = "pair_id" if matched == len(pi) else ("random" if matched == 0 else "pair_id+random")
    return np.asarray(pi, dtype=np.int64), np.asarray(ni, dtype=np.int64), mode


def _pca(
    ctx: _Context,
    pos_ids: Sequence[str] | None,
    neg_ids: Sequence[str] | None,
    seed: int,
    massive_top_k: int,
) -> VectorSet:
    pi, ni, mode = _pairs(ctx.pos.shape[0], ctx.neg.shape[0], pos_ids, neg_ids, seed)
    n_layers, hidden = ctx.mean_diff.shape
    directions = np.zeros((n_layers, hidden))
    rms = np.zeros(n_layers)
    explained = np.full(n_layers, np.nan)
    ok = np.flatnonzero(ctx.ok)
    if ok.size:
        # [L_ok, P, H] paired differences; the top right singular vector is the uncentred PC1,
        # found from the smaller of the two Gram matrices.
        diffs = (ctx.pos[pi][:, ok] - ctx.neg[ni][:, ok]).astype(np.float64).transpose(1, 0, 2)
        n_pairs = diffs.shape[1]
        if n_pairs <= hidden:
            evals, evecs = np.linalg.eigh(diffs @ diffs.transpose(0, 2, 1))
            top = np.clip(evals[:, -1], 0.0, None)
            v = np.einsum("lph,lp->lh", diffs, evecs[:, :, -1])
        else:
            evals, evecs = np.linalg.eigh(diffs.transpose(0, 2, 1) @ diffs)
            top = np.clip(evals[:, -1], 0.0, None)
            v = evecs[:, :, -1]
        v_norm = np.linalg.norm(v, axis=1, keepdims=True)
        directions[ok] = np.divide(v, v_norm, out=np.zeros_like(v), where=v_norm > 0)
        rms[ok] = np.sqrt(top / n_pairs)
        total = (diffs**2).sum(axis=(1, 2))
        explained[ok] = np.divide(top, total, out=np.zeros_like(total), where=total > 0)
    return _finish(
        ctx,
        "pca",
        _align_and_rescale(ctx, directions),
        rms,
        {
            "seed": seed,
            "pairing": mode,
            "n_pairs": len(pi),
            "centred": False,
            "massive_top_k": massive_top_k,
        },
        {"explained_variance_ratio": explained},
    )


def mean_diff(
    pos: Any,
    neg: Any,
    val_pos: Any = None,
    val_neg: Any = None,
    *,
    layers: Sequence[int] | None = None,
    massive_top_k: int = MASSIVE_TOP_K,
    meta: Mapping[str, Any] | None = None,
) -> VectorSet:
    """``mean(pos) - mean(neg)`` per layer."""
    ctx = _prepare(pos, neg, val_pos, val_neg, layers, massive_top_k, meta)
    return _mean_diff(ctx, massive_top_k)


def probe(
    pos: Any,
    neg: Any,
    val_pos: Any = None,
    val_neg: Any = None,
    *,
    c: float = 1.0,
    max_iter: int = PROBE_MAX_ITER,
    layers: Sequence[int] | None = None,
    massive_top_k: int = MASSIVE_TOP_K,
    meta: Mapping[str, Any] | None = None,
) -> VectorSet:
    """Logistic-regression weights on row-normalised activations, per layer (see module doc)."""
    ctx = _prepare(pos, neg, val_pos, val_neg, layers, massive_top_k, meta)
    return _probe(ctx, c, max_iter, massive_top_k)


def pca(
    pos: Any,
    neg: Any,
    val_pos: Any = None,
    val_neg: Any = None,
    *,
    pos_ids: Sequence[str] | None = None,
    neg_ids: Sequence[str] | None = None,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    massive_top_k: int = MASSIVE_TOP_K,
    meta: Mapping[str, Any] | None = None,
) -> VectorSet:
    """First principal component of paired differences, per layer (see module doc)."""
    ctx = _prepare(pos, neg, val_pos, val_neg, layers, massive_top_k, meta)
    return _pca(ctx, pos_ids, neg_ids, seed, massive_top_k)


def compute_vectors(
    pos: Any,
    neg: Any,
    val_pos: Any = None,
    val_neg: Any = None,
    *,
    methods: Sequence[str] = METHODS,
    pos_ids: Sequence[str] | None = None,
    neg_ids: Sequence[str] | None = None,
    seed: int = 0,
    c: float = 1.0,
    max_iter: int = PROBE_MAX_ITER,
    layers: Sequence[int] | None = None,
    massive_top_k: int = MASSIVE_TOP_K,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, VectorSet]:
    """Every requested method on the same activations, validating and preparing them once."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InvalidArgument(
            "methods", f"unknown {unknown or 'empty list'}; choose from {', '.join(METHODS)}"
        )
    ctx = _prepare(pos, neg, val_pos, val_neg, layers, massive_top_k, meta)
    out: dict[str, VectorSet] = {}
    for method in dict.fromkeys(methods):
        if method == "mean_diff":
            out[method] = _mean_diff(ctx, massive_top_k)
        elif method == "probe":
            out[method] = _probe(ctx, c, max_iter, massive_top_k)
        else:
            out[method] = _pca(ctx, pos_ids, neg_ids, seed, massive_top_k)
    return out
