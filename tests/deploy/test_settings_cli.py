"""The manifests speak the services' language: every QSENS_* variable is a settings field and
parses, and every container's command line parses with the real `qsens` CLI."""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from services.cli import main as cli_main
from services.cli.worker import SERVICES
from services.common import settings as settings_mod
from services.common.variants import Variant
from services.common.worker import load_handler
from tests.deploy.manifests import K8S, container_env, is_qsens, pods, qsens_invocations

# Variables a qsens container may carry that are not QSENS_* settings, and why.
NON_SETTINGS = {
    "VARIANT_MODEL_SOURCE": "loader --model, through $(VAR) in its args",
    "VARIANT_MODEL_NAME": "loader --name",
    "VARIANT_PRECISION": "loader --precision",
    "VARIANT_DEVICE": "loader --device",
    "VARIANT_QUANTIZE": "loader --quantize (gptq/awq made by the platform), from an annotation",
    "HF_TOKEN": "huggingface_hub's token for gated models",
    "RUN_ID": "the submit Job's run id, used by its script's `qsens run` and `qsens report`",
    "HF_HUB_OFFLINE": "huggingface_hub: never reach the hub (components/model-cache)",
    "MODEL_ID": "the model stage Job's hub id, used by its script's `hf download`",
    "MODEL_NAME": "the model stage Job's `qsens models put --name`",
}


# The loader authentication contract's variables, read by services/common/auth.py (not a
# settings class): the token (or the file holding it, as the manifests mount it) and TLS files.
AUTH_ENV = {
    "QSENS_LOADER_TOKEN",
    "QSENS_LOADER_TOKEN_FILE",
    "QSENS_LOADER_TLS_CERT",
    "QSENS_LOADER_TLS_KEY",
    "QSENS_LOADER_TLS_CA",
}


def _settings_classes() -> list[type[BaseSettings]]:
    classes = [getattr(settings_mod, n) for n in settings_mod.__all__]
    return [c for c in classes if isinstance(c, type) and issubclass(c, BaseSettings)]


def settings_env_names() -> set[str]:
    """Every environment variable the settings classes read: prefix + field name, and the
    aliases a field accepts from the environment."""
    names: set[str] = set()
    for cls in _settings_classes():
        prefix = str(cls.model_config.get("env_prefix", ""))
        for field_name, field in cls.model_fields.items():
            names.add((prefix + field_name).upper())
            alias = field.validation_alias
            if isinstance(alias, AliasChoices):
                names.update(a for a in alias.choices if isinstance(a, str) and a.isupper())
    return names | AUTH_ENV


def test_settings_names_are_read_from_the_classes() -> None:
    names = settings_env_names()
    # A handful the manifests rely on, so a broken parser cannot pass the tests below.
    assert {"QSENS_NATS_URL", "QSENS_S3_ENDPOINT", "QSENS_LOADER_GRACE_PERIOD_S"} <= names
    assert {"QSENS_JUDGE_API_KEY_FILE", "OPENAI_API_KEY", "QSENS_METRICS_HOST"} <= names
    assert "QSENS_NO_SUCH_SETTING" not in names


def _env_file_keys(text: str) -> set[str]:
    return {
        line.split("=", 1)[0].strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }


def test_committed_env_files_name_real_settings() -> None:
    names = settings_env_names()
    files = [
        K8S / "base" / "config" / "common.env",
        *sorted((K8S / "base" / "secrets").glob("*.example")),
    ]
    for path in files:
        for key in _env_file_keys(path.read_text()):
            if key.startswith("QSENS_"):
                assert key in names, f"{path.name}: {key} is not a setting"


def test_container_variables_are_settings(renders: dict[str, list[dict[str, Any]]]) -> None:
    names = settings_env_names()
    seen: set[str] = set()
    for target, docs in renders.items():
        for pod in pods(docs):
            for c in pod.containers():
                if not is_qsens(c):
                    continue
                env = container_env(docs, c)
                args = " ".join(c.get("args", []))
                for key in env:
                    seen.add(key)
                    if key.startswith("QSENS_") or key == "OPENAI_API_KEY":
                        assert key in names, f"{target}: {pod.name}: {key} is not a setting"
                    else:
                        assert key in NON_SETTINGS, f"{target}: {pod.name}: unexpected {key}"
                        if key.startswith("VARIANT_"):
                            assert f"$({key})" in args, f"{target}: {pod.name}: {key} unused"
                        if key in ("RUN_ID", "MODEL_ID", "MODEL_NAME"):
                            assert f'"${key}"' in args, f"{target}: {pod.name}: {key} unused"
    assert {"QSENS_NATS_PASSWORD", "QSENS_S3_SECRET_KEY", "VARIANT_PRECISION"} <= seen


