"""Quantize one model with gptqmodel, in a process of its own.

``python -m services.quantizer.run WORKDIR`` reads ``WORKDIR/request.json`` (the request and the
calibration texts), writes the checkpoint to ``WORKDIR/checkpoint`` and ``WORKDIR/result.json``,
or ``WORKDIR/error.json`` for bad input. The quantize job runs it as a child process so that
gptqmodel's threads, progress bars and memory stay out of the worker, whose event loop keeps
sending the job's heartbeats meanwhile.

On a CPU the search runs in float32: without AVX512-BF16 (this machine has AVX2 only) bfloat16
matmuls are emulated and many times slower (AWQ's scale search took minutes per SmolLM2 layer
in bfloat16), and float32 is also the more accurate choice. On CUDA it runs in bfloat16. The
checkpoint is saved in bfloat16 either way.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgument, QsensError
from services.common.quantization import QuantizeRequest, parse_request
from services.quantizer.calibration import CalibrationSet, tokenize_samples

__all__ = ["build_quant_config", "check_shapes", "main", "quantize_folder"]

REQUEST_FILE = "request.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
CHECKPOINT_DIR = "checkpoint"


def _import_gptqmodel() -> Any:
    # gptqmodel sizes its CPU worker pool from os.cpu_count(): one worker on a 2-core machine,
    # which stalls its quantize loop; two workers are enough and do not oversubscribe.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    try:
        import gptqmodel
    except ImportError as err:
        raise InvalidArgument(
            "method", f"gptqmodel is not installed (pip install -e '.[quant]'): {err}"
        ) from None
    return gptqmodel


def build_quant_config(method: str, settings: dict[str, Any]) -> Any:
    """gptqmodel's config for ``method`` (gptq, awq, or rtn: the round-to-nearest control)."""
    _import_gptqmodel()
    from gptqmodel.quantization import AWQConfig, GPTQConfig, RTNConfig

    common = {
        "bits": settings["bits"],
        "group_size": settings["group_size"],
        "sym": settings["sym"],
        # Small models fit in memory; spilling finished layers to disk only costs time.
        "offload_to_disk": False,
    }
    if method == "gptq":
        return GPTQConfig(
            **common, desc_act=settings["desc_act"], damp_percent=settings["damp_percent"]
        )
    if method == "awq":
        return AWQConfig(**common)
    if method == "rtn":
        return RTNConfig(**common)
    raise InvalidArgument("method", f"unknown quantization method {method!r}")


def _pack_awq_from_float32() -> None:
    """Let gptqmodel pack AWQ weights searched in float32 (it accepts only half precision).

    The packer turns weights into integer codes plus per-group scales and zero points; the
    dtype check only guards the kernel's forward, which quantization never runs. The model is
    cast to bfloat16 before saving, so the checkpoint holds bfloat16 scales as usual.
    """
    import torch
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    if torch.float32 not in AwqTorchLinear.SUPPORTS_DTYPES:
        AwqTorchLinear.SUPPORTS_DTYPES = [*AwqTorchLinear.SUPPORTS_DTYPES, torch.float32]


def _clip_search_as_matmuls() -> None:
    """Replace AWQ's clipping search by the same search written as batched matmuls (CPU).

    gptqmodel 7.7's ``AWQProcessor._compute_best_clip`` computes each group's output as an
    elementwise product summed over the group ([out, tokens, groups, group size] tensors), at
    10 clipping ratios for every linear layer: on this 2-core CPU that was 1-2 minutes per
    SmolLM2 layer, most of AWQ's time. Here each group's output is one ``bmm`` per ratio; the
    candidates (the same ratios, the same pseudo-quantizer, the same 512-token sample), the
    error (mean squared output difference per output row and group) and the choice (first
    minimum) are unchanged; tests/quantize checks it against the original.
    """
    import torch
    from gptqmodel.looper.awq_processor import AWQProcessor

    if getattr(AWQProcessor._compute_best_clip, "_qsens", False):
        return

    @torch.inference_mode()
    def compute_best_clip(
        self: Any,
        w: Any,
        input_feat: Any,
        n_grid: int = 20,
        max_shrink: float = 0.5,
        n_sample_token: int = 512,
    ) -> Any:
        out_features, in_features = w.shape
        group = self.qcfg.group_size if self.qcfg.group_size > 0 else in_features
        groups = in_features // group
        x = input_feat.reshape(-1, in_features)
        x = x[:: max(1, x.shape[0] // n_sample_token)].float()
        x = x.reshape(-1, groups, group).transpose(0, 1)  # [groups, tokens, group]
        w4 = w.float().reshape(out_features, 1, groups, group)

        def outputs(weights: Any) -> Any:  # [groups, tokens, out]
            return torch.bmm(x, weights.reshape(out_features, groups, group).permute(1, 2, 0))

        reference = outputs(w4)
        org_max = w4.abs().amax(dim=-1, keepdim=True)  # [out, 1, groups, 1]
        best_err = torch.full((out_features, 1, groups, 1), float("inf"))
        best_max = org_max.clone()
        clamped, quantized = torch.empty_like(w4), torch.empty_like(w4)
        for step in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - step / n_grid)
            torch.clamp(w4, -max_val, max_val, out=clamped)
            self._pseudo_quantize_tensor_into(clamped, quantized, abs_max=max_val)
            err = (outputs(quantized) - reference).pow_(2).mean(dim=1)  # [groups, out]
            err = err.transpose(0, 1).reshape(out_features, 1, groups, 1).nan_to_num(nan=torch.inf)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, max_val, best_max)
        return best_max.squeeze(1).to(w.dtype)

    compute_best_clip._qsens = True  # type: ignore[attr-defined]
    # Kept so tests (and anyone comparing) can reach gptqmodel's own search afterwards.
    compute_best_clip._qsens_original = AWQProcessor._compute_best_clip  # type: ignore[attr-defined]
    AWQProcessor._compute_best_clip = compute_best_clip


