"""``qsens report RUN`` end to end: a real CLI process against the real S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from services.common.store import S3Store
from tests.analyzer.planted import write_planted_run
from tests.conftest import PlaneEnv

REPO = Path(__file__).resolve().parents[2]


def _report(run_id: str, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", "report", run_id, "--out", str(out)],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_report_command_writes_and_downloads_the_report(
    store: S3Store, s3_env: PlaneEnv, tmp_path: Path
) -> None:
    run_id = "cli-" + uuid.uuid4().hex[:10]
    write_planted_run(store, run_id)
    done = _report(run_id, tmp_path / "out", s3_env.env)
    assert done.returncode == 0, done.stderr[-3000:]
    html = tmp_path / "out" / "report.html"
    assert html.exists() and "<img" in html.read_text()
    assert (tmp_path / "out" / "report.md").read_text().startswith("#")
    comparison = json.loads((tmp_path / "out" / "vector_comparison.json").read_text())
    assert comparison  # the planted run has vectors to compare
    # Nothing in the run's own analysis/ was written: an on-demand report has its own folder.
    keys = store.list_keys(f"runs/{run_id}/analysis/")
    assert keys and all("/analysis/report-" in k for k in keys)


def test_report_of_an_unknown_run_is_a_clear_error(s3_env: PlaneEnv, tmp_path: Path) -> None:
    done = _report("no-such-run-" + uuid.uuid4().hex[:6], tmp_path / "out", s3_env.env)
    assert done.returncode == 2
    assert "error" in done.stderr.lower() and "no-such-run" in done.stderr
    assert not (tmp_path / "out").exists()
