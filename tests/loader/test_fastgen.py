"""The fast generation path (services/loader/fastgen.py) on a CPU: it generates what
transformers' generation does; prefix-shared rows equal unshared rows; the static decode step
(what a CUDA graph records and replays on a GPU) equals the eager step that drops finished
rows; chunked prefill equals one chunk; batched equals single; coefficient 0 is exact.
bench/gpu_check.py checks graph replays against the eager step on a GPU."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from services.common.errors import InvalidArgument
from services.loader.decode_triton import reference_decode
from services.loader.engine import ChatPrompt, Engine, EngineItem, GenParams, GenResult
from services.loader.fastgen import prefill_chunks, unsupported_reason
from services.loader.fastgen_kernels import Fused, rope, silu_mul
from services.loader.server import build_runtime
from services.loader.steering import SteerSpec, first_prompt_layer

QUESTIONS = ["Hello", "A longer question about tides?", "Mm", "Why is the sea salty, really?"]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return build_runtime("tiny:llama?layers=6", "fp32", device="cpu").engine


@pytest.fixture(scope="module")
def nf4_engine() -> Engine:
    return build_runtime("tiny:llama?layers=6", "nf4", device="cpu").engine


def _vec(seed: int) -> torch.Tensor:
    return torch.randn(64, generator=torch.Generator().manual_seed(seed))


def sweep_items(engine: Engine, copies: int = 1) -> list[EngineItem]:
    """Rows that share prompts and differ in steering: every kind of spec the path handles."""
    v, w = _vec(1), _vec(2)
    variants: list[list[SteerSpec]] = [
        [],
        [SteerSpec((0,), v, 2.0)],
        [SteerSpec((2,), v, -3.0)],
        [SteerSpec((4, 5), w, 1.5)],
        [SteerSpec((1,), v, 2.5, positions="response")],
        [SteerSpec((3,), w, 2.0, positions="prompt")],
        [SteerSpec((2, 3), v, 1.0, "ablate")],
        [SteerSpec((1,), w, 1.0, "ablate", positions="response"), SteerSpec((5,), v, 3.0)],
        [SteerSpec((3,), v, 0.0)],
    ]
    prompts = [engine.encode_prompt(ChatPrompt((("user", q),)), "x") for q in QUESTIONS]
    return [
        EngineItem(p, steering=steer, seed=7 * i + j)
        for _ in range(copies)
        for i, p in enumerate(prompts)
        for j, steer in enumerate(variants)
    ]


@contextmanager
def fast_settings(engine: Engine, **values: Any) -> Iterator[None]:
    """Set attributes of the engine's fast path (``cache_mode`` on the engine) for a block."""
    fast = engine.fast
    assert fast is not None
    saved = {k: getattr(engine if k == "cache_mode" else fast, k) for k in values}
    for k, v in values.items():
        setattr(engine if k == "cache_mode" else fast, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(engine if k == "cache_mode" else fast, k, v)


def generate(
    engine: Engine, items: Sequence[EngineItem], params: GenParams, **values: Any
) -> list[GenResult]:
    with fast_settings(engine, **values):
        return engine.generate(items, params)


def chosen_logprobs(results: list[GenResult]) -> list[list[float]]:
    return [[lp.chosen[2] for lp in r.logprobs or []] for r in results]


def assert_same(a: list[GenResult], b: list[GenResult], atol: float = 1e-4) -> None:
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [(r.text, r.finish_reason) for r in a] == [(r.text, r.finish_reason) for r in b]
    for x, y in zip(chosen_logprobs(a), chosen_logprobs(b), strict=True):
        np.testing.assert_allclose(x, y, atol=atol)


def _stop_string(engine: Engine, items: list[EngineItem]) -> str:
    """A stop string that the first row's greedy answer contains (so the stop path runs)."""
    (first,) = engine.generate(items[:1], GenParams(max_new_tokens=12))
    text = first.text
    assert len(text) >= 6
    return text[4:6]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_fast_path_generates_what_transformers_does(engine: Engine, temperature: float) -> None:
    items = sweep_items(engine)
    stop = _stop_string(engine, items)
    params = GenParams(
        max_new_tokens=12,
        temperature=temperature,
        top_k=40,
        stop=(stop,),
        logprobs=True,
        top_logprobs=3,
    )
    fast = generate(engine, items, params, cache_mode="auto")
    assert engine.fast is not None and engine.fast.last is not None
    assert engine.fast.last.rows == len(items)
    reference = generate(engine, items, params, cache_mode="dynamic")
    assert_same(fast, reference)
    assert any(r.finish_reason == "stop" for r in fast)  # the stop path ran
    assert any(r.finish_reason == "length" for r in fast)
    for a, b in zip(fast, reference, strict=True):  # top alternatives too
        assert [t for t, _, _ in a.logprobs[0].top] == [t for t, _, _ in b.logprobs[0].top]  # type: ignore[index]


def test_nf4_fast_path_generates_what_transformers_does(nf4_engine: Engine) -> None:
    assert nf4_engine.fast is not None
    items = sweep_items(nf4_engine)[::2]
    params = GenParams(max_new_tokens=8, logprobs=True)
    assert_same(
        generate(nf4_engine, items, params, cache_mode="auto"),
        generate(nf4_engine, items, params, cache_mode="dynamic"),
    )


def test_shared_prefix_rows_equal_unshared_rows(engine: Engine) -> None:
    items = sweep_items(engine, copies=2)
    params = GenParams(max_new_tokens=10, logprobs=True, ignore_eos=True)
    shared = generate(engine, items, params, share_prefix=True)
    assert engine.fast is not None and engine.fast.last is not None
    shared_tokens = engine.fast.last.prefill_real_layer_tokens
    unshared = generate(engine, items, params, share_prefix=False)
    unshared_tokens = engine.fast.last.prefill_real_layer_tokens
    assert_same(shared, unshared, atol=1e-5)
    # Every row computes its whole prompt when unshared; sharing computes each prompt's shared
    # layers once (4 prompts, 18 rows each, most rows leave their stream at layer 1 or later).
    lengths = [len(it.prompt_ids) for it in items]
    assert unshared_tokens == sum(lengths) * engine.num_layers
    expected = sum(
        len(p) * max(first_prompt_layer(it.steering, 6) for it in items if it.prompt_ids == p)
        for p in {tuple(it.prompt_ids): it.prompt_ids for it in items}.values()
    ) + sum(len(it.prompt_ids) * (6 - first_prompt_layer(it.steering, 6)) for it in items)
    assert shared_tokens == expected < unshared_tokens / 2


def test_response_only_steering_shares_the_whole_prefill(engine: Engine) -> None:
    prompt = engine.encode_prompt(ChatPrompt((("user", "Share me"),)), "x")
    items = [
        EngineItem(prompt, steering=[SteerSpec((layer,), _vec(layer), c, positions="response")])
        for layer in range(6)
        for c in (-2.0, 3.0)
    ]
    params = GenParams(max_new_tokens=6, logprobs=True, ignore_eos=True)
    shared = generate(engine, items, params, share_prefix=True)
    assert engine.fast is not None and engine.fast.last is not None
    assert engine.fast.last.prefill_real_layer_tokens == len(prompt) * 6  # one stream, once
    assert_same(shared, generate(engine, items, params, share_prefix=False), atol=1e-5)
    # The first token comes from the shared prefill: identical logits for every row.
    assert len({r.logprobs[0].chosen for r in shared}) == 1  # type: ignore[index]


def test_static_step_equals_the_step_that_drops_finished_rows(engine: Engine) -> None:
    items = sweep_items(engine)
    stop = _stop_string(engine, items)
    params = GenParams(max_new_tokens=14, stop=(stop,), logprobs=True)
    static = generate(engine, items, params, static=True)
    dropping = generate(engine, items, params, static=False)
    assert_same(static, dropping, atol=1e-5)
    lengths = {len(r.token_ids) for r in static}
    assert len(lengths) > 1  # rows finished at different steps: rows were dropped


class _FlashSemantics:
    """The flash decode op's contract in plain torch (the kernel runs on CUDA only): row b
    attends to keys ``[cu_k[b], cu_k[b] + used[b])`` of the flattened cache, grouped-query."""

    def __init__(self, refuse: bool = False) -> None:
        self.calls = 0
        self.refuse = refuse  # a kernel that refuses at run time: SDPA on the same cache

    def usable(self, dtype: torch.dtype) -> bool:
        return True

    def __call__(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        cu: tuple[torch.Tensor, torch.Tensor],
        used: torch.Tensor,
        scale: float,
    ) -> torch.Tensor | None:
        self.calls += 1
        if self.refuse:
            return None
        assert cu[0].tolist() == list(range(q.shape[0] + 1))
        return reference_decode(q, keys, values, cu[1], used, scale).to(q.dtype)


def test_flash_decode_offsets_read_each_rows_own_keys(engine: Engine) -> None:
    """The flash decode path's bookkeeping (cache layout, each row's first key column, keys
    used per step, rows dropped on the way) gives what the masked SDPA decode gives, and so
    does SDPA over the same token-major cache when the kernel refuses."""
    items = sweep_items(engine)
    stop = _stop_string(engine, items)
    params = GenParams(max_new_tokens=10, stop=(stop,), logprobs=True)
    flash, refusing = _FlashSemantics(), _FlashSemantics(refuse=True)
    for static in (True, False):
        masked = generate(engine, items, params, static=static)
        with_flash = generate(engine, items, params, static=static, decode_flash=flash)
        assert_same(masked, with_flash, atol=1e-5)
        fallback = generate(engine, items, params, static=static, decode_flash=refusing)
        assert_same(masked, fallback, atol=1e-5)
    assert flash.calls >= 2 * 6 * 9  # every layer of every decode step of both runs
    assert refusing.calls == flash.calls


def test_chunked_prefill_equals_one_chunk(engine: Engine) -> None:
    items = sweep_items(engine)
    params = GenParams(max_new_tokens=6, logprobs=True, ignore_eos=True)
    whole = generate(engine, items, params, prefill_tokens=1 << 20, min_chunk_tokens=1 << 20)
    assert engine.fast is not None and engine.fast.last is not None
    assert engine.fast.last.chunks == 1
    chunked = generate(engine, items, params, prefill_tokens=300, min_chunk_tokens=0)
    assert engine.fast.last.chunks > 2
    assert_same(whole, chunked, atol=1e-5)


def test_batched_rows_equal_single_rows(engine: Engine) -> None:
    items = sweep_items(engine)[::3]
    params = GenParams(max_new_tokens=8, temperature=0.7, logprobs=True)
    batched = engine.generate(items, params)
    for item, row in zip(items, batched, strict=True):
        (alone,) = engine.generate([item], params)
        assert_same([row], [alone], atol=1e-5)


def test_coefficient_zero_rows_are_exactly_unsteered_rows(engine: Engine) -> None:
    prompt = engine.encode_prompt(ChatPrompt((("user", "Zero"),)), "x")
    zero = [SteerSpec((1, 3), _vec(3), 0.0), SteerSpec((2,), _vec(4), 0.0, "ablate")]
    items = [
        EngineItem(prompt),
        EngineItem(prompt, steering=zero),
        EngineItem(prompt, steering=[SteerSpec((2,), _vec(5), 4.0)]),
    ]
    out = engine.generate(items, GenParams(max_new_tokens=8, logprobs=True, ignore_eos=True))
    assert out[0].token_ids == out[1].token_ids
    assert chosen_logprobs(out[:1]) == chosen_logprobs(out[1:2])  # exactly
    assert out[2].token_ids != out[0].token_ids  # the steered row in the same batch moved


def test_checkpoint_stops_decoding(engine: Engine) -> None:
    calls = {"n": 0}

    def checkpoint() -> None:
        calls["n"] += 1
        if calls["n"] > 3:
            raise InvalidArgument("request", "cancelled")

    engine.checkpoint = checkpoint
    try:
        with pytest.raises(InvalidArgument, match="cancelled"):
            engine.generate(sweep_items(engine)[:4], GenParams(max_new_tokens=20, ignore_eos=True))
    finally:
        engine.checkpoint = lambda: None
    assert calls["n"] == 4  # micro-batch, prefill chunk, decode steps 0 and 1


def test_prefill_chunks_cover_rows_within_budget_and_padding() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 60)
        group_lengths = [rng.randint(1, 120) for _ in range(rng.randint(1, 8))]
        groups = [rng.randrange(len(group_lengths)) for _ in range(n)]
        lengths = [group_lengths[g] for g in groups]
        budget, min_tokens = rng.choice([64, 500, 4000]), rng.choice([0, 100, 10_000])
        chunks = prefill_chunks(lengths, groups, budget=budget, min_tokens=min_tokens)
        assert sorted(i for c in chunks for i in c) == list(range(n))
        for c in chunks:
            width = max(lengths[i] for i in c)
            assert lengths[c[0]] == width  # longest first
            cost = (len(c) + len({groups[i] for i in c})) * width
            assert cost <= budget or len(c) == 1
            # Padding beyond 1/16 only while the chunk is still small.
            for k, i in enumerate(c):
                if lengths[i] * 16 < width * 15:
                    assert sum(lengths[j] for j in c[:k]) < min_tokens


