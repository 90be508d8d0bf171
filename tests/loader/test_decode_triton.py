"""The Triton decode attention kernel in Triton's interpreter, in a child process.

Triton reads ``TRITON_INTERPRET`` when it is imported, and torch imports Triton early in this
suite, so the interpreted checks (``interpreted_decode_triton.py``, see its docstring) run in
a fresh interpreter with the variable set from the start.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_triton_decode_kernel_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests" / "loader" / "interpreted_decode_triton.py"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,  # within the suite's 300 s per test; the child takes ~10 s
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert re.search(r"\b10 passed\b", output), output
    assert not re.search(r"\d+ (failed|skipped|error)", output), output
