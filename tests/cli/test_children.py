"""The processes `qsens up --spec` starts for the demo spec."""

from __future__ import annotations

from pathlib import Path

from services.cli.runs import children_for_spec

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"


def test_demo_stack_children(tmp_path: Path) -> None:
    children = {c.name: c for c in children_for_spec(DEMO, tmp_path)}
    loaders = sorted(n for n in children if n.startswith("loader-"))
    assert loaders == [
        f"loader-smollm2-135m@{p}" for p in sorted(["bf16", "nf4", "int8", "gptq", "awq"])
    ]
    # GPTQ/AWQ loaders wait for the run's quantize jobs: `up` must not wait for them.
    assert children["loader-smollm2-135m@gptq"].ready_file is None
    assert children["loader-smollm2-135m@bf16"].ready_file is not None
    assert "--quantize" in children["loader-smollm2-135m@awq"].argv
    steerer = children["worker-steerer"].argv
    assert steerer[-2:] == ["--concurrency", "2"]
    assert children["worker-extractor"].argv[-2:] == ["--concurrency", "2"]
    assert "--concurrency" not in children["worker-analyzer"].argv
    assert {"worker-quantizer", "worker-analyzer", "judge"} <= set(children)
