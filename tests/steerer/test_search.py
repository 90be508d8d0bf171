"""The coefficient search state machine on its own: proposals, budgets and multi-probe steps.

A simulated cell is coherent below a collapse coefficient ``c*`` and incoherent at or above it;
its trait score rises with the coefficient, so the best coherent run sits just below ``c*``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

import pytest
from pydantic import ValidationError

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.spec import SearchSpec
from services.steerer.search import CoefficientSearch, Outcome

THRESHOLD = 70.0


def run(
    search: CoefficientSearch, collapse: Mapping[int, float]
) -> list[list[tuple[int, float, str]]]:
    """Drive the search to the end; the steps' proposals, in order."""
    steps: list[list[tuple[int, float, str]]] = []
    while not search.done:
        proposed = search.propose()
        steps.append([(c.layer, c.coefficient, c.phase) for c in proposed])
        search.observe(
            [
                Outcome(
                    c,
                    trait=min(100.0, 20.0 * c.coefficient),
                    coherence=90.0 if c.coefficient < collapse[c.layer] else 10.0,
                )
                for c in proposed
            ]
        )
    return steps


def test_one_probe_is_the_classic_walk() -> None:
    spec = SearchSpec(steps=6, fine_points=0, budget="equal", scale_up=2.0, scale_down=0.5)
    search = CoefficientSearch({3: 1.0}, spec, threshold=THRESHOLD)
    steps = run(search, {3: 5.0})
    coefficients = [c for [(_, c, _)] in steps]
    # Up while coherent (1, 2, 4), down from the first incoherent (8), then log bisection.
    assert coefficients[:4] == [1.0, 2.0, 4.0, 8.0]
    assert coefficients[4] == pytest.approx(math.sqrt(32.0))  # sqrt(4 * 8) = 5.66: incoherent
    assert coefficients[5] == pytest.approx(math.sqrt(4.0 * math.sqrt(32.0)))
    lo, hi = search.bracket(3)
    assert lo is not None and hi is not None and lo < 5.0 <= hi


@pytest.mark.parametrize("probes", [2, 3, 5])
def test_probes_spend_the_same_settings_in_fewer_steps(probes: int) -> None:
    spec = SearchSpec(steps=10, fine_points=2, budget="equal", probes=probes)
    collapse = {2: 3.3, 5: 0.9, 9: 40.0}
    search = CoefficientSearch({2: 0.5, 5: 0.5, 9: 0.5}, spec, threshold=THRESHOLD)
    steps = run(search, collapse)
    # Equal budget: every layer still spends exactly steps + fine_points settings ...
    assert search.runs_per_cell() == {2: 12, 5: 12, 9: 12}
    # ... in ceil(steps / probes) coarse steps plus one fine step.
    assert len(steps) == math.ceil(10 / probes) + 1
    for step in steps[:-1]:
        per_layer = Counter(layer for layer, _, phase in step if phase == "coarse")
        assert max(per_layer.values()) <= probes
    assert {phase for _, _, phase in steps[-1]} == {"fine"}
    # No setting is tried twice in a cell.
    for layer in collapse:
        tried = [o.coefficient for o in search.outcomes() if o.layer == layer]
        assert len(set(tried)) == len(tried)
    # The first step tries successive multiples of the start, as the walk would.
    first = sorted(c for layer, c, _ in steps[0] if layer == 2)
    assert first == pytest.approx([0.5 * spec.scale_up**i for i in range(probes)])
    # Every bracketed layer brackets its collapse, and the best run lies below it.
    for layer, c_star in collapse.items():
        lo, hi = search.bracket(layer)
        if hi is not None:
            assert lo is not None and lo < c_star <= hi, (layer, lo, hi)
    best = search.best_per_cell()
    for layer, c_star in collapse.items():
        assert best[layer] is not None and best[layer].coefficient < c_star  # type: ignore[union-attr]


