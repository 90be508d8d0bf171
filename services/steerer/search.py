"""The coefficient search as a pure state machine: given each step's results it proposes the next.

A *cell* is one candidate layer. Coefficients are positive magnitudes (the direction's sign is
carried by the vector). A *step* proposes up to ``probes`` coefficients per cell, so a step is
one batch of ``cells x probes x questions`` rows for the loader and one batch for the judge.

Coarse phase, per cell, for ``steps`` settings: start at the given coefficient; while the mean
coherence holds (``>= threshold``) multiply by ``scale_up``, when it breaks multiply by
``scale_down``; once one coherent and one incoherent coefficient bracket the collapse, propose
points inside the bracket (bisection in log space), so the cell converges on the largest
coherent coefficient rather than oscillating between two multiples.

``probes = 1`` is the classic sequential walk: one coefficient per cell per step. With ``probes
= k`` a step tries ``k`` coefficients of a cell at once: ``k`` successive multiples while the
cell is unbracketed (exactly the settings the walk would try next while the outcome keeps
pointing the same way) and the ``k`` log-evenly spaced interior points of the bracket once it
has one (a ``(k+1)``-ary search). The same ``steps`` settings then take ``ceil(steps / k)``
sequential loader/judge rounds instead of ``steps``; the price is a slightly wider final
bracket per setting spent (``(k+1)`` per ``k`` settings instead of ``2`` per setting).

Fine phase: coefficients ``centre * (1 + width * k / m)`` for ``k = +-1 .. +-m`` (nearest
first, below before above), ``m = ceil(fine_points / 2)``, around the best coherent run.

Budgets (``SearchSpec.budget``):

* ``equal``: every cell spends exactly ``budget_runs`` settings (default ``steps +
  fine_points``): ``min(steps, budget)`` coarse settings, the rest as a fine sweep around the
  cell's own best (or below its lowest coefficient when none was coherent). No early stop, so
  best-of-N compares like with like across cells, variants and precisions.
* ``adaptive``: a cell stops once its bracket is narrower than ``convergence``; then one fine
  sweep of ``fine_points`` around the overall best (layer, coefficient). Cells end up with
  different numbers of runs; ``runs_per_cell`` records them.

A run is *eligible* for best when enough of its answers were scored (the caller decides), and
*coherent* when it is eligible on coherence and its mean coherence reaches the threshold. The
best run maximises the mean trait score (or minimises it for steering away) among coherent
runs, ties broken by higher coherence, then by the smaller coefficient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.spec import SearchSpec

__all__ = [
    "Candidate",
    "CoefficientSearch",
    "Outcome",
    "Phase",
    "best_outcome",
    "fine_offsets",
    "is_coherent",
]

Phase = Literal["coarse", "fine"]

_SAME = 1e-9  # relative tolerance under which two coefficients are the same setting


@dataclass(frozen=True)
class Candidate:
    """One proposed setting: a coefficient at a layer, in a phase, at a search step."""

    layer: int
    coefficient: float
    phase: Phase
    step: int


@dataclass(frozen=True)
class Outcome:
    """What the judge made of one candidate's answers (means over scored answers)."""

    candidate: Candidate
    trait: float | None
    coherence: float | None
    eligible: bool = True

    @property
    def layer(self) -> int:
        return self.candidate.layer

    @property
    def coefficient(self) -> float:
        return self.candidate.coefficient


def is_coherent(outcome: Outcome, threshold: float) -> bool:
    """Coherence was measured and reaches ``threshold``."""
    return outcome.coherence is not None and outcome.coherence >= threshold


def best_outcome(
    outcomes: Iterable[Outcome], threshold: float, *, maximize: bool = True
) -> Outcome | None:
    """The best coherent, eligible outcome with a trait score (see module docstring)."""
    best: Outcome | None = None
    best_key: tuple[float, float, float] | None = None
    for o in outcomes:
        if not o.eligible or o.trait is None or not is_coherent(o, threshold):
            continue
        assert o.coherence is not None
        key = (o.trait if maximize else -o.trait, o.coherence, -o.coefficient)
        if best_key is None or key > best_key:
            best, best_key = o, key
    return best


