"""`qsens up --spec` with the loader judge: the judge service points at its variant's loader."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.runs import children_for_spec
from services.common.errors import InvalidArgument

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"


def _spec(tmp_path: Path, judge: str) -> Path:
    text = DEMO.read_text().replace("judge:\n  backend: embedding\n", judge)
    assert text != DEMO.read_text()
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def _port(argv: list[str]) -> str:
    return argv[argv.index("--port") + 1]


def test_loader_judge_uses_its_variants_loader(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "judge:\n  backend: loader\n  variant: smollm2-135m@nf4\n")
    children = {c.name: c for c in children_for_spec(spec, tmp_path / "home")}
    judge = children["judge"].argv
    assert judge[judge.index("--backend") + 1] == "loader"
    assert judge[judge.index("--loader-variant") + 1] == "smollm2-135m@nf4"
    nf4 = _port(children["loader-smollm2-135m@nf4"].argv)
    assert judge[judge.index("--loader-address") + 1] == f"127.0.0.1:{nf4}"


def test_loader_judge_defaults_to_the_reference_loader(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "judge:\n  backend: loader\n")
    children = {c.name: c for c in children_for_spec(spec, tmp_path / "home")}
    judge = children["judge"].argv
    bf16 = _port(children["loader-smollm2-135m@bf16"].argv)
    assert judge[judge.index("--loader-address") + 1] == f"127.0.0.1:{bf16}"
    assert "--loader-variant" not in judge


def test_judge_variant_not_in_the_spec_is_a_named_error(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "judge:\n  backend: loader\n  variant: smollm2-135m@fp16\n")
    with pytest.raises(InvalidArgument, match="not a variant of this spec") as caught:
        children_for_spec(spec, tmp_path / "home")
    assert caught.value.field == "judge.variant"
