"""Layer-wise placement over several GPUs (``services.loader.placement``) on fake device
lists: fits on one, spreads over the fewest, uneven budgets, tied embeddings, a named error
when it does not fit; unit sizes from real transformers configs built on the meta device."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, Gemma2Config, LlamaConfig

from services.common.variants import Precision
from services.loader.model_source import resolve_source
from services.loader.placement import (
    DeviceMemory,
    DoesNotFit,
    Placement,
    Unit,
    choose_placement,
    gpus_needed,
    meta_model,
    place,
    total_bytes,
    units_of,
)

GIB = 2**30


def _model(layers: int, layer_gib: float, embed_gib: float = 1.0, tied: bool = False) -> list[Unit]:
    units = [Unit("model.embed_tokens", int(embed_gib * GIB))]
    units += [Unit(f"model.layers.{i}", int(layer_gib * GIB)) for i in range(layers)]
    units.append(Unit("model.norm", 1024))
    if tied:
        units.append(Unit("lm_head", 0, tied_to="model.embed_tokens"))
    else:
        units.append(Unit("lm_head", int(embed_gib * GIB)))
    return units


def _layer_devices(p: Placement, layers: int) -> list[int | str]:
    return [p.device_map[f"model.layers.{i}"] for i in range(layers)]


def test_a_model_that_fits_one_device_stays_on_it() -> None:
    units = _model(10, 1.0)  # 12 GiB
    p = place(units, [DeviceMemory(0, 20 * GIB), DeviceMemory(1, 20 * GIB)], headroom=0.15)
    assert p.devices == [0]
    assert set(p.device_map.values()) == {0}
    assert p.used == {0: 12 * GIB + 1024}  # with the norm
    assert p.budgets[0] == int(20 * GIB * 0.85)


def test_a_larger_model_spreads_evenly_over_the_fewest_devices() -> None:
    units = _model(40, 1.0)  # 42 GiB: two 26-GiB cards after 15% headroom (22.1 each)
    devices = [DeviceMemory(i, 26 * GIB) for i in range(4)]
    p = place(units, devices, headroom=0.15)
    assert p.devices == [0, 1]
    layer_devs = _layer_devices(p, 40)
    assert layer_devs == sorted(layer_devs)  # layer order: one cut, no back and forth
    assert abs(p.used[0] - p.used[1]) <= 2 * GIB  # balanced, not the first card filled
    assert all(p.used[d] <= p.budgets[d] for d in p.devices)
    assert p.max_memory() == {0: p.budgets[0], 1: p.budgets[1]}
    assert p.device_map["lm_head"] == 1 and p.device_map["model.embed_tokens"] == 0
    assert "2 device(s)" in p.note()


def test_uneven_budgets_take_shares_in_proportion() -> None:
    units = _model(30, 1.0)  # 32 GiB
    p = place(units, [DeviceMemory(0, 30 * GIB), DeviceMemory(1, 10 * GIB)], headroom=0.0)
    assert p.devices == [0, 1]
    assert p.used[0] > 2 * p.used[1]
    assert all(p.used[d] <= p.budgets[d] for d in p.devices)
    # The small card first: it takes less, the large one the rest.
    q = place(units, [DeviceMemory("a", 10 * GIB), DeviceMemory("b", 30 * GIB)], headroom=0.0)
    assert q.used["a"] <= 10 * GIB and q.used["b"] > q.used["a"]


def test_tied_embeddings_go_with_the_embeddings_and_count_once() -> None:
    units = _model(20, 1.0, embed_gib=4.0, tied=True)
    assert total_bytes(units) == 24 * GIB + 1024
    p = place(units, [DeviceMemory(i, 16 * GIB) for i in range(3)], headroom=0.0)
    assert p.devices == [0, 1]
    assert p.device_map["lm_head"] == p.device_map["model.embed_tokens"] == 0
    assert sum(p.used.values()) == 24 * GIB + 1024


def test_a_model_that_does_not_fit_is_a_named_error() -> None:
    units = _model(80, 1.75)
    with pytest.raises(DoesNotFit, match=r"need 142\.00 GiB.*2 device\(s\) give"):
        place(units, [DeviceMemory(0, 80 * GIB), DeviceMemory(1, 80 * GIB)], headroom=0.15)
    with pytest.raises(DoesNotFit, match=r"largest unit 9\.00 GiB"):  # one layer over any card
        place([Unit("model.layers.0", 9 * GIB)], [DeviceMemory(0, 8 * GIB)] * 4)
    with pytest.raises(DoesNotFit, match="no device"):
        place(units, [])
    with pytest.raises(DoesNotFit, match="3 GPU\\(s\\) asked for, 2 available"):
        place(units, [DeviceMemory(0, GIB), DeviceMemory(1, GIB)], count=3)


def test_an_asked_for_count_spreads_even_a_small_model() -> None:
    units = _model(8, 1.0)
    p = place(units, [DeviceMemory(i, 80 * GIB) for i in range(4)], count=4)
    assert p.devices == [0, 1, 2, 3]
    # 10 GiB in whole units of 1 GiB over four cards: none holds more than a balanced share.
    assert max(p.used.values()) <= 3 * GIB and min(p.used.values()) >= GIB
    assert p.device_map["lm_head"] == 3


def test_units_of_a_llama_config_count_every_parameter_and_quantize_only_layers() -> None:
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    model = meta_model(config)
    params = sum(p.numel() for p in model.parameters())
    bf16 = units_of(model, Precision.BF16)
    assert [u.name for u in bf16] == [
        "model.embed_tokens",
        "model.layers.0",
        "model.layers.1",
        "model.layers.2",
        "model.norm",
        "model.rotary_emb",
        "lm_head",
    ]
    assert total_bytes(bf16) == pytest.approx(params * 2, abs=1024)  # + rotary buffer
    assert total_bytes(units_of(model, Precision.FP32)) == pytest.approx(params * 4, abs=1024)
    nf4 = {u.name: u.bytes for u in units_of(model, Precision.NF4)}
    linear = sum(
        m.weight.numel() for m in model.model.layers[0].modules() if type(m).__name__ == "Linear"
    )
    norms = sum(p.numel() for p in model.model.layers[0].parameters()) - linear
    assert nf4["model.layers.0"] == int(linear * 4.5 / 8 + norms * 2)  # 4 bits + absmax/64
    assert nf4["lm_head"] == 1000 * 256 * 2  # the head stays 16-bit
    gptq = {u.name: u.bytes for u in units_of(model, Precision.GPTQ)}
    assert nf4["model.layers.0"] > gptq["model.layers.0"] > linear * 4 / 8


def test_tied_embeddings_are_found_in_a_real_config() -> None:
    config = Gemma2Config(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=512,
    )
    units = units_of(meta_model(config), Precision.BF16)
    assert units[-1] == Unit("lm_head", 0, tied_to="model.embed_tokens")


def test_units_of_a_loaded_tiny_model_match_its_config(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    source = resolve_source("tiny:llama?layers=3", tmp_path_factory.mktemp("models"))
    config = AutoConfig.from_pretrained(str(source.folder))
    units = units_of(meta_model(config), Precision.FP32)
    assert sum(u.name.startswith("model.layers.") for u in units) == 3
    per_layer = {u.bytes for u in units if u.name.startswith("model.layers.")}
    assert len(per_layer) == 1 and per_layer.pop() > 0


def test_gpus_needed_for_the_70b_shape() -> None:
    config = LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    model = meta_model(config)
    h100 = 79 * GIB
    assert gpus_needed(units_of(model, Precision.BF16), h100) == 2
    assert gpus_needed(units_of(model, Precision.NF4), h100) == 1
    assert gpus_needed(units_of(model, Precision.BF16), 40 * GIB) == 4  # 131.4 GiB / 34


def test_choose_placement_runs_on_one_device_unless_asked_or_needed() -> None:
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    need = total_bytes(units_of(meta_model(config), Precision.BF16))
    roomy = [DeviceMemory(i, 4 * need) for i in range(3)]
    assert choose_placement(config, Precision.BF16, roomy) is None  # fits the first
    assert choose_placement(config, Precision.BF16, roomy, gpus=1) is None
    asked = choose_placement(config, Precision.BF16, roomy, gpus=3)
    assert asked is not None and asked.devices == [0, 1, 2]
    tight = [DeviceMemory(i, int(need * 0.7)) for i in range(3)]
    needed = choose_placement(config, Precision.BF16, tight, headroom=0.0)
    assert needed is not None and needed.devices == [0, 1]
    # At 4 bits the same model fits the first card again.
    assert choose_placement(config, Precision.NF4, tight, headroom=0.0) is None
    with pytest.raises(DoesNotFit, match=r"3 device\(s\) give"):
        choose_placement(config, Precision.BF16, tight, headroom=0.6)
    # gpus=1 never builds a placement: a model that does not fit fails where it loads.
    assert choose_placement(config, Precision.BF16, tight[:1], gpus=1) is None