def fine_offsets(points: int, width: float) -> list[float]:
    """Relative offsets of a fine sweep: ``+-width*k/m``, nearest first, below before above."""
    if points <= 0 or width <= 0:
        return []
    m = math.ceil(points / 2)
    out: list[float] = []
    for k in range(1, m + 1):
        out.extend((-width * k / m, width * k / m))
    return out[:points]


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= _SAME * max(abs(a), abs(b), 1e-300)


@dataclass
class _Cell:
    layer: int
    next: float
    coarse_left: int
    fine_left: int
    lo: float | None = None  # largest coherent coefficient seen
    hi: float | None = None  # smallest incoherent coefficient seen
    stopped: bool = False
    outcomes: list[Outcome] = field(default_factory=list)

    def tried(self, coefficient: float) -> bool:
        return any(_same(o.coefficient, coefficient) for o in self.outcomes)

    def proposals(self, spec: SearchSpec, n: int, threshold: float) -> list[float]:
        """The next ``n`` coarse coefficients given every outcome so far (see module docstring)."""
        if not self.outcomes:
            return [self.next * spec.scale_up**i for i in range(n)]
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None and lo < hi:
            ratio = hi / lo
            return [lo * ratio ** (i / (n + 1)) for i in range(1, n + 1)]
        if hi is None and lo is not None:
            return [lo * spec.scale_up**i for i in range(1, n + 1)]
        if lo is None and hi is not None:
            return [hi * spec.scale_down**i for i in range(1, n + 1)]
        # Coherence was not monotone in the coefficient (a coherent run above an incoherent
        # one): keep moving from the latest run in the direction its outcome asks for.
        latest = self.outcomes[-1]
        factor = spec.scale_up if is_coherent(latest, threshold) else spec.scale_down
        value, out = latest.coefficient, list[float]()
        while len(out) < n:
            value *= factor
            if not self.tried(value) and not any(_same(value, v) for v in out):
                out.append(value)
        return out