def test_unsupported_architectures_fall_back_to_transformers(engine: Engine) -> None:
    config = type("Config", (), {"model_type": "gemma2"})()
    assert "gemma2" in (unsupported_reason(engine.model, config, engine.layers) or "")
    windowed = type("Config", (), {"model_type": "mistral", "sliding_window": 4096})()
    assert unsupported_reason(engine.model, windowed, engine.layers) == "sliding-window attention"
    assert unsupported_reason(engine.model, engine.config, engine.layers) is None
    items = sweep_items(engine)[:5]
    params = GenParams(max_new_tokens=6)
    fast = engine.fast
    expected = engine.generate(items, params)
    engine.fast = None
    try:
        assert [g.token_ids for g in engine.generate(items, params)] == [
            g.token_ids for g in expected
        ]
    finally:
        engine.fast = fast


def _captures(
    engine: Engine, items: list[EngineItem], position: str, reduction: str
) -> list[torch.Tensor]:
    from services.loader.positions import parse_position

    out = next(engine.capture(items, range(6), parse_position(position), reduction, chunk_items=64))  # type: ignore[arg-type]
    return [r.activations for r in out]


def _assert_equals_hooked(
    engine: Engine,
    items: list[EngineItem],
    position: str,
    reduction: str,
    looped: list[torch.Tensor],
) -> None:
    """``looped`` equals the same capture through transformers' hooked forward."""
    fast = engine.fast
    engine.fast = None
    try:
        hooked = _captures(engine, items, position, reduction)
    finally:
        engine.fast = fast
    for a, b in zip(looped, hooked, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("position", "reduction"), [("response[:]", "mean"), ("all", "none"), ("prompt[-1]", "last")]
)
def test_capture_through_the_layer_loop_equals_the_hooked_forward(
    engine: Engine, position: str, reduction: str
) -> None:
    prompts = [engine.encode_prompt(ChatPrompt((("user", q),)), "x") for q in QUESTIONS]
    answer = engine.encode_text("Because the moon pulls the water.")
    v = _vec(9)
    items = [
        EngineItem(p, answer[: 5 + 3 * i], steering=s)
        for i, p in enumerate(prompts)
        for s in ([], [SteerSpec((1,), v, 3.0)], [SteerSpec((2, 4), v, 1.0, "ablate")])
    ]
    _assert_equals_hooked(
        engine, items, position, reduction, _captures(engine, items, position, reduction)
    )


