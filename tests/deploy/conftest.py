"""Fixtures of the deployment tests: deploy/k8s rendered once per session for every target."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.deploy.manifests import TARGETS, copy_with_secrets, render


@pytest.fixture(scope="session")
def k8s_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/k8s copied to a temporary folder, with generated credentials."""
    return copy_with_secrets(tmp_path_factory.mktemp("deploy"))


@pytest.fixture(scope="session")
def renders(k8s_copy: Path) -> dict[str, list[dict[str, Any]]]:
    """Every kustomize target rendered: {target name: documents}."""
    return {name: render(k8s_copy, path) for name, path in TARGETS.items()}
