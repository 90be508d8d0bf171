"""The parts of the fast path's forward, timed alone on a GPU at the Llama-3.1-8B shape: where
a decode step and a capture forward spend their time, and what each alternative kernel saves.

Prints JSON: per part, milliseconds (median of CUDA-event timings after warm-up) and, for the
matmuls, TFLOP/s achieved. Parts: the four linears of a layer at the decode batch (1 100 rows)
and at a capture batch (~14k tokens); decode attention over a request-sized cache several ways
(SDPA with an additive or boolean mask, batched matmuls, length-grouped SDPA, flex attention,
and the fast path's own kernels: Triton and torch's varlen flash over a token-major cache);
packed capture's causal attention of short rows (varlen flash, cuDNN varlen, padded SDPA);
the elementwise work of a layer (rotary, SiLU x up, residual + RMSNorm) eager and under
``torch.compile``.

    python bench/fastgen_parts.py --device cuda
    python bench/fastgen_parts.py --device cuda --decode-attention-only
    python bench/fastgen_parts.py --device cuda --prefill-attention-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.loader.decode_triton import DecodeTriton
from services.loader.fastgen_kernels import DecodeFlash

HIDDEN, HEADS, KV, DIM, INTER = 4096, 32, 8, 128, 14336


def timed(fn: Callable[[], Any], repeats: int = 20) -> float:
    """Median milliseconds of ``fn`` (CUDA events on a GPU, wall clock otherwise)."""
    for _ in range(3):
        fn()
    cuda = torch.cuda.is_available()
    out: list[float] = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def linears(tokens: int, dev: torch.device) -> dict[str, Any]:
    x = torch.randn(tokens, HIDDEN, device=dev, dtype=torch.bfloat16)
    h = torch.randn(tokens, INTER, device=dev, dtype=torch.bfloat16)
    shapes = {
        "qkv": (x, HIDDEN + 2 * KV * DIM, HIDDEN),
        "o": (x, HIDDEN, HIDDEN),
        "gate_up": (x, 2 * INTER, HIDDEN),
        "down": (h, HIDDEN, INTER),
    }
    out: dict[str, Any] = {}
    total_ms = total_flop = 0.0
    for name, (inp, n, k) in shapes.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        ms = timed(lambda inp=inp, w=w: F.linear(inp, w))
        flop = 2.0 * tokens * n * k
        out[name] = {"ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 1)}
        total_ms += ms
        total_flop += flop
    out["layer"] = {"ms": round(total_ms, 4), "tflops": round(total_flop / total_ms / 1e9, 1)}
    return out


def decode_attention(
    rows: int,
    length: int,
    valid_from: int,
    dev: torch.device,
    flex: bool = True,
    tune: bool = False,
) -> dict[str, Any]:
    groups = HEADS // KV
    q = torch.randn(rows, KV, groups, DIM, device=dev, dtype=torch.bfloat16)
    k = torch.randn(rows, KV, length, DIM, device=dev, dtype=torch.bfloat16)
    v = torch.randn(rows, KV, length, DIM, device=dev, dtype=torch.bfloat16)
    valid = torch.zeros(rows, length, dtype=torch.bool, device=dev)
    starts = torch.randint(0, valid_from, (rows,), device=dev)
    valid |= torch.arange(length, device=dev)[None] >= starts[:, None]
    bias = torch.zeros(valid.shape, dtype=torch.bfloat16, device=dev)
    bias = bias.masked_fill(~valid, torch.finfo(torch.bfloat16).min)[:, None, None, :]
    scale = DIM**-0.5

    def sdpa_bias() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)

    def sdpa_bool() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None], scale=scale)

    def matmul() -> torch.Tensor:
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale + bias.float()
        return torch.matmul(scores.softmax(-1).to(v.dtype), v)

    # Rows sorted by their first valid column, split into ``parts`` groups that each read only
    # the columns from their earliest start (what a length-sorted cache would allow).
    order = torch.argsort(starts)
    sq, sk, sv, sbias = q[order], k[order], v[order], bias[order]
    bounds = [rows * i // 4 for i in range(5)]
    firsts = [int(starts[order[b]]) // 16 * 16 for b in bounds[:-1]]  # aligned slices

    def sdpa_grouped() -> torch.Tensor:
        outs = [
            F.scaled_dot_product_attention(
                sq[a:b], sk[a:b, :, c:], sv[a:b, :, c:], attn_mask=sbias[a:b, ..., c:], scale=scale
            )
            for a, b, c in zip(bounds[:-1], bounds[1:], firsts, strict=True)
        ]
        return torch.cat(outs)[torch.argsort(order)]

    variants: list[tuple[str, Callable[[], torch.Tensor]]] = [
        ("sdpa_bias", sdpa_bias),
        ("sdpa_bool", sdpa_bool),
        ("matmul", matmul),
        ("sdpa_grouped4", sdpa_grouped),
    ]
    try:
        if not flex:
            raise RuntimeError("flex attention not asked for")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def keep(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return valid[b, kv_idx]

        flex = torch.compile(flex_attention)
        qh = q.reshape(rows, KV * groups, 1, DIM)
        for block in (128, 64, 32):
            mask = create_block_mask(keep, rows, None, 1, length, device=dev, BLOCK_SIZE=block)

            def flex_fn(mask: Any = mask) -> torch.Tensor:
                o = flex(qh, k, v, block_mask=mask, scale=scale, enable_gqa=True)
                return o.reshape(rows, KV, groups, DIM)

            variants.append((f"flex_block{block}", flex_fn))
    except Exception as exc:  # no flex attention or no compiler here: a result too
        variants.append(("flex_error", lambda exc=exc: (_ for _ in ()).throw(exc)))
    # The fast path's decode kernels read a token-major cache, each row from its first key.
    kt, vt = (t.transpose(1, 2).contiguous() for t in (k, v))  # [rows, length, KV, DIM]
    query_offsets = torch.arange(rows + 1, device=dev, dtype=torch.int32)
    key_starts = (query_offsets * length).clone()
    key_starts[:-1] += starts.to(torch.int32)
    used = (length - starts).to(torch.int32)
    qf = q.reshape(rows, KV * groups, DIM)
    kernels: list[tuple[str, Any]] = [("triton", DecodeTriton(True))]
    if tune:  # the Triton kernel's launch settings, to pick its defaults from
        kernels += [
            (f"triton_n{n}_w{w}_s{s}", DecodeTriton(True, block_n=n, num_warps=w, num_stages=s))
            for n in (32, 64, 128)
            for w in (2, 4, 8)
            for s in (1, 3)
            if not (n == 128 and w == 2)
        ]
    kernels.append(("flash_varlen", DecodeFlash(True)))
    for name, kernel in kernels:

        def run(kernel: Any = kernel) -> torch.Tensor:
            o = kernel(qf, kt, vt, (query_offsets, key_starts), used, scale)
            if o is None:
                raise RuntimeError(f"kernel off: {kernel.disabled}")
            return o.reshape(rows, KV, groups, DIM)

        variants.append((name, run))
    ref = sdpa_bias().float()
    out: dict[str, Any] = {"bytes_floor_ms": round(2 * k.numel() * 2 / 3.35e9, 4)}
    for name, fn in variants:
        try:
            err = float((fn().float() - ref).abs().max())
            out[name] = {"ms": round(timed(fn), 4), "max_abs_diff": err}
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return out


def prefill_attention(rows: int, low: int, high: int, dev: torch.device) -> dict[str, Any]:
    """Causal attention of packed rows of ``low``-``high`` tokens (capture's shape: the bench's
    80 rows of ~157 tokens) several ways, each with the copies its layout needs: torch's
    varlen flash kernel on the packed rows (what packed capture runs), cuDNN's varlen kernel
    (key/value heads repeated: it takes no grouped query), and SDPA over the rows padded on
    the right with ``is_causal`` (flash with grouped query; cuDNN with heads repeated)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from services.loader.fastgen_kernels import VarlenAttention

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(low, high + 1, (rows,), generator=gen)
    total, width = int(lengths.sum()), int(lengths.max())
    bf = torch.bfloat16
    q = torch.randn(total, HEADS, DIM, device=dev, dtype=bf)
    k = torch.randn(total, KV, DIM, device=dev, dtype=bf)
    v = torch.randn(total, KV, DIM, device=dev, dtype=bf)
    lengths = lengths.to(dev)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    scale = DIM**-0.5
    groups = HEADS // KV
    varlen = VarlenAttention().for_lengths(lengths, scale, groups)
    col = torch.arange(width, device=dev)
    real = col[None, :] < lengths[:, None]  # right padding
    flat = real.reshape(-1).nonzero().squeeze(1)

    def padded(t: torch.Tensor) -> torch.Tensor:  # [N, h, D] -> [B, h, W, D]
        out = t.new_zeros(rows * width, t.shape[1], DIM)
        out.index_copy_(0, flat, t)
        return out.view(rows, width, t.shape[1], DIM).transpose(1, 2)

    def repeat(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(groups, dim=1)

    def fa2_varlen() -> torch.Tensor:
        assert varlen is not None
        out = varlen(q, k, v)
        assert out is not None
        return out

    def cudnn_varlen() -> torch.Tensor:
        return torch.ops.aten._cudnn_attention_forward(
            q,
            repeat(k),
            repeat(v),
            None,
            cu,
            cu,
            width,
            width,
            False,
            0.0,
            True,
            False,
            scale=scale,
        )[0]

    def sdpa_padded(backend: Any, gqa: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            kk, vv = (k, v) if gqa else (repeat(k), repeat(v))
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(
                    padded(q),
                    padded(kk),
                    padded(vv),
                    is_causal=True,
                    scale=scale,
                    enable_gqa=gqa,
                )
            return out.transpose(1, 2).reshape(rows * width, HEADS, DIM).index_select(0, flat)

        return run

    kinds: dict[str, Callable[[], torch.Tensor]] = {
        "fa2_varlen": fa2_varlen,
        "cudnn_varlen": cudnn_varlen,
        "sdpa_padded_flash": sdpa_padded(SDPBackend.FLASH_ATTENTION, True),
        "sdpa_padded_cudnn": sdpa_padded(SDPBackend.CUDNN_ATTENTION, False),
    }
    pairs = float((lengths * (lengths + 1) // 2).sum())
    floor_ms = 4.0 * pairs * HEADS * DIM / 989e12 * 1e3  # causal pairs at the dense peak
    result: dict[str, Any] = {
        "rows": rows,
        "tokens": total,
        "width": width,
        "floor_ms_at_989_tflops": round(floor_ms, 4),
    }
    try:
        ref = fa2_varlen().float()
    except Exception as exc:  # no varlen kernel here: nothing to compare against
        result["error"] = f"{type(exc).__name__}: {exc}"[:300]
        return result
    for name, fn in kinds.items():
        try:
            got = fn().reshape(total, HEADS, DIM).float()
            err = float((got - ref).abs().max() / ref.abs().max())
            result[name] = {"ms": round(timed(fn), 4), "max_rel_err_vs_fa2": round(err, 5)}
        except Exception as exc:  # a kernel this torch lacks is a result here
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return result


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Any:
    def rot(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def add_norm(hidden: torch.Tensor, out: torch.Tensor, weight: torch.Tensor) -> Any:
    hidden = hidden + out
    return hidden, F.rms_norm(hidden, (hidden.shape[-1],), weight, 1e-5)


def elementwise(tokens: int, dev: torch.device, compiled: str) -> dict[str, Any]:
    bf = torch.bfloat16
    q = torch.randn(tokens, HEADS, 1, DIM, device=dev, dtype=bf).transpose(0, 1)
    k = torch.randn(tokens, KV, 1, DIM, device=dev, dtype=bf).transpose(0, 1)
    cos = torch.randn(tokens, 1, DIM, device=dev, dtype=bf)
    sin = torch.randn(tokens, 1, DIM, device=dev, dtype=bf)
    gu = torch.randn(tokens, 2 * INTER, device=dev, dtype=bf)
    hidden = torch.randn(tokens, HIDDEN, device=dev, dtype=bf)
    out = torch.randn(tokens, HIDDEN, device=dev, dtype=bf)
    weight = torch.ones(HIDDEN, device=dev, dtype=bf)
    fns = {"rope": rope, "silu_mul": silu_mul, "add_norm": add_norm}
    if compiled:
        fns = {n: torch.compile(f, dynamic=compiled == "dynamic") for n, f in fns.items()}
    res: dict[str, Any] = {}
    t0 = time.perf_counter()
    res["rope"] = timed(lambda: fns["rope"](q, k, cos, sin))
    res["silu_mul"] = timed(lambda: fns["silu_mul"](gu))
    res["add_norm"] = timed(lambda: fns["add_norm"](hidden, out, weight))
    res["first_call_s"] = round(time.perf_counter() - t0, 2)
    res["per_layer_ms"] = round(res["rope"] + res["silu_mul"] + 2 * res["add_norm"], 4)
    return {n: (round(v, 4) if isinstance(v, float) else v) for n, v in res.items()}


def capture_profile(model: str, dev: torch.device) -> dict[str, Any]:
    """One capture of the loader bench's workload (every layer, mean) four ways: packed with
    varlen attention and compiled elementwise kernels (the default on a GPU), packed with
    padded attention, packed with eager elementwise ops, and the padded forward; times, the
    largest relative difference to the padded forward, and a kernel profile of the default."""
    from bench.bench_loader import _profile, capture_items
    from services.loader.positions import parse_position
    from services.loader.server import build_runtime

    engine = build_runtime(model, "bf16", device=str(dev)).engine
    fast = engine.fast
    items = capture_items(engine, 4)
    layers = range(engine.num_layers)

    def run() -> torch.Tensor:
        out = next(
            engine.capture(
                items, layers, parse_position("response[:]"), "mean", chunk_items=len(items)
            )
        )
        return torch.stack([r.activations for r in out])

    def packed_padded() -> torch.Tensor:
        saved = fast.varlen_disabled
        fast.varlen_disabled = "bench"
        try:
            return run()
        finally:
            fast.varlen_disabled = saved

    def padded() -> torch.Tensor:
        saved = fast.capture_packed
        fast.capture_packed = fast.capture_forward
        try:
            return run()
        finally:
            fast.capture_packed = saved

    def packed_eager() -> torch.Tensor:
        fast.fused.enabled = False
        try:
            return run()
        finally:
            fast.fused.enabled = True

    ref = padded().float()
    run()
    result: dict[str, Any] = {
        "varlen_disabled": fast.varlen_disabled,
        "varlen_repeat_kv": fast.varlen.repeat_kv,
    }
    for name, fn in (
        ("packed_varlen", run),
        ("packed_padded", packed_padded),
        ("packed_eager_elementwise", packed_eager),
        ("padded", padded),
    ):
        for _ in range(2):
            got = fn().float()
        err = float(((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max())
        result[name] = {"ms": round(timed(fn, repeats=5), 2), "max_rel_err": err}
    result["profile"] = _profile(run, dev, 30)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--decode-rows", type=int, default=1100)
    parser.add_argument("--capture-tokens", type=int, default=14336)
    parser.add_argument("--profile-capture", default="", help="a model source to profile")
    parser.add_argument(
        "--decode-attention-only",
        action="store_true",
        help="time only the decode attention variants (the Triton kernel under several launch "
        "settings), flex attention left out (it compiles "
        "per block size), at cache widths 128 and 256",
    )
    parser.add_argument(
        "--prefill-attention-only",
        action="store_true",
        help="time only packed capture's attention against its alternatives (80 rows of "
        "120-190 tokens, the capture bench's shape, and 32 rows of 400-500)",
    )
    args = parser.parse_args()
    dev = torch.device(args.device)
    if args.prefill_attention_only:
        shapes = {"capture_80x157": (80, 120, 190), "rows_32x450": (32, 400, 500)}
        print(json.dumps({k: prefill_attention(*v, dev) for k, v in shapes.items()}, indent=1))
        return
    if args.decode_attention_only:
        widths = {
            f"decode_attention_w{w}": decode_attention(
                args.decode_rows, w, w // 2, dev, flex=False, tune=True
            )
            for w in (128, 256)
        }
        print(json.dumps(widths, indent=1))
        return
    if args.profile_capture:
        print(json.dumps(capture_profile(args.profile_capture, dev), indent=1))
        return
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "linears_decode": linears(args.decode_rows, dev),
        "linears_capture": linears(args.capture_tokens, dev),
        "decode_attention_w128": decode_attention(args.decode_rows, 128, 64, dev),
        "elementwise_decode_eager": elementwise(args.decode_rows, dev, ""),
        "elementwise_capture_eager": elementwise(args.capture_tokens, dev, ""),
        "linears_decode_rows": {
            str(m): linears(m, dev)["layer"] for m in (1024, 1100, 1152, 1280, 2048, 2200)
        },
    }
    try:
        for mode in ("dynamic", "static"):
            for name, tokens in (("decode", args.decode_rows), ("capture", args.capture_tokens)):
                result[f"elementwise_{name}_{mode}"] = elementwise(tokens, dev, mode)
    except Exception as exc:  # a missing compiler is a result here
        result["compiled_error"] = f"{type(exc).__name__}: {exc}"[:400]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