@pytest.mark.parametrize(
    ("position", "reduction"), [("response[:]", "mean"), ("all", "none"), ("prompt[-1]", "last")]
)
def test_unsteered_capture_leaves_padding_out_and_equals_the_hooked_forward(
    engine: Engine, position: str, reduction: str
) -> None:
    """Unsteered batches run packed (``capture_packed``: no per-token work on padding);
    rows of very different lengths give what the hooked padded forward gives."""
    prompts = [engine.encode_prompt(ChatPrompt((("user", q),)), "x") for q in QUESTIONS]
    answer = engine.encode_text("Because the moon pulls the water, twice a day.")
    items = [EngineItem(p, answer[: 2 + 9 * i]) for i, p in enumerate(prompts)]
    fast = engine.fast
    assert fast is not None
    calls: list[int] = []
    packed = fast.capture_packed

    def spy(input_ids: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(int(input_ids.numel()))
        return packed(input_ids, *args)

    fast.capture_packed = spy  # type: ignore[method-assign]
    try:
        looped = _captures(engine, items, position, reduction)
    finally:
        del fast.capture_packed
    assert calls, "an unsteered capture must take the packed path"
    _assert_equals_hooked(engine, items, position, reduction, looped)


def test_fast_paths_switched_off_while_serving_show_in_info_notes(engine: Engine) -> None:
    """A failed compilation or a varlen kernel refusal only logs once: Info must say it."""
    fast = engine.fast
    assert fast is not None
    assert not any("compiled" in n or "varlen" in n for n in engine.live_notes())
    fast.fused.disabled, fast.varlen_disabled = "BackendCompilerFailed: x", "no varlen_attn: y"
    try:
        notes = engine.live_notes()
    finally:
        fast.fused.disabled = fast.varlen_disabled = None
    assert any("BackendCompilerFailed: x" in n for n in notes)
    assert any("no varlen_attn: y" in n for n in notes)


def test_compiled_elementwise_equals_eager_for_every_batch_size() -> None:
    """``Fused`` (torch.compile, the token dimension dynamic) computes what the eager helpers
    compute, below its threshold it is not used, and one compilation serves new sizes."""
    fused = Fused(True, min_tokens=8)
    gen = torch.Generator().manual_seed(0)
    for tokens in (9, 23):
        q, k = torch.randn(tokens, 4, 16, generator=gen), torch.randn(tokens, 2, 16, generator=gen)
        cos, sin = torch.randn(2, tokens, 1, 16, generator=gen)
        gate_up = torch.randn(tokens, 24, generator=gen)
        for got, want in zip(fused.rope(q, k, cos, sin), rope(q, k, cos, sin), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(fused.silu_mul(gate_up), silu_mul(gate_up), atol=1e-6, rtol=1e-5)
    assert fused.disabled is None
    gate, up = torch.randn(2, 4, 3).unbind(0)
    torch.testing.assert_close(
        silu_mul(torch.cat([gate, up], -1)), torch.nn.functional.silu(gate) * up
    )
    assert not fused._use(7) and fused._use(8)
    assert not Fused(False)._use(10**6)


def test_long_capture_batches_are_cut_where_padding_would_pass_a_sixteenth(engine: Engine) -> None:
    lengths = [100] * 10 + [95] * 10 + [60] * 10 + [59] * 5
    saved = engine.capture_split_tokens
    batches = engine._micro_batches(lengths, 0, 0, 1500)
    assert [len(b) for b in batches] == [20, 15]  # 100/95 together, 60/59 together
    assert engine._micro_batches(lengths, 0, 0, 0) == [sorted(range(35), key=lambda i: -lengths[i])]
    assert len(engine._micro_batches(lengths, 0, 0, 100_000)) == 1  # small batches stay whole
    items = [EngineItem(list(range(3, 3 + n)), [5, 6, 7]) for n in (40, 38, 12, 11, 10)]
    whole = _captures(engine, items, "response[:]", "mean")
    engine.capture_split_tokens = 60
    try:
        assert len(engine._micro_batches([it.length for it in items], 0, 0, 60)) > 1
        split = _captures(engine, items, "response[:]", "mean")
    finally:
        engine.capture_split_tokens = saved
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_capture_chunks_are_computed_together_and_still_stream_chunk_by_chunk(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU computes chunks of short items together up to ``capture_window_tokens`` (one
    forward where the chunk size would give several); the results still come a chunk per
    message, in request order, equal to chunk-by-chunk forwards. Steered items included."""
    from services.loader.engines.hf import capture as capture_mod
    from services.loader.positions import parse_position

    assert engine.capture_window_tokens == 0  # off on a CPU
    items = [EngineItem(list(range(3, 3 + n)), [5, 6, 7]) for n in (9, 30, 12, 7, 25, 11, 8)]
    vec = torch.randn(engine.hidden_size, generator=torch.Generator().manual_seed(5))
    items[4] = EngineItem(items[4].prompt_ids, [5, 6, 7], steering=[SteerSpec((1,), vec, 2.0)])
    lengths = [it.length for it in items]  # 12 33 15 10 28 14 11
    assert list(capture_mod._windows(items, 2, 0)) == [[0, 1], [2, 3], [4, 5], [6]]
    assert list(capture_mod._windows(items, 2, 70)) == [[0, 1, 2, 3], [4, 5, 6]]
    assert list(capture_mod._windows(items, 2, 40)) == [[0, 1], [2, 3], [4, 5], [6]]  # > 40
    assert list(capture_mod._windows(items, 3, 10_000)) == [list(range(7))]
    assert sum(lengths[:4]) <= 70 < sum(lengths[:6])

    forwards: list[int] = []
    real = capture_mod._capture_batch

    def counted(core: Any, batch: Any, *args: Any) -> Any:
        forwards.append(len(batch))
        return real(core, batch, *args)

    monkeypatch.setattr(capture_mod, "_capture_batch", counted)

    def chunks() -> list[list[Any]]:
        return list(
            engine.capture(items, range(6), parse_position("response[:]"), "mean", chunk_items=2)
        )

    one_by_one = chunks()
    assert forwards == [2, 2, 2, 1]  # a forward per chunk
    forwards.clear()
    monkeypatch.setattr(engine, "capture_window_tokens", 10_000)
    together = chunks()
    assert forwards == [6, 1]  # the unsteered rows in one forward, the steered one apart
    assert [[r.index for r in c] for c in together] == [[0, 1], [2, 3], [4, 5], [6]]
    # A GPU's packed mean computes no padding: its batches are not split against padding.
    forwards.clear()
    monkeypatch.setattr(engine, "capture_split_tokens", 20)
    split = chunks()
    assert len(forwards) > 2
    forwards.clear()
    monkeypatch.setattr(capture_mod, "_unpadded", lambda *a: True)
    unsplit = chunks()
    assert forwards == [6, 1]
    for other in (together, split, unsplit):
        for a, b in zip(one_by_one, other, strict=True):
            for x, y in zip(a, b, strict=True):
                torch.testing.assert_close(x.activations, y.activations, atol=2e-5, rtol=1e-5)
    # Per-token results ("none") are what the chunk size bounds: never windowed.
    forwards.clear()
    list(engine.capture(items, range(6), parse_position("response[:]"), "none", chunk_items=2))
    assert forwards == [2, 2, 2, 1]


def test_fused_projections_share_the_modules_weights_and_respect_hooks(engine: Engine) -> None:
    fast = engine.fast
    assert fast is not None
    fused = fast.qkv[2]
    assert fused is not None and fused.usable()
    attn: Any = engine.layers[2].self_attn
    x = torch.randn(3, 5, engine.hidden_size)
    q, k, v = fused(x)
    # The modules' weights are slices of the fused weight: same storage, same results.
    assert attn.q_proj.weight.data_ptr() == fused.weight.data_ptr()
    assert (
        attn.k_proj.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
    )
    for got, module in zip((q, k, v), (attn.q_proj, attn.k_proj, attn.v_proj), strict=True):
        torch.testing.assert_close(got, module(x), atol=1e-5, rtol=1e-5)
    handle = attn.v_proj.register_forward_hook(lambda *a: None)
    try:
        assert not fused.usable()  # a hooked module is called as a module
    finally:
        handle.remove()
    assert fused.usable()


def test_info_notes_say_when_the_fast_path_is_off(engine: Engine) -> None:
    assert not any("fast generation" in n for n in engine.describe().notes)
    saved = engine.fast_disabled
    engine.fast_disabled = "model type 'gemma2'"
    try:
        assert any(
            "fast generation path off" in n and "gemma2" in n for n in engine.describe().notes
        )
    finally:
        engine.fast_disabled = saved


def test_decode_kernel_setting_picks_the_triton_kernel_unless_told_flash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.common import settings as settings_mod

    def triton_reason(kernel: str | None) -> str | None:
        if kernel is None:
            monkeypatch.delenv("QSENS_LOADER_DECODE_KERNEL", raising=False)
        else:
            monkeypatch.setenv("QSENS_LOADER_DECODE_KERNEL", kernel)
        settings_mod.reset()
        engine = build_runtime("tiny:llama?layers=1", "fp32", device="cpu").engine
        assert engine.fast is not None
        return engine.fast.decode_triton.disabled

    try:
        assert triton_reason(None) == "not on a CUDA device"  # the default, but this is a CPU
        assert triton_reason("flash") == "not asked for"
        assert triton_reason("triton") == "not on a CUDA device"
        monkeypatch.setenv("QSENS_LOADER_DECODE_KERNEL", "cuda-magic")
        settings_mod.reset()
        with pytest.raises(Exception, match="decode_kernel"):
            build_runtime("tiny:llama?layers=1", "fp32", device="cpu")
    finally:
        monkeypatch.delenv("QSENS_LOADER_DECODE_KERNEL", raising=False)
        settings_mod.reset()
