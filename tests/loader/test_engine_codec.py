"""The engine codec of the vLLM equality tests: every request and result type survives a
file round trip exactly (tensors bit for bit, tuples and frozensets as such), and a file
naming any other type, or not written by the codec, is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from services.loader.capabilities import EngineCapabilities
from services.loader.engine import (
    CaptureResult,
    ChatPrompt,
    ContinuationScore,
    EngineItem,
    GenParams,
    GenResult,
    NextTokenResult,
    ScoreInput,
    StepLogprob,
)
from services.loader.positions import parse_position
from services.loader.steering import SteerSpec
from tests import engine_codec


def test_requests_and_results_round_trip(tmp_path: Path) -> None:
    vec = torch.randn(8, generator=torch.Generator().manual_seed(1))
    batch = torch.randn(2, 3, 8).to(torch.bfloat16)
    steer = [SteerSpec((1, 2), vec, 12.0, "ablate", "response")]
    value = {
        "calls": [
            ("generate", ([EngineItem([1, 2], [3], steer, seed=5)], GenParams(stop=("\n",))), {}),
            ("capture", ([EngineItem([4])], [0, 1], parse_position("response[:2]"), "mean"), {}),
            ("score", ([ScoreInput([1], [[2, 3]], [4], steer)],), {"token_logprobs": True}),
            ("prompt", (ChatPrompt((("user", "hi"),), True),), {}),
        ],
        "results": [
            GenResult("a", [7], "stop", 2, [StepLogprob((7, "a", -0.5), ((7, "a", -0.5),))]),
            CaptureResult(0, batch[0], 3, 2, 1),  # a view of a larger tensor
            CaptureResult(1, batch[1], 3, 2, 1),
            ContinuationScore(-1.25, 2, 4, True, [-0.5, -0.75]),
            NextTokenResult([(1, "x", -0.1)], {"entropy": 0.3}, [1], [2.5], [float("-inf")]),
        ],
        "capabilities": EngineCapabilities("vllm", False, False, True),
        "load_s": 1.5,
    }
    engine_codec.write(value, tmp_path / "v.safetensors")
    back = engine_codec.read(tmp_path / "v.safetensors")
    assert back["calls"][0][1][0][0].steering[0].mode == "ablate"
    assert torch.equal(back["calls"][0][1][0][0].steering[0].vector, vec)
    assert back["calls"][1][1][2] == parse_position("response[:2]")
    assert back["calls"][3][1][0] == ChatPrompt((("user", "hi"),), True)
    assert back["results"][0] == value["results"][0]
    assert back["results"][1].activations.dtype == torch.bfloat16
    assert torch.equal(back["results"][2].activations, batch[1])
    assert back["results"][3:] == value["results"][3:]
    assert back["capabilities"] == value["capabilities"]
    assert back["load_s"] == 1.5


def test_other_types_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot encode a PosixPath"):
        engine_codec.write([tmp_path], tmp_path / "x.safetensors")
    forged = {"$type": "Popen", "fields": {"args": ["true"]}}
    save_file({}, str(tmp_path / "f"), metadata={"qsens.engine_codec": json.dumps(forged)})
    with pytest.raises(ValueError, match="'Popen' is not an engine type"):
        engine_codec.read(tmp_path / "f")
    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="not written by the engine codec"):
        engine_codec.read(tmp_path / "plain")
