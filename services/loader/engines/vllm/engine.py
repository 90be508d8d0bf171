"""The vLLM engine behind the ``Engine`` interface.

vLLM's engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, eager mode).
With one rank its model runner is here too, and the hooks of
``services.loader.engines.vllm.hooks`` go on its decoder layers directly; with tensor
parallelism (``gpus`` > 1) each rank is a vLLM worker process and the same hooks are installed
in every one of them through ``worker_extension_cls`` and ``collective_rpc``
(``services.loader.engines.vllm.workers``). Each call adds its rows as requests, hands the
hooks which request is which row, steps the engine until they finish, and the hooks read which
request owns each token of a forward from the model runner's batch (request ids, query start
offsets) and the token positions the model receives. Works on vLLM 0.26 (the newest CUDA build
for torch 2.11) and 0.32 (the CPU build of the tests). Generation decodes through vLLM's scheduler, sampler and
stop handling; capture, score and next token replay each item's tokens as a prompt (prefix
caching off: a cached prefix would skip the tokens a capture reads). Score reads vLLM's prompt
log-probs; next token computes the full distribution from the final hidden state through the
model's own ``compute_logits``. What vLLM is asked for per precision and GPU count, and what
is refused before loading, is in ``services.loader.engines.vllm.options``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import torch

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.logging import get_logger
from services.common.settings import LoaderSettings
from services.common.variants import Precision
from services.loader.engine import (
    CaptureResult,
    ContinuationScore,
    Engine,
    EngineCapabilities,
    EngineHealth,
    EngineItem,
    GenParams,
    GenResult,
    NextTokenResult,
    PaddingSide,
    Reduction,
    ScoreInput,
    StepLogprob,
)
from services.loader.engines.hf.tokens import Tokens
from services.loader.engines.vllm.hooks import FlatCapture
from services.loader.engines.vllm.options import (
    DTYPES,
    VLLMOptions,
    check_checkpoint,
    served_precisions,
    tensor_parallel_size,
    vllm_options,
)
from services.loader.engines.vllm.workers import HookCall, installed, rank_zero
from services.loader.model_source import ResolvedSource
from services.loader.positions import Position
from services.loader.steering import SteerSpec

if TYPE_CHECKING:
    from vllm import LLM, SamplingParams

__all__ = ["DTYPES", "VLLMEngine"]

log = get_logger(__name__)

_REQUEST_IDS = itertools.count()


def _no_checkpoint() -> None:
    return None


def model_runner(llm: LLM) -> Any:
    """The model runner of vLLM's in-process engine core (the same path in vLLM 0.26, the
    newest CUDA build for torch 2.11, and 0.32): the engine core client holds the core, its
    executor the one worker's wrapper."""
    node: Any = llm.llm_engine
    for name in ("engine_core", "engine_core", "model_executor", "driver_worker", "worker"):
        node = getattr(node, name, None)
        if node is None:
            raise FailedPrecondition(
                f"vLLM {_version()}: no in-process {name} on the way to the model runner "
                "(the engine needs VLLM_ENABLE_V1_MULTIPROCESSING=0 and one worker)"
            )
    return node.model_runner


def split_dims(config: Any) -> dict[str, int]:
    """The sizes tensor parallelism splits (``tensor_parallel_size``'s keywords), from the
    text model's config: a multimodal config such as Gemma 3's keeps them in its
    ``text_config``, not at its top level."""
    text = config.get_text_config()
    heads = int(text.num_attention_heads)
    return {
        "heads": heads,
        "kv_heads": int(getattr(text, "num_key_value_heads", None) or heads),
        "intermediate": int(text.intermediate_size),
    }


