"""Tiny random models for tests: real transformers code paths at millisecond speed.

``tiny:llama?layers=4&hidden=64&seed=0`` builds a seeded random Llama with a byte-level
tokenizer (256 byte tokens + ChatML specials) and saves it as an ordinary model folder, so the
hf and bnb backends load it through ``from_pretrained`` exactly like a real checkpoint.
``system_role=0`` gives a chat template that rejects system messages (for methodology checks).
``bf16=1`` is for benchmark shapes of billions of parameters: the weights are drawn on the GPU
where there is one (seconds instead of minutes; the values then differ from a CPU build of the
same options) and saved in bfloat16 (half the disk and load time; the bf16 and nf4 variants
load the same weights either way).
``direct=1`` is for shapes larger than one card or than host memory (a 70B shape): the folder
holds the config and tokenizer only, and the hf backend builds the weights where they are
served, block by block on each block's device of the placement
(``services.loader.tiny_direct``); the other backends refuse it by name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from services.common.errors import InvalidArgument
from services.common.hashing import stable_hash

__all__ = [
    "TINY_BOUNDS",
    "TINY_DEFAULTS",
    "TINY_MAX_DIRECT_PARAMETERS",
    "TINY_MAX_PARAMETERS",
    "build_tiny",
    "direct_options",
    "parse_tiny",
    "tiny_parameters",
]

TINY_DEFAULTS: dict[str, int] = {
    "layers": 4,
    "hidden": 64,
    "heads": 4,
    "kv_heads": 2,
    "intermediate": 128,
    "seed": 0,
    "system_role": 1,
    "max_positions": 2048,
    "bf16": 0,
    "direct": 0,
}

#: Inclusive range of each option (seeds and flags included), checked before the size bound.
TINY_BOUNDS: dict[str, tuple[int, int]] = {
    "layers": (1, 1024),
    "hidden": (1, 65536),
    "heads": (1, 1024),
    "kv_heads": (1, 1024),
    "intermediate": (1, 262144),
    "seed": (0, 2**32 - 1),
    "system_role": (0, 1),
    "max_positions": (1, 1 << 20),
    "bf16": (0, 1),
    "direct": (0, 1),
}

#: Largest tiny model: about twice the 8B benchmark shape (80 GB to build in float32).
TINY_MAX_PARAMETERS = 20_000_000_000

#: Largest ``direct=1`` tiny model: never whole in host memory nor on disk, so bounded by the
#: devices it is placed on (the placement says ``DoesNotFit``); about 2.5x the 70B shape.
TINY_MAX_DIRECT_PARAMETERS = 200_000_000_000

#: Written into a tiny folder; ``direct`` in it says the weights are not there.
TINY_RECORD = "qsens-tiny.json"

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_NO_SYSTEM = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def parse_tiny(source: str) -> tuple[str, dict[str, int]]:
    """``tiny:<arch>?k=v&...`` -> (arch, params); InvalidArgument naming the bad key."""
    spec = source.removeprefix("tiny:")
    arch, _, query = spec.partition("?")
    if arch not in ("llama",):
        raise InvalidArgument("model", f"unknown tiny architecture {arch!r} (known: llama)")
    params = dict(TINY_DEFAULTS)
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in TINY_DEFAULTS:
            raise InvalidArgument(
                f"model.{key}", f"unknown tiny option (known: {', '.join(TINY_DEFAULTS)})"
            )
        try:
            params[key] = int(value)
        except ValueError:
            raise InvalidArgument(f"model.{key}", f"expected an integer, got {value!r}") from None
    for key, (low, high) in TINY_BOUNDS.items():
        if not low <= params[key] <= high:
            raise InvalidArgument(f"model.{key}", f"{params[key]} is outside {low}..{high}")
    if params["hidden"] % params["heads"] or params["heads"] % params["kv_heads"]:
        raise InvalidArgument("model.heads", "hidden must divide by heads and heads by kv_heads")
    # The size bound comes from the options alone, before anything is allocated: a shape that
    # cannot be built must fail at plan time, not exhaust memory when `qsens up` builds it.
    n = tiny_parameters(params)
    if params["direct"] and n > TINY_MAX_DIRECT_PARAMETERS:
        raise InvalidArgument(
            "model",
            f"tiny:{arch} with these options has {n:.3g} parameters; the bound for direct=1 "
            f"is {TINY_MAX_DIRECT_PARAMETERS:.0e}",
        )
    if not params["direct"] and n > TINY_MAX_PARAMETERS:
        raise InvalidArgument(
            "model",
            f"tiny:{arch} with these options has {n:.3g} parameters (about {4 * n / 2**30:.0f} "
            f"GiB to build in float32); the bound is {TINY_MAX_PARAMETERS:.0e} "
            "(direct=1 builds larger shapes on the serving devices)",
        )
    return arch, params


def tiny_parameters(params: dict[str, int]) -> int:
    """Parameters of a tiny Llama with ``params`` (embeddings, attention, MLP, norms, head)."""
    hidden, layers, inter = params["hidden"], params["layers"], params["intermediate"]
    head_dim = hidden // params["heads"]
    vocab = 256 + len(SPECIALS)
    attention = 2 * hidden * hidden + 2 * hidden * params["kv_heads"] * head_dim
    per_layer = attention + 3 * hidden * inter + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden


def _byte_tokenizer(system_role: bool) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for j, special in enumerate(SPECIALS):
        vocab[special] = len(alphabet) + j
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML if system_role else CHATML_NO_SYSTEM
    return tok


def direct_options(folder: Path) -> dict[str, int] | None:
    """The options of the ``direct=1`` tiny model in ``folder`` (None for any other folder)."""
    record = folder / TINY_RECORD
    if not record.is_file():
        return None
    options = json.loads(record.read_text())
    return options if options.get("direct") else None


def _config(params: dict[str, int], tok: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=params["hidden"],
        intermediate_size=params["intermediate"],
        num_hidden_layers=params["layers"],
        num_attention_heads=params["heads"],
        num_key_value_heads=params["kv_heads"],
        max_position_embeddings=params["max_positions"],
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def _random_weights(config: Any, params: dict[str, int]) -> Any:
    """The whole model, seeded, in float32 (bfloat16 with ``bf16``) on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(params["seed"])
    on_gpu = bool(params["bf16"]) and torch.cuda.is_available()
    try:
        with torch.device("cuda" if on_gpu else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception:  # any failure to build on the GPU: the CPU build is the reference
        if not on_gpu:
            raise
        on_gpu = False  # built on the CPU after all (slower, same result shape)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init at std 0.02 gives near-uniform outputs; a larger scale makes tokens differ
    # so that steering and padding tests see real signal.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3 if "embed" in name else 0.15)
    if params["bf16"]:
        model = model.to(torch.bfloat16)
        if on_gpu:
            model = model.to("cpu")
            torch.cuda.empty_cache()
    return model


def build_tiny(source: str, cache_dir: Path) -> Path:
    """Materialise the tiny model folder for ``source`` (cached by its parameters); with
    ``direct=1`` the folder holds no weights (see the module docstring)."""
    arch, params = parse_tiny(source)
    # Options at their default stay out of the hash: folders made before they existed still match.
    hashed = {k: v for k, v in params.items() if not (k in ("bf16", "direct") and v == 0)}
    folder = cache_dir / "tiny" / f"{arch}-{stable_hash(hashed, 12)}"
    if (folder / "config.json").exists() and (folder / TINY_RECORD).exists():
        return folder
    tok = _byte_tokenizer(bool(params["system_role"]))
    config = _config(params, tok)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    if params["direct"]:
        config.save_pretrained(tmp)
    else:
        _random_weights(config, params).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / TINY_RECORD).write_text(json.dumps({"arch": arch, **params}))
    try:
        os.replace(tmp, folder)
    except OSError:
        # Another process won the race; its folder is identical.
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder
