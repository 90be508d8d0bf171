"""A model placed layer-wise over several devices (issue 20, the part a CPU allows).

This machine has no second GPU: a tiny model is loaded through transformers with a
``device_map`` of one entry per unit from ``placement.place`` on a fake two-device list, and
its layers are told apart as ``cpu`` and ``cpu:0`` (distinct ``torch.device`` values for the
same memory), so the engine takes every multi-device path (per-layer steering tensors,
host-side cache indices, masks per device, the transformers generation path). Capture,
steering, ablation, Score and NextToken equal the unsplit model's. Steering tensors landing on
another device are checked with the ``meta`` device.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from services.common.settings import LoaderSettings
from services.common.variants import Precision
from services.loader.backends.base import LoadedModel
from services.loader.backends.hf import HFBackend, load_tokenizer
from services.loader.engine import EngineItem, GenParams, ScoreInput
from services.loader.engines.hf import core as core_module
from services.loader.engines.hf.engine import HFEngine
from services.loader.hooks import ForwardState, apply_plan
from services.loader.model_source import resolve_source
from services.loader.placement import DeviceMemory, meta_model, place, units_of
from services.loader.positions import parse_position
from services.loader.steering import SteerSpec, build_plan, select_rows

TINY = "tiny:llama?layers=4&hidden=64"
NAMES = {0: torch.device("cpu"), 1: torch.device("cpu", 0)}


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HFEngine, HFEngine]]:
    source = resolve_source(TINY, tmp_path_factory.mktemp("models"))
    settings = LoaderSettings()
    single = HFEngine(HFBackend().load(source, Precision.FP32, "cpu"), settings, Precision.FP32)
    units = units_of(meta_model(AutoConfig.from_pretrained(str(source.folder))), Precision.FP32)
    half = sum(u.bytes for u in units) // 2 + max(u.bytes for u in units)
    placement = place(units, [DeviceMemory(0, half), DeviceMemory(1, half)], headroom=0.0)
    assert placement.devices == [0, 1]
    model = AutoModelForCausalLM.from_pretrained(
        str(source.folder),
        dtype=torch.float32,
        device_map={name: "cpu" for name in placement.device_map},
    )
    layer_map = [NAMES[int(placement.device_map[f"model.layers.{i}"])] for i in range(4)]
    assert len(set(layer_map)) == 2

    def fake_layer_devices(layers: object, default: torch.device) -> dict[int, torch.device]:
        return dict(enumerate(layer_map))

    loaded = LoadedModel(
        model, load_tokenizer(source), torch.device("cpu"), torch.float32, {}, [placement.note()]
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(core_module, "layer_devices", fake_layer_devices)
        split = HFEngine(loaded, settings, Precision.FP32)
    yield single, split


def _steering(hidden: int) -> list[SteerSpec]:
    return [
        SteerSpec((1, 3), torch.linspace(-2, 2, hidden), 4.0, positions="response"),
        SteerSpec((0, 2), torch.cos(torch.arange(hidden, dtype=torch.float32)), 1.0, "ablate"),
    ]


def test_the_split_engine_takes_the_multi_device_paths(engines: tuple[HFEngine, HFEngine]) -> None:
    single, split = engines
    assert not single.multi_device and split.multi_device
    assert split.fast is None and split.fast_disabled == "the model spans several devices"
    assert split.graphs.disabled == "the model spans several devices"
    notes = split.describe().notes
    assert any("layer-wise over 2 device(s)" in n for n in notes)
    # cpu and cpu:0 tensors both report ``cpu``: the engine's plan is checked with layers 1
    # and 3 on ``meta`` instead.
    meta, cpu = torch.device("meta"), torch.device("cpu")
    wanted = {0: cpu, 1: meta, 2: cpu, 3: meta}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(split, "layer_devices", wanted)
        plan = split._plan([_steering(split.hidden_size)])
    assert sorted(plan.layers) == [0, 1, 2, 3]
    for layer, lp in plan.layers.items():
        tensors = [t for t in (lp.add_prompt, lp.add_response, lp.add_all) if t is not None]
        tensors += [t for slot in lp.ablations for t in slot]
        assert tensors and {t.device for t in tensors} == {wanted[layer]}


def test_capture_equals_the_unsplit_model(engines: tuple[HFEngine, HFEngine]) -> None:
    single, split = engines
    prompts = ["Hello there", "A longer prompt about the sea and its lighthouses"]
    items = [EngineItem(single.encode_prompt(p, "x"), steering=_steering(64)) for p in prompts]
    for reduction in ("mean", "last"):
        want = [
            r
            for chunk in single.capture(items, [0, 1, 2, 3], parse_position("prompt[:]"), reduction)
            for r in chunk
        ]
        got = [
            r
            for chunk in split.capture(items, [0, 1, 2, 3], parse_position("prompt[:]"), reduction)
            for r in chunk
        ]
        for a, b in zip(want, got, strict=True):
            torch.testing.assert_close(b.activations, a.activations, atol=1e-5, rtol=1e-5)


def test_generation_score_and_next_token_equal_the_unsplit_model(
    engines: tuple[HFEngine, HFEngine],
) -> None:
    single, split = engines
    prompt = single.encode_prompt("Tell me about lighthouses", "x")
    items = [EngineItem(prompt), EngineItem(prompt, steering=_steering(64))]
    params = GenParams(max_new_tokens=8, ignore_eos=True)
    want = single.generate(items, params)
    got = split.generate(items, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert got[0].token_ids != got[1].token_ids  # the steering acted
    conts = [single.encode_text(t) for t in (" sea", " blue light")]
    scored = [ScoreInput(it.prompt_ids, conts, [4, 11], list(it.steering)) for it in items]
    for a, b in zip(single.score(scored), split.score(scored), strict=True):
        np.testing.assert_allclose([s.logprob for s in b], [s.logprob for s in a], atol=1e-4)
    nt_want = single.next_token(items, top_k=5, token_ids=[3, 7])
    nt_got = split.next_token(items, top_k=5, token_ids=[3, 7])
    for a, b in zip(nt_want, nt_got, strict=True):
        np.testing.assert_allclose(b.requested_logits, a.requested_logits, atol=1e-4)
        assert [t for t, _s, _lp in b.top] == [t for t, _s, _lp in a.top]


def test_steering_tensors_land_on_their_layers_device() -> None:
    """Layer 1 on ``meta``: its add and ablation tensors are built there, row selection
    follows them, and the hook math runs there with masks from the first device."""
    hidden = 8
    meta = torch.device("meta")
    specs = [
        SteerSpec((0, 1), torch.ones(hidden), 2.0, positions="prompt"),
        SteerSpec((1,), torch.arange(hidden, dtype=torch.float32), 1.0, "ablate"),
    ]
    plan = build_plan(
        [specs, []],
        hidden_size=hidden,
        device=torch.device("cpu"),
        dtype=torch.float32,
        layer_devices={0: torch.device("cpu"), 1: meta},
    )
    assert plan.layers[0].add_prompt is not None
    assert plan.layers[0].add_prompt.device.type == "cpu"
    assert plan.layers[1].add_prompt is not None and plan.layers[1].add_prompt.device == meta
    assert {t.device for t in plan.layers[1].ablations[0]} == {meta}
    narrowed = select_rows(plan, torch.tensor([1, 0, 0]))  # index on the first device
    assert narrowed.layers[1].add_prompt is not None
    assert narrowed.layers[1].add_prompt.shape == (3, hidden)
    assert narrowed.layers[1].add_prompt.device == meta
    assert narrowed.layers[0].add_prompt is not None
    torch.testing.assert_close(narrowed.layers[0].add_prompt[1], torch.full((hidden,), 2.0))
    mask = torch.ones(2, 5, dtype=torch.bool)
    state = ForwardState(mask, ~mask, plan)
    out = apply_plan(torch.zeros(2, 5, hidden, device=meta), plan.layers[1], state)
    assert out.device == meta and out.shape == (2, 5, hidden)
    pm, rm = state.masks(torch.float32, meta)
    assert pm.device == meta and rm.device == meta
    assert state.masks(torch.float32)[0].device.type == "cpu"
