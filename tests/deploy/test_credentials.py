"""No credential is committed or defaulted: Secrets come from generated, git-ignored files,
and every password reaches a process through a Secret."""

from __future__ import annotations

import fnmatch
import json
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

from tests.deploy.manifests import DEPLOY, DOCKER, K8S, REPO, container_env, data_of, of_kind, pods

# Well-known default credentials (MinIO, NATS examples, generic) that must appear nowhere as
# a value. The MinIO default is spelled in two parts so this detector is not itself a hit for
# repository-wide credential scans.
MINIO_DEFAULT = "minio" + "admin"
DEFAULTS = (MINIO_DEFAULT, "admin", "password", "changeme", "change-me", "secret", "qsens", "nats")
CREDENTIAL_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY|ROOT_USER|_USER)$")
SECRET_FILES = ("nats.env", "s3.env", "minio-root.env", "loader-token.env", "judge.env", "hf.env")


def _committed_files() -> list[Path]:
    roots = [DEPLOY, DOCKER]
    files = [p for root in roots for p in root.rglob("*") if p.is_file()]
    files += [REPO / ".dockerignore", REPO / ".hadolint.yaml"]
    # A developer's generated credentials (git-ignored) are not part of the repository.
    return [p for p in files if not (p.parent.name == "secrets" and p.suffix == ".env")]


_ASSIGNMENT = re.compile(
    r"""(?ix)
    (user(name)?|password|passwd|secret(_key)?|access_key|root_user|root_password|token)
    ["']?\s*[:=]\s*["']?(?P<value>[^"'\s#]+)""",
)


def default_credentials(text: str) -> list[str]:
    """Assignments of a well-known default to a credential-like name in ``text``."""
    found = [m.group(0) for m in _ASSIGNMENT.finditer(text) if m.group("value").lower() in DEFAULTS]
    return found + ([MINIO_DEFAULT] if MINIO_DEFAULT in text.lower() else [])


def test_default_credential_finder_finds_them() -> None:
    for bad in (
        f"MINIO_ROOT_USER={MINIO_DEFAULT}",
        "password: admin",
        'user: "nats"',
        "token=secret",
    ):
        assert default_credentials(bad), bad
    for fine in ("password: $QSENS_NATS_PASSWORD", "QSENS_NATS_PASSWORD=", "user: $(USER)"):
        assert not default_credentials(fine), fine


def test_no_default_credentials_anywhere() -> None:
    for path in _committed_files():
        assert not default_credentials(path.read_text()), path.relative_to(REPO)


def test_example_secret_files_carry_no_values() -> None:
    examples = sorted((K8S / "base" / "secrets").glob("*.env.example"))
    assert {p.name.removesuffix(".example") for p in examples} == set(SECRET_FILES)
    for path in examples:
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition("=")
                assert value == "", f"{path.name}: {key} has a value"


def test_secret_files_are_git_ignored() -> None:
    folder = K8S / "base" / "secrets"
    for name in SECRET_FILES:
        out = subprocess.run(
            ["git", "check-ignore", "-q", str(folder / name)], cwd=REPO, capture_output=True
        )
        assert out.returncode == 0, f"{name} would be committed"
    out = subprocess.run(
        ["git", "check-ignore", "-q", str(folder / "nats.env.example")],
        cwd=REPO,
        capture_output=True,
    )
    assert out.returncode == 1, "the examples must be committed"


def test_generated_secrets_are_random_private_and_kept(k8s_copy: Path) -> None:
    folder = k8s_copy / "base" / "secrets"
    values: list[str] = []
    for name in ("nats.env", "s3.env", "minio-root.env", "loader-token.env"):
        path = folder / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
        for line in path.read_text().splitlines():
            key, _, value = line.partition("=")
            # nats.conf reads the NATS values as tokens: letters and digits, a letter first.
            assert re.fullmatch(r"[a-z][a-z0-9]{11,}", value), f"{name}: {key}"
            values.append(value)
    assert len(set(values)) == len(values), "every credential is different"
    before = {p.name: p.read_text() for p in folder.glob("*.env")}
    script = k8s_copy / "scripts" / "generate-secrets.sh"
    subprocess.run(["sh", str(script)], check=True, capture_output=True, timeout=60)
    assert {p.name: p.read_text() for p in folder.glob("*.env")} == before, "existing files kept"


