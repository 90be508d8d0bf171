"""Which judge a study uses: the one model the spec's ``judge`` section and the judge service share.

``spec.JudgeSpec`` is this choice plus the study's coherence threshold; the service's
``settings.JudgeSettings`` is this choice plus its limits and plumbing, read from
``QSENS_JUDGE_*``. ``JudgeSettings.for_choice`` derives a service's settings from a spec
section, and ``serve_args`` is how ``qsens up --spec`` hands the choice to ``qsens judge
serve``, so the fields are declared once.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

__all__ = ["DEFAULT_JUDGE_MODEL", "JudgeBackendName", "JudgeChoice"]

JudgeBackendName = Literal["embedding", "openai", "loader"]
DEFAULT_JUDGE_MODEL = "gpt-4.1-mini"
_LOADER_FIELDS = ("variant", "end_of_turn")


class JudgeChoice(BaseModel):
    """The judge: its backend, for ``openai`` its model and endpoint, for ``loader`` the
    loader-hosted variant that judges (``services.judge.backends.loader_backend``)."""

    backend: JudgeBackendName = Field("embedding", description="Judge backend.")
    model: str = Field(DEFAULT_JUDGE_MODEL, description="Judge model (openai backend).")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint (None: OpenAI).")
    variant: str | None = Field(
        None,
        description="loader backend: the variant that judges, 'model@precision' (None: the "
        "study's reference variant, or whatever the judge's loader serves).",
    )
    end_of_turn: str | None = Field(
        None,
        description="loader backend: the token that ends the judge's answer (None: the "
        "hosted tokenizer's chat end-of-turn token).",
    )

    @model_serializer(mode="wrap")
    def _without_unset_loader_fields(self, handler: SerializerFunctionWrapHandler) -> Any:
        # Unset, the loader fields stay out of dumps, so specs that do not use them keep their
        # fingerprints (run ids, bootstrap seeds) and jobs their ids.
        data = handler(self)
        if isinstance(data, dict):
            for key in _LOADER_FIELDS:
                if data.get(key) is None:
                    data.pop(key, None)
        return data

    def choice(self) -> JudgeChoice:
        """Just the choice (a spec section or settings carry more)."""
        return JudgeChoice(
            backend=self.backend,
            model=self.model,
            base_url=self.base_url,
            variant=self.variant,
            end_of_turn=self.end_of_turn,
        )

    def serve_args(self) -> list[str]:
        """The ``qsens judge serve`` options that select this judge."""
        args = ["--backend", self.backend]
        if self.backend == "openai":
            args += ["--model", self.model]
            if self.base_url:
                args += ["--base-url", self.base_url]
        if self.backend == "loader":
            if self.variant:
                args += ["--loader-variant", self.variant]
            if self.end_of_turn:
                args += ["--end-of-turn", self.end_of_turn]
        return args
