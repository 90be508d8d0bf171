"""The judge is chosen once: the spec's section and the service's settings share one model."""

from __future__ import annotations

import pytest

from services.cli.judge_cmd import _settings
from services.common.judging import JudgeChoice
from services.common.settings import JudgeSettings
from services.common.spec import JudgeSpec


def test_spec_and_settings_declare_the_choice_once() -> None:
    assert issubclass(JudgeSpec, JudgeChoice) and issubclass(JudgeSettings, JudgeChoice)
    for name in ("backend", "model", "base_url", "variant", "end_of_turn"):
        shared = repr(JudgeChoice.model_fields[name])  # FieldInfo has no value equality
        assert repr(JudgeSpec.model_fields[name]) == shared
        assert repr(JudgeSettings.model_fields[name]) == shared
    assert set(JudgeSpec.model_fields) == {
        "backend",
        "model",
        "base_url",
        "variant",
        "end_of_turn",
        "coherence_threshold",
    }


def test_unset_loader_fields_leave_dumps_and_fingerprints_alone() -> None:
    # Specs written before the loader judge keep their dumps, so their fingerprints (run ids,
    # bootstrap seeds) and job ids do not move.
    assert JudgeSpec().model_dump() == {
        "backend": "embedding",
        "model": "gpt-4.1-mini",
        "base_url": None,
        "coherence_threshold": 70.0,
    }
    loader = JudgeSpec(backend="loader", variant="m@bf16").model_dump()
    assert loader["variant"] == "m@bf16" and "end_of_turn" not in loader


def test_settings_derive_from_the_spec_section_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QSENS_JUDGE_BACKEND", "embedding")
    monkeypatch.setenv("QSENS_JUDGE_MODEL", "env-model")
    monkeypatch.setenv("QSENS_JUDGE_CONCURRENCY", "7")
    spec = JudgeSpec(backend="openai", model="judge-x", base_url="https://api.example/v1")
    settings = JudgeSettings.for_choice(spec)
    assert settings.choice() == spec.choice()
    assert settings.concurrency == 7  # the service's own settings still come from the env
    assert JudgeSettings().model == "env-model"


@pytest.mark.parametrize(
    "spec",
    [
        JudgeSpec(),
        JudgeSpec(backend="openai", model="judge-x"),
        JudgeSpec(backend="openai", model="judge-x", base_url="http://127.0.0.1:9/v1"),
        JudgeSpec(backend="loader", variant="smollm2-135m@bf16"),
        JudgeSpec(backend="loader", variant="smollm2-135m@bf16", end_of_turn="<|eot_id|>"),
    ],
)
def test_serve_args_select_the_same_judge_in_the_service(spec: JudgeSpec) -> None:
    args = spec.serve_args()
    options = dict(zip(args[::2], args[1::2], strict=True))
    served = _settings(
        backend=options.get("--backend"),
        model=options.get("--model"),
        base_url=options.get("--base-url"),
        variant=options.get("--loader-variant"),
        end_of_turn=options.get("--end-of-turn"),
    )
    if spec.backend == "loader":
        assert served.backend == "loader" and served.variant == spec.variant
        assert served.end_of_turn == spec.end_of_turn
    elif spec.backend == "openai":
        assert served.choice() == spec.choice()
    else:
        assert served.backend == "embedding" and "--model" not in options
