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
