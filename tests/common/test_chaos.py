"""Chaos (issue 15, "The suite that keeps it so"): a real study — extraction, steering, logit
difference, benchmarks, probes, analysis on tiny models — on a private local stack while a
worker, a loader and NATS are SIGKILLed, another worker later, and S3 is frozen (SIGSTOP) for
8 s. Nothing restarts them but the stack's own supervisor. The run must succeed with every job
done once, the same artefact keys and the same analysis numbers as the undisturbed golden run
(tests/analyzer/golden/), and no process may die that was not killed.

Bootstrap interval bounds are left to tests/analyzer/test_golden.py: their seed scheme changes
under issue 15 item 7, and until the fixture is re-recorded they differ from it in undisturbed
runs too (measured: 25 bounds, every point estimate equal). Everything else is compared.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.analyzer import golden_run as golden
from tests.common import chaos


# The run is bounded by chaos.RUN_TIMEOUT_S (240 s); stack start and stop come on top.
@pytest.mark.timeout(480)
def test_study_survives_kills_and_a_frozen_s3(tmp_path: Path) -> None:
    outcome = chaos.run(tmp_path, faults=True)
    want_docs, want_keys = golden.load_fixture()
    numbers = outcome.numbers(want_keys)

    assert len(outcome.fired) == len(chaos.FAULTS), f"run ended before every fault: {numbers}"
    assert outcome.status == "succeeded", numbers
    for _, action, name, _ in chaos.FAULTS:
        if action == "kill":  # restarted by the supervisor, not by this test
            assert outcome.restarts.get(name, 0) >= 1, (name, outcome.restarts)
    assert numbers["lost"] == 0 and numbers["hangs"] == 0, numbers
    assert numbers["crashes"] == 0, (numbers, outcome.last_exit)
    assert outcome.keys == want_keys, (
        f"missing {sorted(set(want_keys) - set(outcome.keys))[:10]}, "
        f"new {sorted(set(outcome.keys) - set(want_keys))[:10]}"
    )
    assert sorted(outcome.docs) == sorted(want_docs)
    # The same numbers as an undisturbed run on this machine class (golden_run's docstring).
    closest, diff = golden.closest_recording(outcome.docs, intervals=False)
    assert not diff, f"closest recording {closest}: {len(diff)} differences:\n" + "\n".join(
        diff[:30]
    )
