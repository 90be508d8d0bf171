"""GPTQ/AWQ checkpoints placed layer-wise (issue 20): the quantized backend hands gptqmodel the
loader's placement as an explicit ``device_map``.

A tiny Llama is GPTQ-quantized by the real quantize code; gptqmodel loads it with a per-unit
map from ``placement.place`` over two fake devices (both the CPU here) and keeps exactly that
map, with logits equal to the single-device load. The map for CUDA names ``cuda:<index>`` per
unit; the 4-bit 70B shape needs one H100 and two 40 GB cards, as the sizing table says.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from services.common.quantization import QuantizeSpec
from services.common.variants import Precision
from services.loader import sizing
from services.loader.backends.gptq import GPTQBackend
from services.loader.backends.quantized import gptqmodel_device_map, load_quantized
from services.loader.model_source import resolve_source
from services.loader.placement import DeviceMemory, choose_placement, meta_model, place, units_of
from services.quantizer.calibration import load_calibration
from services.quantizer.run import quantize_folder

TINY = "tiny:llama?layers=4&hidden=128&heads=4&kv_heads=2&intermediate=256&seed=5"
SPEC = QuantizeSpec.model_validate(
    {"gptq": {"group_size": 64}, "calibration": {"samples": 8, "seq_len": 64}}
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gptq")
    cache = tmp_path_factory.mktemp("cache")
    quantize_folder(
        SPEC.request("tq", TINY, "gptq"), load_calibration(SPEC.calibration), folder, cache
    )
    return folder


def test_gptqmodel_keeps_a_per_unit_map_and_the_logits(checkpoint: Path) -> None:
    units = units_of(meta_model(AutoConfig.from_pretrained(str(checkpoint))), Precision.GPTQ)
    total = sum(u.bytes for u in units)
    placement = place(units, [DeviceMemory(i, total) for i in range(2)], headroom=0, count=2)
    assert placement.devices == [0, 1]
    split_map = {name: "cpu" for name in placement.device_map}
    kernel = "GPTQ_TORCH_ATEN"
    single = load_quantized(checkpoint, "gptq", kernel, torch.bfloat16, {"": "cpu"})
    split = load_quantized(checkpoint, "gptq", kernel, torch.bfloat16, split_map)
    assert split.model.hf_device_map == split_map  # honoured, not gptqmodel's own map
    assert type(split.model.model.layers[3].mlp.down_proj).__name__ == "TorchAtenLinear"
    ids = torch.tensor([[5, 17, 99, 200, 3, 42]])
    with torch.no_grad():
        torch.testing.assert_close(split.model(ids).logits, single.model(ids).logits)


def test_the_backend_loads_on_one_device_with_an_explicit_map(checkpoint: Path) -> None:
    source = resolve_source(str(checkpoint), checkpoint.parent)
    loaded = GPTQBackend().load(source, Precision.GPTQ, "cpu")
    assert loaded.model.hf_device_map == {"": "cpu"}
    assert loaded.quantization_config["kernel"] == "TorchAtenLinear"
    assert not any("layer-wise" in n for n in loaded.notes)


def test_cuda_maps_name_each_units_card() -> None:
    assert gptqmodel_device_map(None, torch.device("cuda")) == {"": "cuda:0"}
    assert gptqmodel_device_map(None, torch.device("cuda", 1)) == {"": "cuda:1"}
    assert gptqmodel_device_map(None, torch.device("cpu")) == {"": "cpu"}
    seed = next(s for s in sizing.SEED_MODELS if s.name == "llama-3.3-70b")
    config = seed.config()
    h100s = [DeviceMemory(i, sizing.H100_FREE_BYTES) for i in range(4)]
    for precision in (Precision.GPTQ, Precision.AWQ):
        assert choose_placement(config, precision, h100s) is None  # one H100, as the table says
        assert sizing.sizing("llama-3.3-70b", precision).gpus == 1
    a100s = [DeviceMemory(i, 39 * 2**30) for i in range(4)]
    placement = choose_placement(config, Precision.GPTQ, a100s)
    assert placement is not None and placement.devices == [0, 1]
    mapped = gptqmodel_device_map(placement, torch.device("cuda"))
    assert set(mapped.values()) == {"cuda:0", "cuda:1"}
    cards = [mapped[f"model.layers.{i}"] for i in range(80)]
    assert cards == sorted(cards)  # one cut in layer order, not gptqmodel's alternation
    assert mapped["model.embed_tokens"] == "cuda:0" and mapped["lm_head"] == "cuda:1"
