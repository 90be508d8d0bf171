"""A fresh clone is the whole product: every example spec and every study spec under deploy/
plans (with its preflight: traits load and split, benchmark files exist; for a cluster, no local
path) from a clone with nothing beside it, and no tracked file reaches for data outside the
repository.

The clone is of the repository's HEAD: it checks committed state, not the working tree."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.test_study_specs import deploy_studies

REPO = Path(__file__).resolve().parents[2]

#: The name of the folder beside the checkout where the data was first gathered; assembled so
#: that this file does not itself contain the patterns it looks for.
_SHARED = "sha" + "red"

#: Ways a file can reach that data folder outside the repository: a parent-relative path, the
#: folder's data subfolder, "<folder>" / "data", parents[3] / "<folder>", ".." / "<folder>",
#: os.path.join("..", "<folder>").
_OUTSIDE = re.compile(
    rf"""\.\./{_SHARED}\b"""
    rf"""|\b{_SHARED}/data\b"""
    rf"""|["']{_SHARED}["']\s*/\s*["']data["']"""
    rf"""|\bparents?\b(\[\d+\])?\s*/\s*["']{_SHARED}["']"""
    rf"""|["']\.\.["']\s*/\s*["']{_SHARED}["']"""
    rf"""|["']\.\.["']\s*,\s*["']{_SHARED}["']""",
)


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=120
    ).stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HEAD of the repository, cloned into an empty folder (no ``shared`` beside it)."""
    root = tmp_path_factory.mktemp("fresh")
    _git("clone", "--quiet", "--no-hardlinks", str(REPO), str(root / "qsens"), cwd=root)
    assert sorted(p.name for p in root.iterdir()) == ["qsens"]
    return root / "qsens"


def _in_clone(clone: Path, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    # Only the clone's code and data: its folder first on the path, settings of its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("QSENS_")}
    env.update(
        PYTHONPATH=str(clone),
        QSENS_HOME=str(home / "state"),
        QSENS_CACHE_DIR=str(home / "cache"),
        COLUMNS="200",
    )
    return subprocess.run(
        [sys.executable, *args], cwd=clone, env=env, capture_output=True, text=True, timeout=300
    )


def _specs(clone: Path) -> list[Path]:
    return sorted((clone / "examples").glob("*.yaml")) + deploy_studies(clone / "deploy")


def test_specs_plan_from_a_fresh_clone(clone: Path, tmp_path: Path) -> None:
    where = _in_clone(clone, "-c", "import services; print(services.__file__)", home=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(clone), where.stdout + where.stderr
    specs = _specs(clone)
    assert (clone / "examples" / "demo.yaml") in specs
    assert (clone / "deploy/k8s/overlays/example-study-submit/study.yaml") in specs
    for spec in specs:
        rel = spec.relative_to(clone)
        # `qsens plan` runs the preflight `qsens run` runs before submitting; --cluster adds
        # the check that the spec names no local path (built-ins and s3:// keys only).
        for mode in ("--local", "--cluster"):
            done = _in_clone(
                clone, "-m", "services.cli.main", "plan", str(rel), mode, "--json", home=tmp_path
            )
            assert done.returncode == 0, f"{rel} {mode}: {done.stderr[-2000:]}"
            assert '"jobs"' in done.stdout


def test_no_tracked_file_reaches_for_shared_data() -> None:
    me = Path(__file__).resolve().relative_to(REPO).as_posix()
    hits = []
    for name in _git("ls-files", "-z").split("\0"):
        path = REPO / name
        if not name or name == me or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary
        text = data.decode("utf-8", errors="replace")
        hits += [
            f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            for m in _OUTSIDE.finditer(text)
        ]
    assert not hits, "tracked files refer to a shared data folder outside the repository:\n" + (
        "\n".join(hits)
    )


def test_the_pattern_finds_what_it_should() -> None:
    for bad in [
        f"path: ../{_SHARED}/data/caa/mmlu_ab.json",
        f'DATA = REPO.parent / "{_SHARED}" / "data"',
        f'Path(__file__).resolve().parents[3] / "{_SHARED}" / "data" / "pv"',
        f"x = ROOT / '{_SHARED}' / 'data'",
        f'os.path.join("..", "{_SHARED}")',
        f"cp /work/{_SHARED}/data/caa/x.json .",
    ]:
        assert _OUTSIDE.search(bad), bad
    for fine in ["shared_connection()", "shared memory", "a shared machine", '"shared": 1']:
        assert not _OUTSIDE.search(fine), fine
