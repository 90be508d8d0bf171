"""The example study's submit Job ends with its run: its script (run through /bin/sh as the
pod does) waits for the run, exports the report, and exits with the run's status; the Job
fails at once on a failed run and retries only what a retry can fix.

`qsens` is a stand-in on PATH here that records its arguments and exits with the code the test
gives it: what is under test is the script's control flow and the Job's failure policy (the
commands themselves parse with the real CLI in test_settings_cli)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.manifests import SHELL, container_env, pods


def _job(renders: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    docs = renders["example-study-submit"]
    pod = next(p for p in pods(docs) if p.labels["app.kubernetes.io/component"] == "submit")
    (c,) = pod.spec["containers"]
    return pod.owner, c


def _run_script(
    container: dict[str, Any], env: dict[str, str], tmp: Path, run_code: int, report_code: int
) -> tuple[int, list[str]]:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp / "calls"
    calls.write_text("")
    stand_in = bin_dir / "qsens"
    stand_in.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        f'case "$1" in run) exit {run_code} ;; report) exit {report_code} ;; esac\n'
        "exit 99\n"
    )
    stand_in.chmod(0o755)
    assert container["command"] == SHELL
    out = subprocess.run(
        [*container["command"], *container["args"]],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.returncode, calls.read_text().splitlines()


@pytest.mark.parametrize(
    ("run_code", "report_code", "exit_code", "reported"),
    [
        (0, 0, 0, True),  # succeeded: report in S3, Job complete
        (1, 0, 1, True),  # failed: report of what there is, Job failed
        (1, 2, 1, True),  # failed, report not exported either: still the run's status
        (0, 2, 3, True),  # succeeded but no report: retried
        (2, 0, 2, False),  # could not follow the run (NATS down): retried, nothing exported
    ],
)
def test_script_exits_with_the_runs_status(
    renders: dict[str, list[dict[str, Any]]],
    tmp_path: Path,
    run_code: int,
    report_code: int,
    exit_code: int,
    reported: bool,
) -> None:
    docs = renders["example-study-submit"]
    _, c = _job(renders)
    env = {k: v for k, v in container_env(docs, c).items() if k == "RUN_ID"}
    code, calls = _run_script(c, env, tmp_path, run_code, report_code)
    assert code == exit_code, calls
    run_id = env["RUN_ID"]
    assert calls[0] == f"run /etc/qsens/spec/study.yaml --run-id {run_id}"
    assert calls[1:] == ([f"report {run_id} --out /tmp/report"] if reported else [])


def test_failed_run_fails_the_job_without_retry(renders: dict[str, list[dict[str, Any]]]) -> None:
    job, c = _job(renders)
    spec = job["spec"]
    (rule,) = spec["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob"
    assert rule["onExitCodes"] == {"containerName": c["name"], "operator": "In", "values": [1]}
    # podFailurePolicy needs restartPolicy Never; other failures are retried a few times.
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["backoffLimit"] >= 3
    # The Job waits as long as a study runs (hours), not the minutes a submission takes.
    assert spec["activeDeadlineSeconds"] >= 24 * 3600
    assert os.path.basename(c["command"][0]) == "sh"
