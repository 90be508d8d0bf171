"""The ``analyze`` stage's params: the spec of the run and its variants, reference first."""

from __future__ import annotations

from pydantic import Field

from services.common.contracts.common import Params
from services.common.spec import ExperimentSpec

__all__ = ["AnalyzeParams"]


class AnalyzeParams(Params):
    """The params of the ``analyze`` job (one per run, after every other job)."""

    spec: ExperimentSpec = Field(description="The experiment spec the run was planned from.")
    variants: list[str] = Field(description="Every <model>@<precision>, reference first.")
