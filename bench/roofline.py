"""Roofline times for the loader bench: how fast a card's peak dense bf16 FLOP/s and memory
bandwidth allow a phase's work to run, counted from the model's config and the actual (unpadded)
token counts.

Each forward pass costs ``max(FLOPs / peak FLOP/s, bytes / bandwidth)``; a phase of several
passes (a generate call: one prefill, then one pass per decode step) costs the sum over its
passes. FLOPs: 2 per weight per token through the decoder's linear layers, plus attention
(4 x heads x head_dim per query-key pair: QK^T and PV), plus the output head for the tokens
whose logits are computed. Bytes: the weights once per pass (at the variant's bytes per
weight; the output head stays bf16 in every variant), the KV cache read by decode steps and
written by every token. Activations, norms and the embedding lookup are left out: the floor
is what no implementation can beat, not a model of ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["CARDS", "Card", "ModelShape", "Work", "card_for"]


@dataclass(frozen=True)
class Card:
    name: str
    flops: float  # dense bf16 FLOP/s
    bandwidth: float  # bytes/s


# Datasheet peaks (dense bf16 without sparsity), matched against torch's device name in order.
CARDS = (
    Card("H200", 989e12, 4.8e12),
    Card("H100 PCIe", 756e12, 2.0e12),
    Card("H100", 989e12, 3.35e12),  # SXM (the lent "NVIDIA H100 80GB HBM3")
    Card("A100", 312e12, 2.0e12),
)

# Bytes per decoder weight by precision (nf4: 4 bits plus a one-byte absmax per 64 weights).
WEIGHT_BYTES = {
    "bf16": 2.0,
    "fp16": 2.0,
    "fp32": 4.0,
    "int8": 1.0,
    "nf4": 0.5 + 1 / 64,
    "fp4": 0.5 + 1 / 64,
    # 4-bit codes plus a 16-bit scale and a 4-bit zero per group of 128
    "gptq": 0.5 + 2.5 / 128,
    "awq": 0.5 + 2.5 / 128,
}


def card_for(device_name: str) -> Card | None:
    """The peaks of the card torch names ``device_name`` (None: not in the table)."""
    for card in CARDS:
        if card.name.lower() in device_name.lower():
            return card
    return None


@dataclass
class Work:
    """FLOPs and bytes of one or more passes, and their roofline time on a card."""

    flops: float = 0.0
    bytes: float = 0.0
    seconds: float = 0.0  # sum over passes of max(flops / peak, bytes / bandwidth)

    def __add__(self, other: Work) -> Work:
        return Work(
            self.flops + other.flops, self.bytes + other.bytes, self.seconds + other.seconds
        )

    def scaled(self, factor: float) -> Work:
        """This work times ``factor`` (an average pass of several)."""
        return Work(self.flops * factor, self.bytes * factor, self.seconds * factor)

    def report(self, measured_s: float | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "roofline_s": self.seconds,
            "tflop": self.flops / 1e12,
            "gbytes": self.bytes / 1e9,
        }
        if measured_s:
            out["measured_s"] = measured_s
            out["fraction_of_roofline"] = self.seconds / measured_s
        return out


@dataclass(frozen=True)
class ModelShape:
    """What the roofline needs of a decoder: its dimensions and bytes per weight."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    weight_bytes: float = 2.0
    kv_bytes: float = 2.0

    @classmethod
    def of(cls, config: Any, precision: str) -> ModelShape:
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return cls(
            layers=int(config.num_hidden_layers),
            hidden=int(config.hidden_size),
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=head_dim,
            intermediate=int(config.intermediate_size),
            vocab=int(config.vocab_size),
            weight_bytes=WEIGHT_BYTES.get(precision, 2.0),
        )

    @property
    def layer_weights(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.intermediate

    @property
    def parameters(self) -> int:
        return self.layers * self.layer_weights + self.vocab * self.hidden

    @property
    def kv_bytes_per_token(self) -> float:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.kv_bytes

    def _pass(
        self,
        card: Card,
        *,
        layer_tokens: float,
        pairs: float,
        logits: float,
        kv_read: float = 0.0,
        kv_written: float = 0.0,
        weights: float = 1.0,
    ) -> Work:
        """One pass: ``layer_tokens`` tokens through one layer each (summed over layers),
        ``pairs`` query-key pairs (summed over layers), ``logits`` tokens through the head,
        KV tokens read / written (all layers), the weights read ``weights`` times."""
        flops = 2.0 * self.layer_weights * layer_tokens
        flops += 4.0 * self.heads * self.head_dim * pairs
        flops += 2.0 * self.vocab * self.hidden * logits
        data = weights * self.layers * self.layer_weights * self.weight_bytes
        data += (2.0 * self.vocab * self.hidden) if logits else 0.0
        data += (kv_read + kv_written) * self.kv_bytes_per_token
        return Work(flops, data, max(flops / card.flops, data / card.bandwidth))

    def forward(self, card: Card, lengths: Sequence[int], *, head: bool, cache: bool) -> Work:
        """A causal forward of every row (``head``: logits for every token; ``cache``: the
        keys and values written)."""
        tokens = float(sum(lengths))
        pairs = float(sum(n * (n + 1) // 2 for n in lengths)) * self.layers
        return self._pass(
            card,
            layer_tokens=tokens * self.layers,
            pairs=pairs,
            logits=tokens if head else 0.0,
            kv_written=tokens if cache else 0.0,
        )

    def prefill(self, card: Card, lengths: Sequence[int]) -> Work:
        """Generation's prefill: every prompt token, logits for the last one of each row."""
        tokens = float(sum(lengths))
        return self._pass(
            card,
            layer_tokens=tokens * self.layers,
            pairs=float(sum(n * (n + 1) // 2 for n in lengths)) * self.layers,
            logits=float(len(lengths)),
            kv_written=tokens,
        )

    def shared_prefill(
        self, card: Card, lengths: Sequence[int], groups: Sequence[int], first: Sequence[int]
    ) -> Work:
        """The prefill with prefix sharing: the rows of a group (one prompt) compute layers
        below their first steered layer once, each row the layers from it on."""
        reach: dict[int, tuple[int, int]] = {}
        for n, g, f in zip(lengths, groups, first, strict=True):
            reach[g] = (n, max(reach.get(g, (n, 0))[1], min(f, self.layers)))
        layer_tokens = sum(n * r for n, r in reach.values())
        layer_tokens += sum(
            n * (self.layers - min(f, self.layers)) for n, f in zip(lengths, first, strict=True)
        )
        pairs = sum(n * (n + 1) // 2 * r for n, r in reach.values())
        pairs += sum(
            n * (n + 1) // 2 * (self.layers - min(f, self.layers))
            for n, f in zip(lengths, first, strict=True)
        )
        logits = len(reach) + sum(1 for f in first if f < self.layers)
        return self._pass(
            card,
            layer_tokens=float(layer_tokens),
            pairs=float(pairs),
            logits=float(logits),
            kv_written=float(sum(lengths)),
        )

    def decode_steps(self, card: Card, lengths: Sequence[int], new_tokens: int) -> Work:
        """The ``new_tokens - 1`` decode passes after a prefill: one token per row each,
        attending to its prompt and the tokens before it."""
        total = Work()
        rows = float(len(lengths))
        for step in range(1, new_tokens):
            # The token fed at step s sits at position n + s - 1: it attends to n + s keys.
            context = float(sum(lengths)) + rows * step
            total += self._pass(
                card,
                layer_tokens=rows * self.layers,
                pairs=context * self.layers,
                logits=rows,
                kv_read=context - rows,
                kv_written=rows,
            )
        return total

    def generate(self, card: Card, lengths: Sequence[int], new_tokens: int) -> Work:
        return self.prefill(card, lengths) + self.decode_steps(card, lengths, new_tokens)