def test_credentials_only_come_from_secrets(renders: dict[str, list[dict[str, Any]]]) -> None:
    """No credential-like variable has a literal value in a manifest, ConfigMaps hold none,
    and the rendered Secrets hold the generated values, not defaults."""
    for target, docs in renders.items():
        for pod in pods(docs):
            for c in pod.containers():
                for item in c.get("env", []):
                    if CREDENTIAL_NAME.search(item["name"]):
                        assert "value" not in item, f"{target}: {pod.name}: {item['name']}"
        for cm in of_kind(docs, "ConfigMap"):
            for key in data_of(cm):
                assert not CREDENTIAL_NAME.search(key), f"{target}: {cm['metadata']['name']}: {key}"
        for secret in of_kind(docs, "Secret"):
            for key, value in data_of(secret).items():
                assert value.lower() not in DEFAULTS, f"{target}: {key}"


def test_processes_get_the_credentials_they_need(renders: dict[str, list[dict[str, Any]]]) -> None:
    """Client and server share one Secret: NATS and its clients read the same user/password,
    the setup Job and the workers the same S3 keys; MinIO's root reaches no qsens process."""
    docs = renders["example-study"]
    by_component: dict[str, dict[str, str]] = {}
    s3_loaders: set[str] = set()
    for pod in pods(docs):
        for c in pod.containers():
            env = container_env(docs, c)
            component = pod.labels["app.kubernetes.io/component"]
            if component == "loader" and "QSENS_S3_SECRET_KEY" in env:
                # Loaders read weights from S3: model folders and platform-made checkpoints.
                s3_loaders.add(pod.labels["qsens.io/precision"])
            by_component.setdefault(component, {}).update(env)
    nats = by_component["nats"]
    for component in ("loader", "extractor", "steerer", "analyzer", "judge"):
        env = by_component[component]
        assert env["QSENS_NATS_PASSWORD"] == nats["QSENS_NATS_PASSWORD"], component
        assert "MINIO_ROOT_PASSWORD" not in env, component
    for component in ("extractor", "steerer", "analyzer", "quantizer", "minio-setup", "loader"):
        env = by_component[component]
        assert env["QSENS_S3_SECRET_KEY"] == by_component["minio-setup"]["QSENS_S3_SECRET_KEY"]
    # Every loader (and the gptq/awq init containers) reads S3.
    assert s3_loaders == {"bf16", "nf4", "int8", "gptq", "awq"}
    assert (
        by_component["minio"]["MINIO_ROOT_PASSWORD"]
        == by_component["minio-setup"]["MINIO_ROOT_PASSWORD"]
    )


def test_setup_script_is_valid_shell() -> None:
    script = K8S / "base" / "minio" / "setup.sh"
    for shell in ("sh", "bash"):
        subprocess.run([shell, "-n", str(script)], check=True, timeout=30)
    text = script.read_text()
    assert "mb --ignore-existing" in text


def test_qsens_s3_user_cannot_delete_artefacts() -> None:
    """The policy setup.sh gives the qsens user: read, list and create objects; delete only
    the store's write-once probe (_qsens/...) and quantize attempts' parts, never runs/... or a
    checkpoint's manifest."""
    text = (K8S / "base" / "minio" / "setup.sh").read_text()
    body = text.split("<<POLICY\n", 1)[1].split("\nPOLICY\n", 1)[0]
    policy = json.loads(body.replace("${bucket}", "qsens"))
    allowed: dict[str, set[str]] = {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        for action in statement["Action"]:
            allowed.setdefault(action, set()).update(statement["Resource"])
    assert allowed["s3:DeleteObject"] == {
        "arn:aws:s3:::qsens/_qsens/*",
        "arn:aws:s3:::qsens/quantized/*/parts-*",
    }
    deletable = [r.removeprefix("arn:aws:s3:::qsens/") for r in allowed["s3:DeleteObject"]]
    for key in ("runs/r1/plan.json", "quantized/gptq-w4g128-abc/manifest.json", "models/m/x"):
        assert not any(fnmatch.fnmatchcase(key, pattern) for pattern in deletable), key
    part = "quantized/gptq-w4g128-abc/parts-1a2b/model.safetensors"
    assert any(fnmatch.fnmatchcase(part, pattern) for pattern in deletable)
    assert allowed["s3:PutObject"] == allowed["s3:GetObject"] == {"arn:aws:s3:::qsens/*"}
    assert set(allowed) == {
        "s3:ListBucket",
        "s3:GetBucketLocation",
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
    }
