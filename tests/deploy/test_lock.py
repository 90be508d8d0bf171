"""The lock files (requirements/*.lock, made by requirements/compile.sh with `uv pip compile
--generate-hashes`): every package pinned with its sha256, the development environment
exactly what dev.lock (and the --no-deps locks) say, each image's lock covering what its
extras need, one torch per build, and the images installing from them."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.manifests import DOCKER, REPO

REQS = REPO / "requirements"
LOCKS = sorted(REQS.glob("*.lock"))
_ENTRY = re.compile(
    r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s*\\\n\s*--hash=sha256:[0-9a-f]{64})+)", re.M
)


def parse_lock(path: Path) -> dict[str, str]:
    """{canonical name: version} of a lock file; fails on an entry without a hash."""
    text = path.read_text()
    entries = {canonicalize_name(m[1]): m[2] for m in _ENTRY.finditer(text)}
    pinned = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", text, flags=re.M)
    assert len(pinned) == len(entries), f"{path.name}: an entry without a sha256 hash"
    return entries


def _pyproject() -> dict[str, list[Requirement]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"": [Requirement(r) for r in project["dependencies"]]}
    for extra, reqs in project["optional-dependencies"].items():
        groups[extra] = [Requirement(r) for r in reqs if not r.startswith("qsens[")]
    return groups


def test_every_lock_is_hashed_and_named() -> None:
    names = {p.name for p in LOCKS}
    assert names == {
        "dev.lock",
        "worker.lock",
        "loader.lock",
        "loader-cpu.lock",
        "proto.lock",
        "gptqmodel.lock",
        "smollm2.lock",
        "vllm.lock",
    }
    for path in LOCKS:
        assert parse_lock(path), path.name


def test_parser_refuses_an_unhashed_entry(tmp_path: Path) -> None:
    bad = tmp_path / "bad.lock"
    bad.write_text("numpy==2.0.0 \\\n    --hash=sha256:" + "a" * 64 + "\nrich==13.0.0\n")
    with pytest.raises(AssertionError, match="without a sha256"):
        parse_lock(bad)


def test_dev_environment_is_the_lock() -> None:
    """Every package installed in this environment is in dev.lock or a --no-deps lock, at the
    locked version (the project itself, editable, and pip, the installer, excepted)."""
    locked: dict[str, str] = {}
    for name in ("dev.lock", "gptqmodel.lock", "smollm2.lock"):
        locked.update(parse_lock(REQS / name))
    installed = {
        canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
    }
    assert len(installed) > 50
    for name, version in sorted(installed.items()):
        if name in ("qsens", "pip"):
            continue
        assert name in locked, f"{name}=={version} is installed but in no lock file"
        assert locked[name] == version, f"{name}: installed {version}, locked {locked[name]}"


@pytest.mark.parametrize(
    ("lock", "extras"),
    [
        ("dev.lock", ("", "loader", "worker", "stack", "quant", "dev")),
        ("worker.lock", ("", "worker")),
        ("loader.lock", ("", "loader", "quant")),
        ("loader-cpu.lock", ("", "loader", "quant")),
        ("vllm.lock", ("", "loader")),
    ],
)
def test_lock_covers_the_extras(lock: str, extras: tuple[str, ...]) -> None:
    """Each requirement of the extras an installation needs is locked at a version it allows
    (a dependency added to pyproject.toml without re-locking fails here)."""
    locked = parse_lock(REQS / lock)
    groups = _pyproject()
    for extra in extras:
        for req in groups[extra]:
            name = canonicalize_name(req.name)
            assert name in locked, f"{lock}: {req} (extra {extra or 'base'}) is not locked"
            version = locked[name].split("+", 1)[0]
            assert req.specifier.contains(version, prereleases=True), f"{lock}: {req} vs {version}"


def test_one_torch_per_build() -> None:
    pinned = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), flags=re.M)
    assert pinned
    version = pinned.group(1)
    for lock in ("dev.lock", "worker.lock", "loader-cpu.lock"):
        assert parse_lock(REQS / lock)["torch"] == f"{version}+cpu", lock
    # The GPU image: PyPI's build (CUDA 13), with its CUDA libraries as wheels.
    loader = parse_lock(REQS / "loader.lock")
    assert loader["torch"] == version
    assert any(name.startswith("nvidia-") for name in loader)
    assert not any(name.startswith("nvidia-") for name in parse_lock(REQS / "worker.lock"))


def test_images_and_tools_agree_on_versions() -> None:
    """The stubs' generator matches every grpcio runtime (generated code refuses an older
    one), and the images' locks pin what dev.lock pins, torch apart."""
    dev = parse_lock(REQS / "dev.lock")
    proto = parse_lock(REQS / "proto.lock")
    assert proto["grpcio-tools"] == dev["grpcio-tools"]
    for lock in ("worker.lock", "loader.lock", "loader-cpu.lock", "proto.lock"):
        image = parse_lock(REQS / lock)
        assert image["grpcio"] == proto["grpcio-tools"], lock
        for name, version in image.items():
            if name != "torch" and name in dev:
                assert version == dev[name], f"{lock}: {name} {version} vs dev.lock {dev[name]}"
    # The vLLM image's lock is vLLM's own (its transformers and fastapi pins refuse dev.lock's),
    # but the stubs it runs are the same generator's.
    vllm = parse_lock(REQS / "vllm.lock")
    assert vllm["grpcio"] == proto["grpcio-tools"]
    assert vllm["protobuf"] == dev["protobuf"]


@pytest.mark.parametrize(
    ("dockerfile", "locks", "torch"),
    [
        ("Dockerfile.worker", ("proto.lock", "worker.lock"), "2.13.0+cpu"),
        ("Dockerfile.loader", ("proto.lock", "${LOCK}", "gptqmodel.lock"), "2.13.0+cu130"),
        ("Dockerfile.vllm", ("proto.lock", "vllm.lock"), "2.13.0+cu130"),
    ],
)
def test_images_install_from_the_locks(dockerfile: str, locks: tuple[str, ...], torch: str) -> None:
    text = (DOCKER / dockerfile).read_text()
    for lock in locks:
        assert f"requirements/{lock}" in text, (dockerfile, lock)
    # The label says which torch the image holds; it is the lock's.
    label = re.search(r'io\.qsens\.torch="([^"]+)"', text)
    assert label
    value = label.group(1)
    if value.startswith("${"):
        value = re.search(r"^ARG TORCH_BUILD=(\S+)$", text, flags=re.M).group(1)  # type: ignore[union-attr]
    assert value == torch
    # The lock the image installs by default: its LOCK argument's, else the one its label names.
    default_lock = re.search(r"^ARG LOCK=(\S+)$", text, flags=re.M)
    named = re.search(r'io\.qsens\.lock="requirements/([^"$]+)"', text)
    lock = default_lock.group(1) if default_lock else named.group(1) if named else "worker.lock"
    assert parse_lock(REQS / lock)["torch"] == torch.replace("+cu130", ""), (dockerfile, lock)
