"""The published datasets the repository ships: unchanged, licensed, and installed as package data."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import tomllib
from pathlib import Path

import pytest

from services.extractor.datasets import builtin_dir, data_dir, published_dir

REPO = Path(__file__).resolve().parents[2]
_SHA_LINE = re.compile(r"^([0-9a-f]{64})  (\S+)$", re.MULTILINE)


@pytest.mark.parametrize(
    ("source", "licence", "files"),
    [
        (
            "caa",
            "MIT License\n\nCopyright (c) 2024 Nina Rimsky",
            {
                "mmlu_ab.json": 294,
                "truthfulqa_ab.json": 307,
                "sycophancy/generate.json": 310,
                "sycophancy/test_ab.json": 50,
                "refusal/generate.json": 408,
                "refusal/test_ab.json": 50,
            },
        ),
        (
            "arditi",
            "Apache License\n                           Version 2.0, January 2004",
            {
                "harmful_train.json": 260,
                "harmful_val.json": 39,
                "harmful_test.json": 572,
                "harmless_train.json": 600,
                "harmless_val.json": 200,
                "harmless_test.json": 200,
            },
        ),
    ],
)
def test_each_source_is_unchanged_and_licensed(
    source: str, licence: str, files: dict[str, int]
) -> None:
    folder = published_dir() / source
    provenance = (folder / "PROVENANCE.txt").read_text(encoding="utf-8")
    assert licence in (folder / "LICENSE.txt").read_text(encoding="utf-8")
    recorded = {name: sha for sha, name in _SHA_LINE.findall(provenance)}
    shipped = {p.relative_to(folder).as_posix() for p in folder.rglob("*.json")}
    # Every data file is listed with its digest, and nothing else is shipped.
    assert recorded.keys() == shipped == files.keys()
    for name, count in files.items():
        data = (folder / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == recorded[name], name
        assert len(json.loads(data)) == count, name
    for needed in ("Source:", "Licence:", "commit", "subset rule"):
        assert needed in provenance


def test_no_unlicensed_persona_vector_files_are_shipped() -> None:
    """The published persona-vectors files have no licence; pv/* built-ins are qsens's own."""
    assert not (published_dir() / "pv").exists()
    for trait in ("evil", "sycophancy", "hallucination"):
        extras = json.loads((builtin_dir() / "pv" / f"{trait}.extras.json").read_text())
        assert extras["source"].startswith(f"qsens built-in (pv/{trait}): original text")


def test_qsens_written_extras_say_so() -> None:
    for name in ("caa/refusal", "caa/sycophancy-full", "arditi/refusal-full"):
        extras = json.loads((builtin_dir() / f"{name}.extras.json").read_text())
        assert extras["source"].startswith(f"qsens built-in ({name}): the published")
        assert "written for qsens" in extras["source"]


def test_package_data_globs_cover_every_data_file() -> None:
    """The worker image installs the package (not the source tree): every file below the
    datasets package must match a package-data pattern of pyproject.toml."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["*"]
    data = [p for p in data_dir().rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    missed = [
        p.relative_to(data_dir()).as_posix()
        for p in data
        if p.suffix != ".py" and not any(fnmatch.fnmatch(p.name, pat) for pat in patterns)
    ]
    assert not missed, f"not installed as package data: {missed}"
    assert any(p.name == "LICENSE.txt" for p in data)