def test_more_probes_bracket_tightly_in_fewer_steps() -> None:
    """Same 12 settings: 1 probe takes 12 steps, 4 probes take 3; both bracket c*, the walk
    more tightly (2x per setting once bracketed vs 5x per 4 settings)."""
    widths = {}
    for probes in (1, 4):
        spec = SearchSpec(steps=12, fine_points=0, budget="equal", probes=probes)
        search = CoefficientSearch({0: 0.4}, spec, threshold=THRESHOLD)
        steps = run(search, {0: 2.9})
        assert len(steps) == math.ceil(12 / probes)
        lo, hi = search.bracket(0)
        assert lo is not None and hi is not None and lo < 2.9 <= hi
        widths[probes] = hi / lo
    assert widths[1] < 1.01 and widths[4] < 1.1 and widths[1] < widths[4], widths


def test_bracketed_cell_probes_log_evenly_inside_the_bracket() -> None:
    spec = SearchSpec(steps=6, fine_points=0, budget="equal", probes=3, scale_up=2.0)
    search = CoefficientSearch({0: 1.0}, spec, threshold=THRESHOLD)
    first = search.propose()
    assert [c.coefficient for c in first] == [1.0, 2.0, 4.0]
    search.observe(
        [Outcome(c, trait=1.0, coherence=90.0 if c.coefficient < 3 else 5.0) for c in first]
    )
    second = [c.coefficient for c in search.propose()]
    # Bracket (2, 4): the interior quartiles in log space.
    assert second == pytest.approx([2 * 2 ** (i / 4) for i in (1, 2, 3)])


def test_adaptive_cells_stop_on_convergence_with_probes() -> None:
    spec = SearchSpec(steps=40, fine_points=3, budget="adaptive", probes=4)
    search = CoefficientSearch({0: 0.5, 1: 0.5}, spec, threshold=THRESHOLD, convergence=0.02)
    run(search, {0: 2.0, 1: 7.0})
    runs = search.runs_per_cell()
    assert all(n < 40 for n in runs.values()), runs
    for layer, c_star in ((0, 2.0), (1, 7.0)):
        lo, hi = search.bracket(layer)
        assert lo is not None and hi is not None
        assert lo < c_star <= hi and hi <= lo * 1.02


def test_bad_inputs_name_the_field() -> None:
    with pytest.raises(ValidationError, match="probes"):
        SearchSpec(probes=0)
    with pytest.raises(InvalidArgument, match=r"starts\[4\]"):
        CoefficientSearch({4: 0.0}, SearchSpec(), threshold=THRESHOLD)
    with pytest.raises(InvalidArgument, match="layers"):
        CoefficientSearch({}, SearchSpec(), threshold=THRESHOLD)
    search = CoefficientSearch({0: 1.0}, SearchSpec(probes=2), threshold=THRESHOLD)
    proposed = search.propose()
    with pytest.raises(FailedPrecondition):
        search.propose()
    with pytest.raises(InvalidArgument, match="outcomes"):
        search.observe([Outcome(proposed[0], trait=1.0, coherence=90.0)])


def test_non_monotone_coherence_keeps_moving_without_repeats() -> None:
    """Coherent above an incoherent run (lo > hi): the cell moves on from its latest run."""
    spec = SearchSpec(steps=9, fine_points=0, budget="equal", probes=3, scale_up=2.0)
    search = CoefficientSearch({0: 1.0}, spec, threshold=THRESHOLD)
    first = search.propose()  # 1, 2, 4: only 2 is incoherent
    search.observe(
        [Outcome(c, trait=1.0, coherence=10.0 if c.coefficient == 2.0 else 90.0) for c in first]
    )
    assert search.bracket(0) == (4.0, 2.0)
    second = search.propose()
    # The latest run (4) was coherent: keep scaling up from it.
    assert [c.coefficient for c in second] == [8.0, 16.0, 32.0]
    search.observe([Outcome(c, trait=1.0, coherence=90.0) for c in second])
    run(search, {0: 1e9})
    tried = [o.coefficient for o in search.outcomes()]
    assert len(tried) == 9 and len(set(tried)) == 9