def check_shapes(config: dict[str, Any], group_size: int, model: str) -> None:
    """Refuse a group size that does not divide the widths of the linear layers it quantizes."""
    if group_size <= 0:
        return
    text = config.get("text_config") or config
    for name in ("hidden_size", "intermediate_size"):
        width = text.get(name)
        if isinstance(width, int) and width % group_size:
            fits = [g for g in (32, 64, 128, 256) if width % g == 0]
            raise InvalidArgument(
                "settings.group_size",
                f"group size {group_size} does not divide {name}={width} of {model}"
                + (f" (use {' or '.join(map(str, fits))})" if fits else ""),
            )


def quantize_folder(
    request: QuantizeRequest,
    calibration: CalibrationSet,
    out: Path,
    cache_dir: Path,
    *,
    method: str | None = None,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Quantize ``request``'s model into ``out``; ``method`` overrides (the bench's rtn control)."""
    gptqmodel = _import_gptqmodel()
    import torch
    import transformers
    from transformers import AutoTokenizer

    from services.loader.model_source import resolve_source

    method = method or request.method
    settings = request.typed_settings.model_dump(mode="json")
    source = resolve_source(request.source, cache_dir, request.model)
    config_path = source.folder / "config.json"
    if config_path.is_file():
        check_shapes(json.loads(config_path.read_text()), settings["group_size"], request.model)
    tokenizer = AutoTokenizer.from_pretrained(str(source.folder))
    samples = tokenize_samples(
        calibration, tokenizer, request.calibration.samples, request.calibration.seq_len
    )
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if method == "awq" and not on_gpu:
        _pack_awq_from_float32()
        _clip_search_as_matmuls()
    started = time.perf_counter()
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # gptqmodel writes per-run logs under ./logs: keep them beside the output, not in the
    # caller's working directory (a checkout, a container's workdir).
    with contextlib.chdir(out.parent):
        model = gptqmodel.GPTQModel.load(
            str(source.folder.resolve()),
            build_quant_config(method, settings),
            device="cuda:0" if on_gpu else "cpu",
            dtype=dtype,
        )
        model.quantize(samples.input_ids, batch_size=batch_size, tokenizer=tokenizer)
    seconds = time.perf_counter() - started
    # Integer codes are unaffected; scales and unquantized weights are stored in bfloat16.
    model.model.to(torch.bfloat16)
    model.model.config.dtype = torch.bfloat16
    model.save(str(out))
    tokenizer.save_pretrained(str(out))
    info = {
        "request": request.model_dump(mode="json"),
        "method": method,
        "settings": settings,
        "source": {"source": source.source, "notes": list(source.notes)},
        "calibration": {
            **calibration.describe(),
            "samples": len(samples.input_ids),
            "tokens": samples.tokens,
        },
        "quantize_seconds": round(seconds, 2),
        "device": "cuda" if on_gpu else "cpu",
        "quantize_dtype": str(dtype).removeprefix("torch."),
        "libraries": {
            "gptqmodel": gptqmodel.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    from services.quantizer.checkpoint import INFO_FILE

    (out / INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True))
    return info


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child process; exit 0 done, 2 bad input (error.json), 1 failure."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m services.quantizer.run WORKDIR", file=sys.stderr)
        return 2
    workdir = Path(args[0])
    try:
        doc = json.loads((workdir / REQUEST_FILE).read_text())
        request = parse_request(doc["request"])
        cal = doc["calibration"]
        calibration = CalibrationSet(
            cal["name"], tuple(cal["texts"]), cal["sha256"], int(cal["size_bytes"])
        )
        info = quantize_folder(
            request, calibration, workdir / CHECKPOINT_DIR, Path(doc["cache_dir"])
        )
    except QsensError as err:
        (workdir / ERROR_FILE).write_text(
            json.dumps(
                {
                    "type": type(err).__name__,
                    "field": getattr(err, "field", ""),
                    "message": getattr(err, "message", str(err)),
                }
            )
        )
        return 2
    except Exception:
        traceback.print_exc()
        return 1
    (workdir / RESULT_FILE).write_text(json.dumps(info, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
