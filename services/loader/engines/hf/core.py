"""The transformers engine's state: the loaded model, its decoder layers, its fast paths
(``fastgen`` generation and capture, capture CUDA graphs) and what every computation shares:
micro-batching with out-of-memory halving, padding, steering plans, logits and counters."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from services.common.errors import ResourceExhausted
from services.common.logging import get_logger
from services.common.precisions import precision_info
from services.common.settings import LoaderSettings
from services.common.variants import Precision
from services.loader.backends.base import LoadedModel
from services.loader.capture_graphs import CaptureGraphs
from services.loader.engine import ChatPrompt, PaddingSide
from services.loader.engines.hf.batching import Padded, micro_batches, pad_batch
from services.loader.engines.hf.tokens import Tokens
from services.loader.fastgen import FastGenerator, unsupported_reason
from services.loader.hooks import find_decoder_layers
from services.loader.placement import layer_devices
from services.loader.steering import SteeringPlan, SteerSpec, build_plan
from services.loader.transfer import is_oom

__all__ = ["HFCore"]

log = get_logger(__name__)
R = TypeVar("R")


def _no_checkpoint() -> None:
    return None


class HFCore:
    """One loaded transformers model and the machinery its computations share."""

    def __init__(self, loaded: LoadedModel, settings: LoaderSettings, precision: Precision) -> None:
        self.loaded = loaded
        self.precision = precision
        self.model = loaded.model
        self.settings = settings
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.config = text_config
        self.num_layers = int(text_config.num_hidden_layers)
        self.hidden_size = int(text_config.hidden_size)
        self.layers = find_decoder_layers(self.model, self.num_layers)
        self.base = getattr(self.model, self.model.base_model_prefix)
        self.lm_head = self.model.get_output_embeddings()
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        self.device = loaded.device
        self.dtype = loaded.compute_dtype
        # Each decoder layer's device: a model placed over several GPUs (``placement``) gets
        # its steering tensors layer by layer where the layer runs.
        self.layer_devices = layer_devices(self.layers, self.device)
        self.multi_device = len(set(self.layer_devices.values())) > 1
        self.vocab_size = int(self.lm_head.weight.shape[0])
        self.tokens = Tokens(loaded.tokenizer, self.model.generation_config)
        self.tokenizer = loaded.tokenizer
        self.pad_id = self.tokens.pad_id
        self.eos_ids = self.tokens.eos_ids
        self.has_chat_template = self.tokens.has_chat_template
        self.has_system_role = self.tokens.has_system_role
        self.max_batch_size = settings.max_batch_size
        self.cache_mode = settings.generation_cache
        self.pinned_results = True
        self.fast_disabled, self.fast = self._fast_generator()
        self.graphs = self._capture_graphs()
        # Capture batches past this many padded tokens are cut where padding would pass 1/16
        # (compute-bound there: padded tokens are computed tokens); 0: never.
        self.capture_split_tokens = 8192
        # Chunks of a capture computed together up to this many tokens (capture._windows);
        # on a GPU only, where a forward's matmuls need thousands of tokens to run near peak
        # (a CPU's are compute-bound at a few rows; merging would only delay the first chunk).
        self.capture_window_tokens = 16384 if self.device.type == "cuda" else 0
        self.oom_retries = 0
        self.forward_rows = 0
        self.tokens_processed = 0
        # Raises when the current unit of work is no longer wanted (set by the server).
        self.checkpoint: Callable[[], None] = _no_checkpoint

    def _fast_generator(self) -> tuple[str | None, FastGenerator | None]:
        """Generation (cache_mode "auto") and capture through fastgen's layer loop where the
        architecture and kernels allow; else why not."""
        facts = precision_info(self.precision)
        # LLM.int8()'s outlier decomposition depends on the data: never in fastgen's loop.
        if facts.data_dependent_kernels:
            return "LLM.int8()", None
        # fastgen's loop and its graphs keep one device's buffers.
        if self.multi_device:
            return "the model spans several devices", None
        reason = unsupported_reason(self.model, self.config, self.layers)
        if reason is not None:
            return reason, None
        on_gpu = self.device.type == "cuda"
        fast = FastGenerator(
            self.model,
            self.layers,
            self.config,
            device=self.device,
            dtype=self.dtype,
            pad_id=self.pad_id,
            logits=self._logits,
            use_graphs=on_gpu and self.settings.decode_graphs,
            static=on_gpu,
            compile_elementwise=on_gpu and self.settings.compile_elementwise,
            compile_min_tokens=self.settings.compile_min_tokens,
            decode_triton=self.settings.decode_kernel == "triton",
            # Kernels not checked under graph capture (bench/gpu_check.py) stay eager.
            graphs_disabled=None if facts.graph_checked else "quantized kernels not graph-checked",
        )
        return None, fast

    def _capture_graphs(self) -> CaptureGraphs:
        on_gpu = self.device.type == "cuda"
        max_graphs = self.settings.capture_graphs
        if max_graphs is None:
            max_graphs = 8 if on_gpu else 0
        return CaptureGraphs(
            self.base,
            self.layers,
            device=self.device,
            dtype=self.dtype,
            pad_id=self.pad_id,
            attn_implementation=str(getattr(self.model.config, "_attn_implementation", None)),
            max_graphs=max_graphs,
            max_tokens=self._capture_graph_tokens(),
            fuse_bytes=self._capture_fuse_bytes,
            use_graphs=on_gpu,
            disabled=self._capture_graphs_disabled(),
            forward=None if self.fast is None else self.fast.capture_forward,
        )

    def _capture_graph_tokens(self) -> int:
        """Largest capture batch worth a graph: ``capture_graph_tokens``, lowered for large
        models, whose forward is bound by arithmetic long before it: graphs pay off while a
        batch's weight-token product is under ~3e12 (SmolLM2: 1.92x at 4 760 tokens, 1.04x at
        19k; an 8B shape at 14k tokens ran 6% faster eagerly, H100), and only eager batches
        leave their padding out (``FastGenerator.capture_packed``)."""
        weights = sum(p.numel() for p in self.layers.parameters())
        return max(1, min(self.settings.capture_graph_tokens, int(3e12 // max(1, weights))))

    def _capture_graphs_disabled(self) -> str | None:
        if precision_info(self.precision).data_dependent_kernels:
            return "LLM.int8() (data-dependent outlier columns)"
        if self.multi_device:
            return "the model spans several devices"
        return None

    # ------------------------------------------------------------------ tokens
    def encode_prompt(self, prompt: ChatPrompt | str, field: str) -> list[int]:
        """Token ids of a prompt; chats get the chat template (and the generation prompt)."""
        return self.tokens.encode_prompt(prompt, field)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a continuation or response (no special tokens)."""
        return self.tokens.encode_text(text)

    def token_string(self, token_id: int) -> str:
        return self.tokens.token_string(token_id)

    # ------------------------------------------------------------------ batching
    def _micro_batches(
        self, lengths: Sequence[int], extra: int, max_rows: int, split_tokens: int = 0
    ) -> list[list[int]]:
        """``batching.micro_batches`` under this engine's row limit (which OOMs lower)."""
        limit_rows = max(1, min(max_rows or self.max_batch_size, self.max_batch_size))
        return micro_batches(
            lengths,
            extra,
            max_rows=limit_rows,
            max_tokens=self.settings.max_batch_tokens,
            split_tokens=split_tokens,
        )

    def _adaptive(self, rows: list[int], fn: Callable[[list[int]], list[R]]) -> list[R]:
        """Run ``fn`` on ``rows``; on OOM free memory, halve and retry each half."""
        self.checkpoint()
        try:
            fault = self.settings.fault_oom_above_batch
            if fault and len(rows) > fault:
                raise torch.OutOfMemoryError(f"injected OOM for {len(rows)} rows > {fault}")
            return fn(rows)
        except Exception as exc:
            if not is_oom(exc):
                raise
            self._free_memory()
            if len(rows) == 1:
                raise ResourceExhausted("out of memory on a single item; shorten it") from exc
            self.oom_retries += 1
            half = len(rows) // 2
            self.max_batch_size = max(1, min(self.max_batch_size, half))
            log.warning("out of memory; halving the batch", extra={"rows": len(rows), "now": half})
            return self._adaptive(rows[:half], fn) + self._adaptive(rows[half:], fn)

    def _free_memory(self) -> None:
        self.graphs.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _pad(self, seqs: Sequence[tuple[list[int], int]], side: PaddingSide) -> Padded:
        """Pad (ids, prompt_len) rows on this engine's device (``batching.pad_batch``)."""
        return pad_batch(seqs, side, self.pad_id, self.device)

    def _plan(self, steering: Sequence[Sequence[SteerSpec]]) -> SteeringPlan:
        return build_plan(
            steering,
            hidden_size=self.hidden_size,
            device=self.device,
            dtype=self.dtype,
            layer_devices=self.layer_devices if self.multi_device else None,
        )

    def cache_index(self, index: torch.Tensor) -> torch.Tensor:
        """``index`` for selecting KV-cache rows: on the host when the cache's layers live on
        several devices (a host index serves every device; a device index only its own)."""
        return index.cpu() if self.multi_device else index

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [.., V] in float32 on the engine's device (the head may sit elsewhere)."""
        head = self.lm_head.weight.device
        logits: torch.Tensor = self.lm_head(hidden.to(head)).float().to(self.device)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _count(self, rows: int, tokens: int) -> None:
        self.forward_rows += rows
        self.tokens_processed += tokens

    def _capture_fuse_bytes(self) -> int:
        configured = self.settings.capture_fuse_bytes
        if configured is not None:
            return configured
        # A CPU is not bound by kernel launches: there the stack copy would only cost.
        return 64 * 2**20 if self.device.type == "cuda" else 0