class CoefficientSearch:
    """Proposes (layer, coefficient) candidates step by step and keeps every outcome."""

    def __init__(
        self,
        starts: Mapping[int, float],
        spec: SearchSpec,
        *,
        threshold: float,
        maximize: bool = True,
        convergence: float = 0.02,
    ) -> None:
        if not starts:
            raise InvalidArgument("layers", "the search needs at least one candidate layer")
        for layer, start in starts.items():
            if not (math.isfinite(start) and start > 0):
                raise InvalidArgument(
                    f"starts[{layer}]", f"start coefficient must be finite and > 0, got {start}"
                )
        self.spec = spec
        self.threshold = float(threshold)
        self.maximize = maximize
        self.convergence = convergence
        self.equal = spec.budget == "equal"
        if self.equal:
            budget = spec.budget_runs or spec.steps + spec.fine_points
            coarse = min(spec.steps, budget)
            fine = budget - coarse
            if fine and spec.fine_width <= 0:
                # A zero-width sweep would repeat one setting: spend the budget bisecting.
                coarse, fine = budget, 0
            self.budget_per_cell: int | None = budget
        else:
            coarse, fine = spec.steps, 0
            self.budget_per_cell = None
        self.cells: dict[int, _Cell] = {
            layer: _Cell(layer=layer, next=float(start), coarse_left=coarse, fine_left=fine)
            for layer, start in sorted(starts.items())
        }
        self.step = 0
        self._pending: list[Candidate] = []
        self._adaptive_fine_done = self.equal or spec.fine_points == 0 or spec.fine_width <= 0

    # -- proposing ----------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Nothing more to propose."""
        return not self._pending and not self._peek()

    def propose(self) -> list[Candidate]:
        """The next step's candidates ([] when the search is over)."""
        if self._pending:
            raise FailedPrecondition("observe the previous step's outcomes before proposing again")
        proposals = self._peek()
        if proposals:
            self.step += 1
            proposals = [Candidate(c.layer, c.coefficient, c.phase, self.step) for c in proposals]
        self._pending = list(proposals)
        return list(proposals)

    def _peek(self) -> list[Candidate]:
        coarse = [
            Candidate(cell.layer, value, "coarse", 0)
            for cell in self.cells.values()
            if cell.coarse_left > 0 and not cell.stopped
            for value in cell.proposals(
                self.spec, min(self.spec.probes, cell.coarse_left), self.threshold
            )
        ]
        if coarse:
            return coarse
        if self.equal:
            return [c for cell in self.cells.values() for c in self._fine_for(cell)]
        if not self._adaptive_fine_done:
            best = best_outcome(self.outcomes(), self.threshold, maximize=self.maximize)
            if best is None:
                return []
            cell = self.cells[best.layer]
            return [
                Candidate(cell.layer, best.coefficient * (1 + off), "fine", 0)
                for off in fine_offsets(self.spec.fine_points, self.spec.fine_width)
                if not cell.tried(best.coefficient * (1 + off))
            ]
        return []

    def _fine_for(self, cell: _Cell) -> list[Candidate]:
        if cell.fine_left <= 0:
            return []
        best = best_outcome(cell.outcomes, self.threshold, maximize=self.maximize)
        if best is not None:
            centre = best.coefficient
        else:
            lowest = min(o.coefficient for o in cell.outcomes) if cell.outcomes else cell.next
            centre = lowest * self.spec.scale_down
        out: list[Candidate] = []
        for off in fine_offsets(cell.fine_left, self.spec.fine_width):
            value = centre * (1 + off)
            if value > 0 and not cell.tried(value):
                out.append(Candidate(cell.layer, value, "fine", 0))
        # Offsets are distinct and exclude 0, so duplicates need an earlier run at exactly one
        # of them; fill any gap below the lowest point so the budget stays exact.
        while len(out) < cell.fine_left:
            floor = min([c.coefficient for c in out] + [centre]) * self.spec.scale_down
            out.append(Candidate(cell.layer, floor, "fine", 0))
        return out

    # -- observing ----------------------------------------------------------------------------

    def observe(self, outcomes: Sequence[Outcome]) -> None:
        """Record the outcomes of every candidate of the last ``propose``."""
        expected = {(c.layer, c.coefficient, c.phase) for c in self._pending}
        got = {(o.candidate.layer, o.candidate.coefficient, o.candidate.phase) for o in outcomes}
        if got != expected or len(outcomes) != len(self._pending):
            raise InvalidArgument(
                "outcomes", "must answer exactly the candidates of the last propose()"
            )
        for o in outcomes:
            cell = self.cells[o.layer]
            cell.outcomes.append(o)
            if o.candidate.phase == "fine":
                cell.fine_left -= 1
                if not self.equal:
                    self._adaptive_fine_done = True
                continue
            cell.coarse_left -= 1
            if is_coherent(o, self.threshold):
                cell.lo = o.coefficient if cell.lo is None else max(cell.lo, o.coefficient)
            else:
                cell.hi = o.coefficient if cell.hi is None else min(cell.hi, o.coefficient)
        for cell in self.cells.values():
            if (
                not self.equal
                and cell.lo is not None
                and cell.hi is not None
                and cell.hi <= cell.lo * (1 + self.convergence)
            ):
                cell.stopped = True
        if any(c.phase == "fine" for c in self._pending) and not self.equal:
            self._adaptive_fine_done = True
        self._pending = []

    # -- reading ------------------------------------------------------------------------------

    def outcomes(self) -> list[Outcome]:
        """Every outcome so far, cell by cell in layer order, each in run order."""
        return [o for cell in self.cells.values() for o in cell.outcomes]

    def runs_per_cell(self) -> dict[int, int]:
        """Settings evaluated per layer."""
        return {layer: len(cell.outcomes) for layer, cell in self.cells.items()}

    def bracket(self, layer: int) -> tuple[float | None, float | None]:
        """(largest coherent, smallest incoherent) coarse coefficient of ``layer``."""
        cell = self.cells[layer]
        return cell.lo, cell.hi

    def best(self) -> Outcome | None:
        """The best coherent run over all cells."""
        return best_outcome(self.outcomes(), self.threshold, maximize=self.maximize)

    def best_per_cell(self) -> dict[int, Outcome | None]:
        """The best coherent run of each layer."""
        return {
            layer: best_outcome(cell.outcomes, self.threshold, maximize=self.maximize)
            for layer, cell in self.cells.items()
        }
