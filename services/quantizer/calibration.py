"""The calibration set: read it (built in, a local file, or an S3 object), hash it, cut samples.

The built-in set (``data/calibration.jsonl``, provenance in ``data/PROVENANCE.md``) is the one
text every method of a study calibrates on. A set is identified by the sha256 of its bytes, so
two files with the same text are the same set and an edited file is a new one. Samples are the
set's texts in file order, each truncated to ``seq_len`` tokens; texts shorter than
``MIN_SAMPLE_TOKENS`` are skipped and a set giving fewer than ``MIN_SAMPLES`` samples is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgument
from services.common.quantization import BUILTIN_CALIBRATION, CalibrationSpec

__all__ = [
    "BUILTIN_PATH",
    "MIN_SAMPLES",
    "MIN_SAMPLE_TOKENS",
    "CalibrationSamples",
    "CalibrationSet",
    "load_calibration",
    "parse_calibration",
    "tokenize_samples",
]

BUILTIN_PATH = Path(__file__).parent / "data" / "calibration.jsonl"
MIN_SAMPLES = 4
MIN_SAMPLE_TOKENS = 16
_FIELD = "calibration.source"


@dataclass(frozen=True)
class CalibrationSet:
    """The texts of a calibration set and what identifies them."""

    name: str
    texts: tuple[str, ...]
    sha256: str
    size_bytes: int

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "bytes": self.size_bytes,
            "texts": len(self.texts),
        }


@dataclass(frozen=True)
class CalibrationSamples:
    """Token ids cut from a set for one tokenizer."""

    input_ids: list[list[int]]

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)


def parse_calibration(data: bytes, name: str) -> CalibrationSet:
    """Texts of a ``.jsonl`` (rows with a ``text`` field) or plain text (blank-line paragraphs)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidArgument(_FIELD, f"{name} is not UTF-8 text: {err}") from None
    texts: list[str] = []
    if name.endswith(".jsonl"):
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InvalidArgument(f"{_FIELD}[{i}]", f"{name}: bad JSON line: {err}") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise InvalidArgument(f"{_FIELD}[{i}]", f"{name}: each row needs a 'text' string")
            texts.append(row["text"])
    else:
        texts = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InvalidArgument(_FIELD, f"calibration set {name} is empty")
    return CalibrationSet(name, tuple(texts), hashlib.sha256(data).hexdigest(), len(data))


def load_calibration(spec: CalibrationSpec, store: Any | None = None) -> CalibrationSet:
    """Read the set ``spec.source`` names: ``builtin``, a local file, or ``s3://bucket/key``
    (what ``qsens data put`` prints), fetched through the content-addressed data cache of
    ``services.common.datafiles``; ``store`` (an ``S3Store``) serves its bucket."""
    from services.common.datafiles import is_s3, local_copy

    source = spec.source.strip()
    if source == BUILTIN_CALIBRATION:
        return parse_calibration(BUILTIN_PATH.read_bytes(), "builtin:" + BUILTIN_PATH.name)
    if is_s3(source):
        path = local_copy(source, field=_FIELD, store=store)
        if not path.is_file():
            raise InvalidArgument(_FIELD, f"{source} is a folder; a calibration set is one file")
        return parse_calibration(path.read_bytes(), source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise InvalidArgument(
            _FIELD, f"{source!r} is not 'builtin', an s3://bucket/key or an existing file"
        )
    return parse_calibration(path.read_bytes(), str(path))


def tokenize_samples(
    calibration: CalibrationSet, tokenizer: Any, samples: int, seq_len: int
) -> CalibrationSamples:
    """At most ``samples`` sequences of at most ``seq_len`` tokens; InvalidArgument if too few."""
    out: list[list[int]] = []
    for text in calibration.texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:seq_len]
        if len(ids) >= MIN_SAMPLE_TOKENS:
            out.append(ids)
        if len(out) == samples:
            break
    if len(out) < min(MIN_SAMPLES, samples):
        raise InvalidArgument(
            "calibration",
            f"calibration set {calibration.name} is too short: {len(out)} text(s) of at least "
            f"{MIN_SAMPLE_TOKENS} tokens, {min(MIN_SAMPLES, samples)} needed",
        )
    return CalibrationSamples(out)
