"""The sizing table: each seed model at each study precision, its weight bytes and the 80 GB
H100s its loader needs, computed from the models' published shapes with the loader's own
placement (``services.loader.placement``), never written by hand.

``python -m services.loader.sizing`` prints the Markdown table (docs/SIZING.md holds its
output); ``... sizing loader MODEL PRECISION`` a variant's loader kustomization with that many
GPUs (deploy/k8s/variants/). Tests keep both equal to the code.
"""

from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidArgument
from services.common.precisions import precision_info
from services.common.variants import Precision
from services.loader.placement import (
    DEFAULT_HEADROOM,
    gpus_needed,
    meta_model,
    total_bytes,
    units_of,
)

__all__ = [
    "H100_FREE_BYTES",
    "MEMORY_LIMIT_GIB_PER_GPU",
    "MEMORY_REQUEST_GIB_PER_GPU",
    "SEED_MODELS",
    "STUDY_PRECISIONS",
    "SeedModel",
    "Sizing",
    "loader_kustomization",
    "markdown_table",
    "sizing",
]

#: What an 80 GB H100 has free for a loader (its 79.6 GiB less the CUDA context).
H100_FREE_BYTES = 79 * 2**30

STUDY_PRECISIONS: tuple[Precision, ...] = (
    Precision.BF16,
    Precision.NF4,
    Precision.INT8,
    Precision.FP4,
    Precision.GPTQ,
    Precision.AWQ,
)


@dataclass(frozen=True)
class SeedModel:
    """A seed model: its spec name, checkpoint, and its published config as the transformers
    config class and the fields that set its shape (the rest are the class defaults)."""

    name: str
    source: str
    config_class: str
    shape: dict[str, Any]

    def config(self) -> Any:
        import transformers

        cls = getattr(transformers, self.config_class)
        return cls(**self.shape)


def _llama_like(
    hidden: int, intermediate: int, layers: int, heads: int, kv: int, vocab: int, **extra: Any
) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        **extra,
    }


# Shapes from each checkpoint's config.json on the Hugging Face Hub.
SEED_MODELS: tuple[SeedModel, ...] = (
    SeedModel(
        "gemma-2-2b",
        "google/gemma-2-2b-it",
        "Gemma2Config",
        _llama_like(2304, 9216, 26, 8, 4, 256000, head_dim=256, tie_word_embeddings=True),
    ),
    SeedModel(
        "gemma-3-4b",
        "google/gemma-3-4b-it",
        "Gemma3Config",
        {
            "text_config": _llama_like(
                2560, 10240, 34, 8, 4, 262208, head_dim=256, tie_word_embeddings=True
            ),
            "vision_config": {
                "hidden_size": 1152,
                "intermediate_size": 4304,
                "num_hidden_layers": 27,
                "num_attention_heads": 16,
                "image_size": 896,
                "patch_size": 14,
            },
        },
    ),
    SeedModel(
        "mistral-7b",
        "mistralai/Mistral-7B-Instruct-v0.3",
        "MistralConfig",
        _llama_like(4096, 14336, 32, 32, 8, 32768),
    ),
    SeedModel(
        "qwen2.5-7b",
        "Qwen/Qwen2.5-7B-Instruct",
        "Qwen2Config",
        _llama_like(3584, 18944, 28, 28, 4, 152064),
    ),
    SeedModel(
        "llama-3.1-8b",
        "meta-llama/Llama-3.1-8B-Instruct",
        "LlamaConfig",
        _llama_like(4096, 14336, 32, 32, 8, 128256),
    ),
    SeedModel(
        "olmo-2-7b",
        "allenai/OLMo-2-1124-7B-Instruct",
        "Olmo2Config",
        _llama_like(4096, 11008, 32, 32, 32, 100352),
    ),
    SeedModel(
        "llama-3.3-70b",
        "meta-llama/Llama-3.3-70B-Instruct",
        "LlamaConfig",
        _llama_like(8192, 28672, 80, 64, 8, 128256),
    ),
)


@dataclass(frozen=True)
class Sizing:
    """One variant's weights and the H100s its loader needs."""

    model: str
    precision: Precision
    parameters: int
    weight_bytes: int
    gpus: int


@functools.cache
def _meta(name: str) -> Any:
    (seed,) = [s for s in SEED_MODELS if s.name == name]
    return meta_model(seed.config())


def sizing(
    model: str,
    precision: Precision,
    *,
    gpu_free_bytes: int = H100_FREE_BYTES,
    headroom: float = DEFAULT_HEADROOM,
) -> Sizing:
    """The sizing of seed ``model`` at ``precision``."""
    meta = _meta(model)
    units = units_of(meta, precision)
    parameters = sum(p.numel() for p in meta.parameters())
    return Sizing(
        model,
        precision,
        parameters,
        total_bytes(units),
        gpus_needed(units, gpu_free_bytes, headroom=headroom),
    )


