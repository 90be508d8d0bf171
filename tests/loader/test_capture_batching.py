"""A batch gives the same activations as each item alone, with left and with right padding."""

from __future__ import annotations

import numpy as np
import pytest

from services.loader.client import Chat, LoaderClient, PromptItem
from tests.loader_procs import LoaderProc

ITEMS = [
    PromptItem(
        Chat.of([("system", "Be kind."), ("user", "What do you think of cats?")]),
        response="They are lovely.",
    ),
    PromptItem(Chat.of([("user", "Hi")]), response="Hello there, friend, how are you today?"),
    PromptItem(
        Chat.of([("user", "Explain tides in one short paragraph for a child.")]), response="Moon."
    ),
    PromptItem("Plain text prompt without a template", response=" and a reply"),
]
POSITIONS = ["prompt[-1]", "prompt[:]", "response[:]", "response[:2]", "response[-1]", "all"]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("reduction", ["mean", "last", "none"])
async def test_batched_equals_unbatched(tiny_loader: LoaderProc, side: str, reduction: str) -> None:
    async with LoaderClient(tiny_loader.address) as client:
        for position in POSITIONS:
            batched = await client.capture(
                ITEMS, position=position, reduction=reduction, padding_side=side
            )  # type: ignore[arg-type]
            for i, item in enumerate(ITEMS):
                alone = await client.capture([item], position=position, reduction=reduction)  # type: ignore[arg-type]
                a, b = batched.activations[i], alone.activations[0]
                assert a.shape == b.shape, (position, i)
                # fp32: left-padded attention sums in another order; differences stay ~1e-6.
                np.testing.assert_allclose(
                    a, b, atol=2e-5, rtol=1e-4, err_msg=f"{position} item {i} {side}"
                )
                assert batched.num_positions[i] == alone.num_positions[0]


async def test_padding_sides_agree(tiny_loader: LoaderProc) -> None:
    async with LoaderClient(tiny_loader.address) as client:
        left = await client.capture(ITEMS, position="all", padding_side="left")
        right = await client.capture(ITEMS, position="all", padding_side="right")
    np.testing.assert_allclose(left.stacked(), right.stacked(), atol=2e-5, rtol=1e-4)


async def test_positions_select_the_right_tokens(tiny_loader: LoaderProc) -> None:
    """mean over response[:] equals the mean of the per-token (none) capture; last == [-1]."""
    item = ITEMS[0]
    async with LoaderClient(tiny_loader.address) as client:
        every = await client.capture(
            [item], position="response[:]", reduction="none", layers=[1, 2]
        )
        mean = await client.capture([item], position="response[:]", reduction="mean", layers=[1, 2])
        last = await client.capture(
            [item], position="response[-1]", reduction="mean", layers=[1, 2]
        )
        first2 = await client.capture(
            [item], position="response[:2]", reduction="mean", layers=[1, 2]
        )
        all_tokens = await client.capture([item], position="all", reduction="none", layers=[1, 2])
        prompt_last = await client.capture(
            [item], position="prompt[-1]", reduction="mean", layers=[1, 2]
        )
    per_token = every.activations[0]  # [L, T, H]
    n_prompt = every.prompt_tokens[0]
    assert per_token.shape[1] == every.response_tokens[0]
    np.testing.assert_allclose(mean.activations[0], per_token.mean(axis=1), atol=1e-5)
    np.testing.assert_allclose(last.activations[0], per_token[:, -1], atol=1e-6)
    np.testing.assert_allclose(first2.activations[0], per_token[:, :2].mean(axis=1), atol=1e-5)
    np.testing.assert_allclose(all_tokens.activations[0][:, n_prompt:], per_token, atol=1e-6)
    np.testing.assert_allclose(
        prompt_last.activations[0], all_tokens.activations[0][:, n_prompt - 1], atol=1e-6
    )


@pytest.mark.parametrize("reduction", ["mean", "last", "none"])
def test_fused_reduction_equals_per_layer(reduction: str) -> None:
    """Holding layer outputs and reducing them together (in groups bounded by
    ``capture_fuse_bytes``) gives what reducing each layer as it comes gives, with per-row
    steering (add and ablate) acting inside the captured layers."""
    import torch

    from services.loader.engine import ChatPrompt, EngineItem
    from services.loader.positions import parse_position
    from services.loader.server import build_runtime
    from services.loader.steering import SteerSpec

    engine = build_runtime("tiny:llama?layers=6", "fp32", device="cpu").engine
    vec = torch.randn(64, generator=torch.Generator().manual_seed(1))
    steer = [[], [SteerSpec((2,), vec, 4.0)], [SteerSpec((1, 3), vec, 1.0, "ablate")]]
    items = [
        EngineItem(
            engine.encode_prompt(ChatPrompt((("user", q),)), "x"),
            engine.encode_text(r),
            steering=s,
        )
        for (q, r), s in zip(
            [("Hi", "Hello, friend."), ("What now?", "Tea."), ("Tell a long tale", "Once, a fox")],
            steer,
            strict=True,
        )
    ]
    layers = [0, 2, 3, 5]

    def capture(fuse_bytes: int, position: str) -> list[torch.Tensor]:
        engine.settings = engine.settings.model_copy(update={"capture_fuse_bytes": fuse_bytes})
        out = next(
            engine.capture(items, layers, parse_position(position), reduction, chunk_items=8)
        )  # type: ignore[arg-type]
        return [r.activations for r in out]

    for position in ("response[:]", "all", "prompt[-1]"):
        per_layer = capture(0, position)
        assert per_layer[0].shape[0] == len(layers)
        one_layer_bytes = 3 * 40 * 64 * 4  # at most 40 tokens: groups of 1 to 4 layers
        for fuse_bytes in (one_layer_bytes, 2 * one_layer_bytes, 1 << 30):
            fused = capture(fuse_bytes, position)
            for a, b in zip(fused, per_layer, strict=True):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # Steering acted on the captured stream: the steered row differs from its unsteered self.
    plain = next(
        engine.capture(
            [EngineItem(items[1].prompt_ids, items[1].response_ids)],
            layers,
            parse_position("all"),
            reduction,  # type: ignore[arg-type]
        )
    )[0].activations
    steered = capture(1 << 30, "all")[1]
    # Layer 0 is before the steered layer 2 (alone vs in a batch: float noise only).
    torch.testing.assert_close(plain[0], steered[0], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(plain[2], steered[2], atol=1e-3)


def test_transfer_helpers_keep_values_and_dtype() -> None:
    """to_host returns float32 on the host whatever the model dtype; to_device keeps values
    (on a GPU both go through page-locked memory: bench/capture_profile.py measures that)."""
    import torch

    from services.loader.transfer import to_device, to_host

    x = torch.randn(3, 4, 5).to(torch.bfloat16)
    host = to_host(x)
    assert host.dtype == torch.float32 and host.device.type == "cpu"
    assert torch.equal(host, x.float())
    mask = torch.tensor([[True, False], [False, True]])
    assert torch.equal(to_device(mask, torch.device("cpu")), mask)