def _derived_gpus(
    source: ResolvedSource, precision: Precision, settings: LoaderSettings
) -> tuple[int, str | None]:
    """The tensor parallel size where ``gpus`` is unset: one GPU when the weights fit it with
    ``gpu_headroom`` left, else the fewest visible GPUs that hold them and split the model
    evenly; and the note that says why (None: one GPU, nothing to say)."""
    visible = torch.cuda.device_count()
    if visible <= 1:
        return 1, None
    from transformers import AutoConfig

    from services.loader.placement import gpus_needed, meta_model, total_bytes, units_of

    config = AutoConfig.from_pretrained(str(source.folder))
    units = units_of(meta_model(config), precision)
    free = min(int(torch.cuda.mem_get_info(i)[0]) for i in range(visible))
    needed = gpus_needed(units, free, headroom=settings.gpu_headroom)
    size = tensor_parallel_size(needed, **split_dims(config), visible=visible)
    if size == 1:
        return 1, None
    gib = 2**30
    return size, (
        f"tensor parallel size {size} chosen: the weights ({total_bytes(units) / gib:.1f} GiB) "
        f"need {needed} of {visible} GPUs with {free / gib:.1f} GiB free each"
    )


def _bind_cpu_ranks(ranks: int) -> None:
    """Split this process's cores between ``ranks`` CPU workers (vLLM's automatic binding
    wants a NUMA node per rank, which one-node machines lack) unless
    ``VLLM_CPU_OMP_THREADS_BIND`` says otherwise."""
    cores = sorted(os.sched_getaffinity(0))
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ or len(cores) < ranks:
        return
    share = len(cores) // ranks
    groups = [cores[r * share : (r + 1) * share] for r in range(ranks)]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
        str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups
    )


def _version() -> str:
    import vllm

    return str(vllm.__version__)


def _platform() -> tuple[bool, bool]:
    """Whether vLLM runs on the CPU here, and whether its int4 weight-only GEMM (GPTQ/AWQ on
    a CPU) exists in the build it loaded."""
    import vllm._custom_ops  # noqa: F401 - loads vLLM's ops into torch.ops._C
    from vllm.platforms import current_platform

    on_cpu = bool(current_platform.is_cpu())
    return on_cpu, not on_cpu or hasattr(torch.ops._C, "cpu_gemm_wna16")


#: ``worker_extension_cls`` of a tensor-parallel LLM: the hooks' methods on every worker.
WORKER_EXTENSION = "services.loader.engines.vllm.workers.QsensWorkerExtension"


class _InProcess:
    """One rank: vLLM's model runner in this process, hooks installed directly."""

    def __init__(self, llm: LLM) -> None:
        self.runner = model_runner(llm)
        self.config = llm.llm_engine.model_config
        self.device = torch.device(self.runner.device)

    @contextmanager
    def hooks(self, call: HookCall) -> Iterator[FlatCapture | None]:
        with installed(self.runner, call, self.config.hf_text_config, self.config.dtype) as cap:
            yield cap

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.runner.get_model().compute_logits(hidden.to(self.device))
        return cast(torch.Tensor, out).float()

    def parameter_bytes(self) -> int:
        model = self.runner.get_model()
        return int(sum(p.numel() * p.element_size() for p in model.parameters()))


class _Workers:
    """Tensor-parallel ranks in vLLM's worker processes: the same hook calls on every rank
    through ``collective_rpc`` (``services.loader.engines.vllm.workers``), rank 0's
    capture and logits back."""

    def __init__(self, llm: LLM, device: torch.device) -> None:
        self.llm = llm
        self.device = device

    @contextmanager
    def hooks(self, call: HookCall) -> Iterator[FlatCapture | None]:
        capture = call.new_capture()
        self.llm.collective_rpc("qsens_begin", args=(call.to_data(),))
        try:
            yield capture
        except BaseException:
            # The workers still drop the call's hooks; the call's own error is what surfaces.
            with contextlib.suppress(Exception):
                self.llm.collective_rpc("qsens_end")
            raise
        chunks = rank_zero(self.llm.collective_rpc("qsens_end"))
        if capture is not None and chunks:
            capture.chunks = chunks

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return cast(
            torch.Tensor, rank_zero(self.llm.collective_rpc("qsens_logits", args=(hidden,)))
        )

    def parameter_bytes(self) -> int:
        return int(sum(self.llm.collective_rpc("qsens_parameter_bytes")))


