"""Job queues on NATS JetStream: streams, consumers, publishing and the dead-letter queue.

Streams and consumers (names from ``PlaneNames``; the default namespace is ``qsens``):

* ``QSENS_JOBS_<KIND>`` on ``qsens.jobs.<kind>``: work-queue retention (a job is removed when
  acked), file storage, a duplicate window of ``duplicate_window_s``. Jobs are published with
  ``Nats-Msg-Id`` = job id, so publishing the same job twice stores it once.
* durable pull consumer ``workers-<kind>``: explicit ack, ``ack_wait_s``; ``max_deliver`` is
  set above every bound the worker runtime enforces (``services.common.worker``), as a
  backstop.
* ``QSENS_DLQ`` on ``qsens.dlq.>``: limits retention; a ``DeadLetter`` carries the job (or
  the raw bytes it could not parse), the last error and the attempt count.

Consuming the queues (retries, heartbeats, dispatch to handlers) is the worker runtime's job;
runs as DAGs (submit, release) are ``services.common.dag``'s. Both build on this module.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import nats.js.errors
from nats.js import JetStreamContext, api
from pydantic import BaseModel, Field

from services.common import settings as settings_mod
from services.common.jobs import Job, JobKind
from services.common.logging import get_logger
from services.common.natsconn import PlaneNames
from services.common.settings import NatsSettings

__all__ = ["DeadLetter", "JobQueue", "retry_delay"]

log = get_logger(__name__)

# nats-server error code: stream name already in use with a different configuration.
_STREAM_NAME_IN_USE = 10058


class DeadLetter(BaseModel):
    """What the DLQ keeps about a job that will not be retried automatically."""

    kind: str = Field(description="Queue it came from.")
    job: dict[str, Any] | None = Field(default=None, description="The job (wire form).")
    raw: str | None = Field(default=None, description="The body, when it could not be parsed.")
    job_id: str | None = None
    run_id: str | None = None
    error_type: str = Field(description="Exception class name.")
    error: str = Field(description="Exception message.")
    attempts: int = Field(ge=0, description="Deliveries of the message so far.")
    worker: str = Field(description="Worker that gave up.")
    failed_at: float = Field(default_factory=time.time)
    stream_seq: int = Field(ge=0, description="Sequence of the message in its job stream.")


def retry_delay(failures: int, settings: NatsSettings | None = None) -> float:
    """Delay before retrying after ``failures`` failed attempts (exponential, capped)."""
    cfg = settings or settings_mod.get(NatsSettings)
    return float(min(cfg.retry_backoff_max_s, cfg.retry_backoff_s * 2 ** max(0, failures - 1)))


class JobQueue:
    """Stream/consumer setup, publishing and the DLQ of one namespace."""

    def __init__(self, js: JetStreamContext, settings: NatsSettings | None = None) -> None:
        self.js = js
        self.settings = settings or settings_mod.get(NatsSettings)
        self.names = PlaneNames(self.settings.namespace)

    @property
    def server_max_deliver(self) -> int:
        """The consumer's own limit: a backstop above every bound the worker enforces."""
        cfg = self.settings
        return cfg.max_deliver + cfg.max_unavailable + cfg.max_waiting + 2

    async def _ensure_stream(self, config: api.StreamConfig) -> None:
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError as err:
            if err.err_code != _STREAM_NAME_IN_USE:
                raise
            await self.js.update_stream(config)

    async def ensure(self, kinds: Iterable[JobKind | str] = tuple(JobKind)) -> None:
        """Create or update the job streams and consumers of ``kinds``, and the DLQ stream."""
        cfg = self.settings
        for kind in {JobKind(k) for k in kinds}:
            await self._ensure_stream(
                api.StreamConfig(
                    name=self.names.job_stream(kind),
                    description=f"qsens {kind.value} jobs",
                    subjects=[self.names.job_subject(kind)],
                    retention=api.RetentionPolicy.WORK_QUEUE,
                    storage=api.StorageType.FILE,
                    num_replicas=cfg.replicas,
                    duplicate_window=cfg.duplicate_window_s,
                )
            )
            await self.js.add_consumer(
                self.names.job_stream(kind),
                api.ConsumerConfig(
                    name=self.names.consumer(kind),
                    durable_name=self.names.consumer(kind),
                    description=f"qsens workers for {kind.value} jobs",
                    ack_policy=api.AckPolicy.EXPLICIT,
                    ack_wait=cfg.ack_wait_s,
                    max_deliver=self.server_max_deliver,
                    filter_subject=self.names.job_subject(kind),
                    deliver_policy=api.DeliverPolicy.ALL,
                    max_ack_pending=10000,
                ),
            )
        await self._ensure_stream(
            api.StreamConfig(
                name=self.names.dlq_stream,
                description="qsens dead-lettered jobs with their last error",
                subjects=[self.names.dlq_wildcard],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                num_replicas=cfg.replicas,
                duplicate_window=cfg.duplicate_window_s,
            )
        )

    async def publish(self, job: Job, *, msg_id: str | None = None) -> bool:
        """Publish ``job`` with ``Nats-Msg-Id`` = its id; False when the server had it already."""
        ack = await self.js.publish(
            self.names.job_subject(job.kind),
            job.to_json(),
            headers={api.Header.MSG_ID: msg_id or job.id},
        )
        return not ack.duplicate

    async def dead_letter(self, letter: DeadLetter) -> None:
        """Store ``letter`` on ``qsens.dlq.<kind>`` (deduplicated per original message)."""
        msg_id = f"dlq-{letter.kind}-{letter.stream_seq}"
        await self.js.publish(
            f"{self.names.namespace}.dlq.{letter.kind}",
            letter.model_dump_json().encode(),
            headers={api.Header.MSG_ID: msg_id},
        )

    async def dead_letters(self, kind: JobKind | str | None = None) -> list[DeadLetter]:
        """Every letter in the DLQ (of ``kind`` if given), oldest first."""
        try:
            info = await self.js.stream_info(self.names.dlq_stream)
        except nats.js.errors.NotFoundError:
            return []
        letters: list[DeadLetter] = []
        if not info.state.messages:
            return letters
        subject = self.names.dlq_subject(kind) if kind else None
        for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
            try:
                msg = await self.js.get_msg(self.names.dlq_stream, seq)
            except nats.js.errors.NotFoundError:
                continue
            if subject and msg.subject != subject:
                continue
            if msg.data:
                letters.append(DeadLetter.model_validate_json(msg.data))
        return letters

    async def depth(self, kind: JobKind | str) -> int:
        """Jobs waiting or in flight in ``kind``'s queue (for scaling decisions)."""
        info = await self.js.stream_info(self.names.job_stream(kind))
        return int(info.state.messages)
