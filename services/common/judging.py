"""Which judge a study uses: the one model the spec's ``judge`` section and the judge service share.

``spec.JudgeSpec`` is this choice plus the study's coherence threshold; the service's
``settings.JudgeSettings`` is this choice plus its limits and plumbing, read from
``QSENS_JUDGE_*``. ``JudgeSettings.for_choice`` derives a service's settings from a spec
section, and ``serve_args`` is how ``qsens up --spec`` hands the choice to ``qsens judge
serve``, so the three fields are declared once.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

__all__ = ["DEFAULT_JUDGE_MODEL", "JudgeBackendName", "JudgeChoice"]

JudgeBackendName = Literal["embedding", "openai"]
DEFAULT_JUDGE_MODEL = "gpt-4.1-mini"


class JudgeChoice(BaseModel):
    """The judge: its backend, and for ``openai`` its model and endpoint."""

    backend: JudgeBackendName = Field("embedding", description="Judge backend.")
    model: str = Field(DEFAULT_JUDGE_MODEL, description="Judge model (openai backend).")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint (None: OpenAI).")

    def choice(self) -> JudgeChoice:
        """Just the choice (a spec section or settings carry more)."""
        return JudgeChoice(backend=self.backend, model=self.model, base_url=self.base_url)

    def serve_args(self) -> list[str]:
        """The ``qsens judge serve`` options that select this judge."""
        args = ["--backend", self.backend]
        if self.backend == "openai":
            args += ["--model", self.model]
            if self.base_url:
                args += ["--base-url", self.base_url]
        return args