class VLLMEngine(Engine):
    """One model in vLLM: per-row steering (add and ablate at prompt, response or all
    tokens), every capture position and reduction (items are replayed as prompts), Score
    and NextToken. Not batch-invariant (vLLM's batch composition may change a row's
    rounding); samples at temperature > 0 come from vLLM's sampler with the row's seed, so
    they are reproducible per seed but differ from the HF engine's."""

    name = "vllm"

    def __init__(
        self,
        llm: LLM,
        precision: Precision,
        settings: LoaderSettings,
        options: VLLMOptions,
        served: frozenset[Precision],
        *,
        on_cpu: bool = False,
    ) -> None:
        from transformers import AutoTokenizer, GenerationConfig

        self.llm = llm
        self.precision = precision
        self.settings = settings
        self.options = options
        # Where the model runs: this process (one rank) or vLLM's tensor-parallel workers.
        self.host: _InProcess | _Workers
        if options.tensor_parallel_size == 1:
            self.host = _InProcess(llm)
        else:
            self.host = _Workers(llm, torch.device("cpu" if on_cpu else "cuda:0"))
        self.device = self.host.device
        model_config = llm.llm_engine.model_config
        hf_config = model_config.hf_text_config
        self.num_layers = int(hf_config.num_hidden_layers)
        self.hidden_size = int(hf_config.hidden_size)
        self.vocab_size = int(model_config.get_vocab_size())
        self.dtype = model_config.dtype
        folder = model_config.model
        tokenizer = AutoTokenizer.from_pretrained(folder)
        try:
            generation_config = GenerationConfig.from_pretrained(folder)
        except OSError:  # a folder without generation_config.json
            generation_config = None
        self.tokens = Tokens(tokenizer, generation_config)
        self.tokenizer = tokenizer
        self.max_model_len = int(model_config.max_model_len)
        self.tokens_processed = 0
        self.checkpoint = _no_checkpoint
        self.gpus_note: str | None = None  # why this GPU count, where the loader chose it
        self.capabilities = EngineCapabilities(
            engine=self.name,
            batch_invariant=False,
            graphable=False,  # eager: hooks must run on every forward
            supports_steering=True,
            precisions=frozenset(p.value for p in served),
            tensor_parallel_size=options.tensor_parallel_size,
        )

    @classmethod
    def load(
        cls,
        source: ResolvedSource,
        precision: Precision,
        backend: str,
        *,
        device: str,
        settings: LoaderSettings,
    ) -> VLLMEngine:
        """Build ``vllm.LLM`` in this process on ``source``'s folder at ``precision`` (fp8:
        quantized as it loads; gptq/awq: the checkpoint's own), on ``settings.gpus`` GPUs."""
        return cls.start(source, precision, settings)

    @classmethod
    def start(
        cls,
        source: ResolvedSource,
        precision: Precision,
        settings: LoaderSettings,
        *,
        cpu_ranks: int | None = None,
    ) -> VLLMEngine:
        """``load``; ``cpu_ranks`` > 1 runs tensor parallelism over that many CPU processes
        where vLLM runs on the CPU (the tests' way to run the several-GPU code path)."""
        if precision not in DTYPES:
            names = " ".join(p.value for p in DTYPES)
            raise InvalidArgument("precision", f"engine 'vllm' serves {names}, not {precision}")
        # In-process engine core: the hooks must live where the model runs.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # The V1 model runner (input_batch, query_start_loc) that the token owners read.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default is larger
        try:
            from vllm import LLM
        except ImportError as exc:
            raise InvalidArgument(
                "engine",
                f"engine 'vllm' needs vLLM in this environment ({exc}); it runs in its own "
                "virtual environment: pip install -e '.[vllm]'",
            ) from exc
        on_cpu, int4 = _platform()
        gpus, chosen = settings.gpus, None
        if gpus is None and not on_cpu:
            gpus, chosen = _derived_gpus(source, precision, settings)
        options = vllm_options(precision, gpus=gpus, on_cpu=on_cpu, has_int4_kernel=int4)
        check_checkpoint(precision, source.folder)
        if cpu_ranks is not None and on_cpu:
            options = dataclasses.replace(options, tensor_parallel_size=cpu_ranks)
        extra: dict[str, Any] = {}
        if settings.vllm_gpu_memory is not None and not on_cpu:
            extra["gpu_memory_utilization"] = settings.vllm_gpu_memory
        if options.tensor_parallel_size > 1:
            # Ranks in worker processes; the hooks' methods mixed into each worker.
            extra["distributed_executor_backend"] = "mp"
            extra["worker_extension_cls"] = WORKER_EXTENSION
            if on_cpu:
                _bind_cpu_ranks(options.tensor_parallel_size)
        # Eager (no torch.compile, no CUDA graphs): the hooks read each forward's token
        # owners on the host and index per-row plans with them; a compiled graph or a
        # recorded CUDA graph would bake one forward's owners into every replay.
        llm = LLM(
            model=str(source.folder),
            dtype=options.dtype,
            quantization=options.quantization,
            tensor_parallel_size=options.tensor_parallel_size,
            enforce_eager=True,
            enable_prefix_caching=False,
            # Rows decoded together: a GPU's decode step is bound by the weights' reads, so
            # more rows per step are nearly free (vLLM's GPU default for a server is 1 024).
            max_num_seqs=max(1, min(256 if on_cpu else 1024, settings.max_batch_size)),
            max_logprobs=-1,  # next token and log-prob requests may ask for any top-k
            seed=0,
            **extra,
        )
        log.info("vllm engine loaded", extra={"model": source.name, "precision": precision.value})
        served = served_precisions(on_cpu=on_cpu, has_int4_kernel=int4)
        engine = cls(llm, precision, settings, options, served, on_cpu=on_cpu)
        engine.gpus_note = chosen
        return engine

    # ------------------------------------------------------------------ running requests
    def _run(
        self,
        prompts: Sequence[list[int]],
        params: Sequence[SamplingParams],
        steering: Sequence[Sequence[SteerSpec]],
        prompt_lengths: Sequence[int],
        capture: tuple[list[int], list[list[int]], list[int] | None] | None = None,
    ) -> tuple[list[Any], FlatCapture | None]:
        """Add one request per row, step the engine until all finish under the rows'
        steering and ``capture`` ((layers, spans [R, 2], final_at [R] or None) of
        ``HookCall``); the rows' ``RequestOutput``s in order and the filled capture (lengths
        were checked against ``max_model_len`` by ``Engine``'s public methods)."""
        engine = self.llm.llm_engine
        row_of: dict[str, int] = {}
        external: dict[str, int] = {}
        outputs: dict[int, Any] = {}
        try:
            for row, (ids, sp) in enumerate(zip(prompts, params, strict=True)):
                request = f"qsens-{next(_REQUEST_IDS)}"
                internal = engine.add_request(request, {"prompt_token_ids": list(ids)}, sp)
                row_of[internal] = row
                external[request] = row
            call = HookCall(row_of, [list(s) for s in steering], list(prompt_lengths))
            if capture is not None:
                call.capture_layers, call.capture_spans, call.final_at = capture
            with self.host.hooks(call) as captured, torch.inference_mode():
                while len(outputs) < len(prompts):
                    self.checkpoint()
                    for out in engine.step():
                        if out.finished and out.request_id in external:
                            outputs[external[out.request_id]] = out
                    if not engine.has_unfinished_requests() and len(outputs) < len(prompts):
                        raise FailedPrecondition("vLLM finished without some requests' outputs")
        finally:
            unfinished = [r for r, row in external.items() if row not in outputs]
            if unfinished:
                engine.abort_request(unfinished)
        self.tokens_processed += sum(len(p) for p in prompts) + sum(
            len(o.outputs[0].token_ids) for o in outputs.values()
        )
        return [outputs[i] for i in range(len(prompts))], captured

    # ------------------------------------------------------------------ computations
    def _generate(
        self, items: Sequence[EngineItem], params: GenParams, *, max_rows: int
    ) -> list[GenResult]:
        from vllm import SamplingParams

        stop_ids = sorted(self.tokens.eos_ids)
        sampling = [
            SamplingParams(
                max_tokens=params.max_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                seed=it.seed,
                stop=list(params.stop) or None,
                stop_token_ids=stop_ids,
                ignore_eos=params.ignore_eos,
                logprobs=params.top_logprobs if params.logprobs else None,
            )
            for it in items
        ]
        outs, _ = self._run(
            [it.prompt_ids for it in items],
            sampling,
            [it.steering for it in items],
            [len(it.prompt_ids) for it in items],
        )
        return [self._gen_result(it, out, params) for it, out in zip(items, outs, strict=True)]

    def _gen_result(self, item: EngineItem, out: Any, params: GenParams) -> GenResult:
        """The HF engine's result form: text without a final end-of-turn token, cut at the
        first stop string; step log-probs with the top alternatives by log-prob."""
        completion = out.outputs[0]
        ids = [int(t) for t in completion.token_ids]
        finish = "stop" if completion.finish_reason == "stop" else "length"
        body = ids[:-1] if ids and ids[-1] in self.tokens.eos_ids and finish == "stop" else ids
        text = str(self.tokenizer.decode(body, skip_special_tokens=True))
        for s in params.stop:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
        steps: list[StepLogprob] | None = None
        if params.logprobs:
            steps = []
            for token, step in zip(ids, completion.logprobs or [], strict=False):
                chosen = step[token]
                top = sorted(step.items(), key=lambda kv: -kv[1].logprob)[: params.top_logprobs]
                steps.append(
                    StepLogprob(
                        (token, self.token_string(token), float(chosen.logprob)),
                        tuple(
                            (int(t), self.token_string(int(t)), float(lp.logprob)) for t, lp in top
                        ),
                    )
                )
        return GenResult(text, ids, finish, len(item.prompt_ids), steps)

    def _capture(
        self,
        items: Sequence[EngineItem],
        layers: Sequence[int],
        position: Position,
        reduction: Reduction,
        *,
        padding_side: PaddingSide,
        max_rows: int,
        chunk_items: int,
    ) -> Iterator[list[CaptureResult]]:
        spans = [position.span(len(it.prompt_ids), len(it.response_ids)) for it in items]
        return self._capture_chunks(items, sorted(set(layers)), spans, reduction, chunk_items)

    def _capture_chunks(
        self,
        items: Sequence[EngineItem],
        layers: list[int],
        spans: list[tuple[int, int]],
        reduction: Reduction,
        chunk_items: int,
    ) -> Iterator[list[CaptureResult]]:
        from vllm import SamplingParams

        chunk = max(1, chunk_items)
        for first in range(0, len(items), chunk):
            window = list(range(first, min(len(items), first + chunk)))
            _, capture = self._run(
                [items[i].prompt_ids + items[i].response_ids for i in window],
                [SamplingParams(max_tokens=1, temperature=0.0) for _ in window],
                [items[i].steering for i in window],
                [len(items[i].prompt_ids) for i in window],
                (layers, [list(spans[i]) for i in window], None),
            )
            assert capture is not None
            results = []
            for row, i in enumerate(window):
                per_layer = [capture.tokens(layer, row) for layer in layers]  # [n, H] each
                if reduction == "mean":  # float32 sums without a float32 copy of the tokens
                    acts = torch.stack([t.mean(dim=0, dtype=torch.float32) for t in per_layer])
                elif reduction == "last":
                    acts = torch.stack([t[-1] for t in per_layer])
                else:
                    acts = torch.stack(per_layer)  # [L, n, H]
                item = items[i]
                results.append(
                    CaptureResult(
                        i,
                        acts,
                        spans[i][1] - spans[i][0],
                        len(item.prompt_ids),
                        len(item.response_ids),
                    )
                )
            yield results

    def _score(
        self,
        items: Sequence[ScoreInput],
        *,
        token_logprobs: bool,
        padding_side: PaddingSide,
        max_rows: int,
    ) -> list[list[ContinuationScore]]:
        from vllm import SamplingParams

        rows = [(it, c) for it in items for c in range(len(it.continuations))]
        outs, _ = self._run(
            [it.context_ids + it.continuations[c] for it, c in rows],
            [SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0) for _ in rows],
            [it.steering for it, _ in rows],
            [len(it.context_ids) for it, _ in rows],
        )
        scores: list[list[ContinuationScore]] = [[] for _ in items]
        index = {id(it): n for n, it in enumerate(items)}
        for (item, c), out in zip(rows, outs, strict=True):
            cont = item.continuations[c]
            steps = out.prompt_logprobs[len(item.context_ids) :]
            chosen = [step[token] for step, token in zip(steps, cont, strict=True)]
            per_token = [float(lp.logprob) for lp in chosen]
            scores[index[id(item)]].append(
                ContinuationScore(
                    logprob=float(math.fsum(per_token)),
                    num_tokens=len(cont),
                    num_chars=item.continuation_chars[c],
                    is_greedy=all(lp.rank == 1 for lp in chosen),
                    token_logprobs=per_token if token_logprobs else [],
                )
            )
        return scores

    def _next_token(
        self,
        items: Sequence[EngineItem],
        *,
        top_k: int,
        token_ids: Sequence[int],
        padding_side: PaddingSide,
        max_rows: int,
    ) -> list[NextTokenResult]:
        from vllm import SamplingParams

        from services.loader.engines.hf.next_token import _distribution

        _, capture = self._run(
            [it.prompt_ids + it.response_ids for it in items],
            [SamplingParams(max_tokens=1, temperature=0.0) for _ in items],
            [it.steering for it in items],
            [len(it.prompt_ids) for it in items],
            ([], [[0, 0]] * len(items), [it.length - 1 for it in items]),
        )
        assert capture is not None
        hidden = torch.cat([capture.tokens(-1, row) for row in range(len(items))])
        logits = self.host.logits(hidden)[:, : self.vocab_size]
        # The HF engine's statistics, from this model's logits (``_distribution`` reads only
        # ``token_string`` from its engine).
        return [
            _distribution(cast(Any, self), logits[b], top_k, token_ids) for b in range(len(items))
        ]

    # ------------------------------------------------------------------ state
    def health(self) -> EngineHealth:
        if self.llm.llm_engine.engine_core is None:
            return EngineHealth(False, "the vLLM engine core is gone")
        return EngineHealth(True)

    def device_label(self) -> str:
        return str(self.device)

    def parameter_bytes(self) -> int:
        return self.host.parameter_bytes()

    def quantization_config(self) -> dict[str, Any]:
        """The checkpoint's quantization config (gptq/awq), or vLLM's online method (fp8)."""
        if self.options.quantization is not None:
            return {"quant_method": self.options.quantization, "online": True}
        found = getattr(self.llm.llm_engine.model_config.hf_config, "quantization_config", None)
        return dict(found) if isinstance(found, dict) else {}

    def load_notes(self) -> list[str]:
        notes = [
            f"vLLM {_version()} in-process, eager, prefix caching off",
            "hooks in this process"
            if self.options.tensor_parallel_size == 1
            else "hooks in each tensor-parallel worker (worker_extension_cls)",
            "samples at temperature > 0 come from vLLM's sampler (per-row seeds)",
            self.gpus_note or f"tensor parallel size {self.options.tensor_parallel_size}",
        ]
        if self.options.quantization is not None:
            notes.append(
                f"{self.precision.value}: vLLM {self.options.quantization} quantization at "
                "load (weights per output channel, activations per token)"
            )
        return notes
