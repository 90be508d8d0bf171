"""A spec that asks for more steering questions than a steered trait holds is refused at plan
time, naming ``steering.questions`` or ``steering.held_out`` (issue 17, n = 20): the steerer
would otherwise judge fewer questions than the spec says, without a word."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli.runs import app, preflight
from services.common.errors import InvalidArgument
from services.common.planner import build_plan
from services.common.spec import ExperimentSpec, SteeringSpec, load_spec
from services.extractor.datasets import BUILTIN_TRAITS, builtin_dir

BASE = """
name: questions
models:
  - {name: tiny, source: "tiny:llama", device: cpu}
precisions: [fp32]
reference: fp32
"""


def _spec(tmp_path: Path, body: str) -> ExperimentSpec:
    path = tmp_path / "spec.yaml"
    path.write_text(BASE + body)
    return load_spec(path)


def _small_trait(tmp_path: Path, n_eval: int) -> str:
    """A persona-vectors trait of one's own with ``n_eval`` steering questions."""
    (tmp_path / "mine.json").write_text((builtin_dir() / "pv" / "evil.json").read_text())
    extras = {"eval_questions": [f"Steering question number {i}?" for i in range(n_eval)]}
    (tmp_path / "mine.extras.json").write_text(json.dumps(extras))
    return f"pv:{tmp_path / 'mine.json'}"


def test_the_defaults_fit_every_built_in_trait(tmp_path: Path) -> None:
    steering = SteeringSpec()
    assert (steering.questions, steering.held_out) == (20, 20)
    spec = _spec(tmp_path, f"traits: [{', '.join(BUILTIN_TRAITS)}]\n")
    preflight(spec, cluster=False)  # no error: every built-in holds 40


@pytest.mark.parametrize(
    ("steering", "field", "needed"),
    [
        ("{questions: 41, held_out: 0}", "steering.questions", "41 asked"),
        ("{questions: 30}", "steering.held_out", "need 50"),
        ("{questions: null}", "steering.held_out", "need 60"),
    ],
)
def test_asking_a_built_in_for_more_than_it_holds_names_the_field(
    tmp_path: Path, steering: str, field: str, needed: str
) -> None:
    spec = _spec(tmp_path, f"traits: [pv/evil]\nsteering: {steering}\n")
    with pytest.raises(InvalidArgument) as err:
        preflight(spec, cluster=False)
    assert err.value.field == field
    assert needed in err.value.message and "pv/evil has 40" in err.value.message


def test_only_steered_traits_must_hold_the_questions(tmp_path: Path) -> None:
    ref = _small_trait(tmp_path, 30)
    traits = f"traits: [pv/evil, '{ref}']\n"
    with pytest.raises(InvalidArgument) as err:
        preflight(_spec(tmp_path, traits), cluster=False)
    assert err.value.field == "steering.held_out" and "pv/mine has 30" in err.value.message
    # Fits when asked for less, or when the small trait is not steered.
    preflight(_spec(tmp_path, traits + "steering: {questions: 15, held_out: 15}\n"), cluster=False)
    preflight(_spec(tmp_path, traits + "steering: {traits: [pv/evil]}\n"), cluster=False)
    preflight(_spec(tmp_path, traits + "steering: {enabled: false}\n"), cluster=False)


def test_qsens_plan_refuses_it_before_printing_a_plan(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(BASE + "traits: [caa/sycophancy]\nsteering: {questions: 25}\n")
    result = CliRunner().invoke(app, ["plan", str(path), "--local"])
    assert result.exit_code != 0
    assert "steering.held_out" in result.output and "jobs" not in result.output


def test_no_noise_floor_is_planned_without_held_out_questions(tmp_path: Path) -> None:
    """The noise floor's seed replicates run on held-out questions: with none, no steer job
    is flagged for it (it would measure nothing), and with them the reference's is."""
    for held_out, flagged in ((0, False), (4, True)):
        spec = _spec(tmp_path, f"traits: [pv/evil]\nsteering: {{held_out: {held_out}}}\n")
        steer = [j for j in build_plan(spec, "run-noise").jobs if j.kind == "steer"]
        assert steer and any(j.params.get("noise_floor") for j in steer) is flagged