def markdown_table() -> str:
    """Every seed model x study precision: weight GB and H100-80GB count."""
    labels = [precision_info(p).label for p in STUDY_PRECISIONS]
    lines = [
        "| model | parameters | " + " | ".join(labels) + " |",
        "|---|---:|" + "---:|" * len(labels),
    ]
    for seed in SEED_MODELS:
        cells = []
        params = 0
        for precision in STUDY_PRECISIONS:
            s = sizing(seed.name, precision)
            params = s.parameters
            cells.append(f"{s.weight_bytes / 1e9:.1f} GB · {s.gpus}")
        lines.append(f"| {seed.name} | {params / 1e9:.2f} B | " + " | ".join(cells) + " |")
    note = (
        f"Each cell: weight bytes, then the 80 GB H100s one loader needs (layer-wise placement, "
        f"{DEFAULT_HEADROOM:.0%} of each card's free {H100_FREE_BYTES / 2**30:.0f} GiB kept "
        "for the KV cache and activations). Computed by `python -m services.loader.sizing`."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"


# Host memory of a loader pod per GPU it holds: each GPU's share of the weights passes through
# host memory while loading, and results are staged in pinned host buffers per request.
MEMORY_REQUEST_GIB_PER_GPU = 32
MEMORY_LIMIT_GIB_PER_GPU = 48


def loader_kustomization(model: str, precision: Precision) -> str:
    """The kustomization of seed ``model``'s loader at ``precision`` (deploy/k8s/variants/):
    the base loader with the variant's values, as many GPUs as ``sizing`` says, the loader told
    to span them (``QSENS_LOADER_GPUS``) and host memory per GPU."""
    if precision_info(precision).platform_quantized:
        raise InvalidArgument(
            "precision",
            f"{precision.value} loaders need the quantize annotation: start from "
            "deploy/k8s/overlays/example-study/loaders/llama-3.1-8b-gptq",
        )
    seeds = {s.name: s for s in SEED_MODELS}
    if model not in seeds:
        raise InvalidArgument("model", f"unknown seed model {model!r} (known: {', '.join(seeds)})")
    size = sizing(model, precision)
    gpus = size.gpus
    # The checkpoint is downloaded into the cache emptyDir (ephemeral storage): the reference
    # weights (bf16 on the Hub; bitsandbytes quantizes them at load time) and some slack.
    hub_gib = math.ceil(sizing(model, Precision.BF16).weight_bytes / 2**30)
    disk_request, disk_limit = max(40, hub_gib + 20), max(80, 2 * hub_gib)
    suffix = f"{model}-{precision.value}".replace(".", "-")
    request, limit = MEMORY_REQUEST_GIB_PER_GPU * gpus, MEMORY_LIMIT_GIB_PER_GPU * gpus
    return f"""\
# Variant {model}@{precision.value}: generated by `python -m services.loader.sizing loader {model} \
{precision.value}`
# (tests/loader/test_sizing.py keeps it equal): {gpus} GPU(s), host memory per GPU, disk for
# the downloaded checkpoint.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../base/loader
nameSuffix: -{suffix}
labels:
  - pairs:
      qsens.io/model: {model}
      qsens.io/precision: {precision.value}
    includeSelectors: true
patches:
  - target:
      kind: Deployment
      name: qsens-loader
    patch: |-
      apiVersion: apps/v1
      kind: Deployment
      metadata:
        name: qsens-loader
      spec:
        template:
          spec:
            containers:
              - name: loader
                env:
                  - name: VARIANT_MODEL_SOURCE
                    value: {seeds[model].source}
                  - name: VARIANT_MODEL_NAME
                    value: {model}
                  - name: VARIANT_PRECISION
                    value: {precision.value}
                  - name: QSENS_LOADER_GPUS
                    value: "{gpus}"
                resources:
                  requests:
                    memory: {request}Gi
                    ephemeral-storage: {disk_request}Gi
                    nvidia.com/gpu: {gpus}
                  limits:
                    memory: {limit}Gi
                    ephemeral-storage: {disk_limit}Gi
                    nvidia.com/gpu: {gpus}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    loader = sub.add_parser("loader", help="print a seed variant's loader kustomization")
    loader.add_argument("model", choices=[s.name for s in SEED_MODELS])
    loader.add_argument("precision", choices=[p.value for p in STUDY_PRECISIONS])
    args = parser.parse_args(argv)
    if args.command == "loader":
        print(loader_kustomization(args.model, Precision(args.precision)), end="")
    else:
        print(markdown_table(), end="")


if __name__ == "__main__":
    main()
