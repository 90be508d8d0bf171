"""``make bench``: every benchmark on this machine, each printing JSON; results land in
``bench/out/`` (git-ignored). Side-by-side ratios are what to compare across machines; see
``bench/RESULTS.md`` for the recorded figures and the GPU runs.

    python bench/run_all.py            # CPU-sized workloads (minutes on a laptop)
    python bench/run_all.py --device cuda --full
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="the issues' full workloads")
    args = parser.parse_args()
    small = not args.full
    loader = ["--device", args.device]
    if small:
        loader += [
            "--prompts",
            "8",
            "--new-tokens",
            "8",
            "--sweep-coefs",
            "3",
            "--capture-copies",
            "2",
        ]
    steerer = ["--device", args.device]
    if small:
        steerer += [
            "--layers",
            "4",
            "--steps",
            "3",
            "--questions",
            "6",
            "--max-new-tokens",
            "12",
            "--probes",
            "3,1",
        ]
    runs = {
        "queue": [str(HERE / "bench_queue.py")] + (["--chain", "100", "--jobs", "200"] if small else []),
        "judge": [str(HERE / "bench_judge.py")],
        "loader_bf16": [str(HERE / "bench_loader.py"), "--precision", "bf16", *loader],
        "steerer_bf16": [str(HERE / "bench_steerer.py"), "--precision", "bf16", *steerer],
    }  # fmt: skip
    OUT.mkdir(exist_ok=True)
    failed = []
    for name, argv in runs.items():
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
        (OUT / f"{name}.json").write_text(done.stdout)
        print(done.stdout[-4000:])
        if done.returncode != 0:
            failed.append(name)
            print(done.stderr[-3000:], file=sys.stderr)
        print(f"   ({time.perf_counter() - start:.0f}s, rc {done.returncode})", flush=True)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
