"""The vLLM engine behind the ``Engine`` interface.

vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one worker, eager mode), so
the hooks of ``services.loader.engines.vllm.hooks`` reach its decoder layers; each call adds
its rows as requests, steps the engine until they finish, and reads which request owns each
token of a forward from the model runner's batch (request ids, query start offsets) and the
token positions the model receives. Generation decodes through vLLM's scheduler, sampler and
stop handling; capture, score and next token replay each item's tokens as a prompt (prefix
caching off: a cached prefix would skip the tokens a capture reads). Score reads vLLM's prompt
log-probs; next token computes the full distribution from the final hidden state through the
model's own ``compute_logits``. What vLLM is asked for per precision and GPU count, and what
is refused before loading, is in ``services.loader.engines.vllm.options``.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator, Sequence
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
from services.loader.engines.vllm.hooks import (
    FlatCapture,
    FlatState,
    TokenOwners,
    install_flat_hooks,
    owners_from_batch,
)
from services.loader.engines.vllm.options import (
    DTYPES,
    VLLMOptions,
    served_precisions,
    vllm_options,
)
from services.loader.hooks import find_decoder_layers
from services.loader.model_source import ResolvedSource
from services.loader.positions import Position
from services.loader.steering import SteerSpec, build_plan

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


def query_starts(runner: Any, num_reqs: int) -> list[int]:
    """The first token of each scheduled request in the forward, and the end: the runner's
    ``query_start_loc`` (a CPU/GPU buffer pair; its CPU side is ``np`` in 0.26 and 0.32)."""
    buffer = runner.query_start_loc
    host = getattr(buffer, "np", None)
    if host is None:
        host = buffer.cpu.numpy()
    return [int(x) for x in host[: num_reqs + 1]]


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
    ) -> None:
        from transformers import AutoTokenizer, GenerationConfig

        self.llm = llm
        self.precision = precision
        self.settings = settings
        self.options = options
        self.runner = model_runner(llm)
        self.model = self.runner.get_model()
        # Steering tensors live where the model runs: the hooks index them by token owners
        # built on the forward's own device.
        self.device = torch.device(self.runner.device)
        model_config = llm.llm_engine.model_config
        hf_config = model_config.hf_text_config
        self.num_layers = int(hf_config.num_hidden_layers)
        self.hidden_size = int(hf_config.hidden_size)
        self.vocab_size = int(model_config.get_vocab_size())
        self.dtype = model_config.dtype
        self.layers = find_decoder_layers(self.model, self.num_layers)
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
        options = vllm_options(precision, gpus=settings.gpus, on_cpu=on_cpu, has_int4_kernel=int4)
        extra: dict[str, Any] = {}
        if settings.vllm_gpu_memory is not None and not on_cpu:
            extra["gpu_memory_utilization"] = settings.vllm_gpu_memory
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
        return cls(llm, precision, settings, options, served)

    # ------------------------------------------------------------------ running requests
    def _run(
        self,
        prompts: Sequence[list[int]],
        params: Sequence[SamplingParams],
        steering: Sequence[Sequence[SteerSpec]],
        prompt_lengths: Sequence[int],
        capture: FlatCapture | None = None,
    ) -> list[Any]:
        """Add one request per row, step the engine until all finish under the rows'
        steering and ``capture``; the rows' ``RequestOutput``s in order (lengths were checked
        against ``max_model_len`` by ``Engine``'s public methods)."""
        engine = self.llm.llm_engine
        plan = build_plan(
            [*steering, []],
            hidden_size=self.hidden_size,
            device=self.device,
            dtype=self.dtype,
        )
        state = FlatState(plan, torch.tensor([*prompt_lengths, 0]), capture)
        sentinel = len(prompts)
        row_of: dict[str, int] = {}
        external: dict[str, int] = {}
        for row, (ids, sp) in enumerate(zip(prompts, params, strict=True)):
            request = f"qsens-{next(_REQUEST_IDS)}"
            internal = engine.add_request(request, {"prompt_token_ids": list(ids)}, sp)
            row_of[internal] = row
            external[request] = row

        def owners(args: tuple[Any, ...], kwargs: dict[str, Any]) -> TokenOwners:
            positions = kwargs["positions"] if "positions" in kwargs else args[1]
            batch = self.runner.input_batch
            n = batch.num_reqs
            rows = [row_of.get(rid, sentinel) for rid in batch.req_ids[:n]]
            starts = query_starts(self.runner, n)
            return owners_from_batch(rows, starts, positions, sentinel)

        outputs: dict[int, Any] = {}
        try:
            with install_flat_hooks(self.model, self.layers, state, owners), torch.inference_mode():
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
        return [outputs[i] for i in range(len(prompts))]

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
        outs = self._run(
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
            capture = FlatCapture(frozenset(layers), torch.tensor([spans[i] for i in window]))
            self._run(
                [items[i].prompt_ids + items[i].response_ids for i in window],
                [SamplingParams(max_tokens=1, temperature=0.0) for _ in window],
                [items[i].steering for i in window],
                [len(items[i].prompt_ids) for i in window],
                capture,
            )
            results = []
            for row, i in enumerate(window):
                per_layer = [capture.tokens(layer, row) for layer in layers]  # [n, H] each
                acts = torch.stack(per_layer)  # [L, n, H]
                if reduction == "mean":
                    acts = acts.float().mean(dim=1)
                elif reduction == "last":
                    acts = acts[:, -1]
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
        outs = self._run(
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

        last = torch.tensor([it.length - 1 for it in items])
        capture = FlatCapture(frozenset(), torch.zeros(len(items), 2, dtype=torch.long), last)
        self._run(
            [it.prompt_ids + it.response_ids for it in items],
            [SamplingParams(max_tokens=1, temperature=0.0) for _ in items],
            [it.steering for it in items],
            [len(it.prompt_ids) for it in items],
            capture,
        )
        hidden = torch.cat([capture.tokens(-1, row) for row in range(len(items))]).to(self.device)
        with torch.inference_mode():
            logits = self.model.compute_logits(hidden)[:, : self.vocab_size].float()
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
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def quantization_config(self) -> dict[str, Any]:
        """The checkpoint's quantization config (gptq/awq), or vLLM's online method (fp8)."""
        if self.options.quantization is not None:
            return {"quant_method": self.options.quantization, "online": True}
        found = getattr(self.llm.llm_engine.model_config.hf_config, "quantization_config", None)
        return dict(found) if isinstance(found, dict) else {}

    def load_notes(self) -> list[str]:
        notes = [
            f"vLLM {_version()} in-process, eager, prefix caching off",
            "samples at temperature > 0 come from vLLM's sampler (per-row seeds)",
            f"tensor parallel size {self.options.tensor_parallel_size}",
        ]
        if self.options.quantization is not None:
            notes.append(
                f"{self.precision.value}: vLLM {self.options.quantization} quantization at "
                "load (weights per output channel, activations per token)"
            )
        return notes