def test_container_settings_parse(
    renders: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment of each qsens container builds every settings class without error."""
    import os

    checked = 0
    for target, docs in renders.items():
        for pod in pods(docs):
            for c in pod.containers():
                if not is_qsens(c):
                    continue
                for key in list(os.environ):
                    if key.startswith("QSENS_") or key == "OPENAI_API_KEY":
                        monkeypatch.delenv(key)
                for key, value in container_env(docs, c).items():
                    monkeypatch.setenv(key, value)
                settings_mod.reset()
                for cls in _settings_classes():
                    try:
                        cls()
                    except Exception as err:  # pydantic's ValidationError, with the field
                        pytest.fail(f"{target}: {pod.name}: {cls.__name__}: {err}")
                checked += 1
    settings_mod.reset()
    assert checked >= 10


def _cli() -> Any:
    cli_main._register()
    return typer.main.get_command(cli_main.app)


def parse_command_line(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """(sub-command path, parameters) as the real `qsens` CLI parses ``args``; raises the
    CLI's UsageError on an unknown command or option or a missing parameter."""
    cmd, ctx, path, rest = _cli(), None, [], list(args)
    while True:
        ctx = cmd.make_context(path[-1] if path else "qsens", rest, parent=ctx)
        if not hasattr(cmd, "resolve_command"):
            return path, dict(ctx.params)
        name, cmd, rest = cmd.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        path.append(name)


def test_parser_rejects_what_qsens_rejects() -> None:
    """The parsing helper fails where the CLI fails (so passing below means something)."""
    path, params = parse_command_line(["serve", "loader", "--model", "tiny:llama"])
    assert path == ["serve", "loader"] and params["model"] == "tiny:llama"
    for bad in (["serve", "loader", "--no-such-option"], ["no-such-command"], ["serve", "loader"]):
        with pytest.raises(Exception, match=r"(?i)no such|missing"):
            parse_command_line(bad)


def _command_lines(
    renders: dict[str, list[dict[str, Any]]],
) -> list[tuple[str, str, list[str]]]:
    out = []
    for target, docs in renders.items():
        for pod in pods(docs):
            for c in pod.containers():
                if is_qsens(c):
                    # `qsens` is the entrypoint, or a Job's shell script calls it.
                    env = container_env(docs, c)
                    for args in qsens_invocations(c, env):
                        out.append((target, pod.name, args))
    return out


def test_container_command_lines_parse(renders: dict[str, list[dict[str, Any]]]) -> None:
    commands: set[tuple[str, ...]] = set()
    seen: set[tuple[str, ...]] = set()
    for target, pod, args in _command_lines(renders):
        assert not any("$(" in a for a in args), f"{target}: {pod}: unexpanded {args}"
        # Targets share most command lines (the base's workers): parse each one once.
        if tuple(args) in seen:
            continue
        seen.add(tuple(args))
        try:
            path, params = parse_command_line(args)
        except Exception as err:
            pytest.fail(f"{target}: {pod}: `qsens {' '.join(args)}`: {err}")
        commands.add(tuple(path))
        if path == ["worker", "run"]:
            # The service exists and its handler imports (what `qsens worker run` does first).
            assert params["service"] in SERVICES, f"{target}: {pod}"
            load_handler(SERVICES[params["service"]][1])
        if path == ["serve", "loader"]:
            # A valid variant id (raises InvalidArgument otherwise); workers find it announced.
            Variant.parse(f"{params['name']}@{params['precision']}")
            assert params["announce"] is True, f"{target}: {pod}"
            assert params["device"] in ("cuda", "cpu"), f"{target}: {pod}"
    assert {("serve", "loader"), ("worker", "run"), ("judge", "serve"), ("run",)} <= commands


def test_every_worker_service_is_deployed(renders: dict[str, list[dict[str, Any]]]) -> None:
    services = {
        params["service"]
        for _, _, args in _command_lines({"base": renders["base"]})
        for path, params in [parse_command_line(args)]
        if path == ["worker", "run"]
    }
    assert services == set(SERVICES)


def test_judge_key_is_a_mounted_secret(renders: dict[str, list[dict[str, Any]]]) -> None:
    """The openai judge reads its key from QSENS_JUDGE_API_KEY_FILE, a file of the qsens-judge
    Secret; no container has the key in its environment."""
    for target, docs in renders.items():
        for pod in pods(docs):
            for c in pod.containers():
                env = container_env(docs, c)
                assert "OPENAI_API_KEY" not in env and "QSENS_JUDGE_API_KEY" not in env
                if "QSENS_JUDGE_API_KEY_FILE" not in env:
                    continue
                folder, _, filename = env["QSENS_JUDGE_API_KEY_FILE"].rpartition("/")
                mount = next(m for m in c["volumeMounts"] if m["mountPath"] == folder)
                volume = next(v for v in pod.spec["volumes"] if v["name"] == mount["name"])
                assert re.match(r"qsens-judge-", volume["secret"]["secretName"]), target
                assert {"key": "OPENAI_API_KEY", "path": filename} in volume["secret"]["items"]
