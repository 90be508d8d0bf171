"""bench/multi_gpu_check.py, issue 20's one-command GPU check, dry-run on the CPU
(``--cpu-devices``): the whole command (bench children and the equality check over three CPU
labels) prints one JSON document whose split side equals the single side, and its arguments
are checked by name. The GPU run itself needs a multi-GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "multi_gpu_check.py"


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "QSENS_CACHE_DIR": str(tmp_path)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_the_whole_check_dry_runs_over_cpu_labels(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = _run(tmp_path, "--cpu-devices", "3", "--precision", "fp32", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report and set(report["part_s"]) == {"bench", "equality"}
    assert report["ok"] is True and report["mode"] == "cpu dry run over 3 labels"
    eq = report["equality"]
    assert eq["split_over"] == 3 and "layer-wise over 3 device(s)" in eq["placement"][0]
    assert eq["weights_equal"] is True and eq["generations_equal"] == "6/6"
    assert set(eq["max_abs_diff"]) == {"capture_mean", "capture_last", "score", "next_token"}
    assert max(eq["max_abs_diff"].values()) <= 1e-4 and eq["within_tolerance"] is True
    bench = report["bench"]
    for side, layers in (("split", 6), ("single", 3)):
        row = bench[side]
        assert "error" not in row, row
        assert f"layers={layers}&" in row["model"] and row["variant"] == "tiny-llama@fp32"
        for key in ("capture_over_forward", "steered_over_unsteered", "sweep_speedup"):
            assert row[key] > 0, (side, key)
        assert row["sweep_rows"] == 2 * 1 * 2  # layers x coefficients x prompts
    assert bench["split"]["parameters"] > bench["single"]["parameters"]


def test_bad_arguments_are_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.multi_gpu_check import main, parse_args

    for argv, message in (
        (["--parts", "equality,speed"], "--parts: speed not in placement, equality, bench"),
        (["--cpu-devices", "1"], "--cpu-devices: at least 2"),
    ):
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    args = parse_args(["--layers", "40"])
    assert args.big_model.startswith("tiny:llama?layers=40&hidden=8192&heads=64&kv_heads=8")
    assert "layers=16&" in args.small_model and args.equal_model == args.small_model
    with pytest.raises(SystemExit, match="fewer than 2 GPUs visible"):  # no GPU here
        main(["--parts", "placement"])
