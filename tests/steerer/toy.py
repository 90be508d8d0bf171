"""Toy models with known steering behaviour, a rule-based judge endpoint, and artefact writers.

Toy models are real Llama checkpoints (the tiny byte-level tokenizer, 4 layers, hidden 64)
whose decoder layers are exact identities (zero ``o_proj``/``down_proj``), so the model is a
bigram table: the next token depends only on the current token's embedding plus whatever
steering added to the residual stream. Residual dims: 0 = the trait direction ``v``, 1 = a
constant bias every embedding carries, 2 = a planted CAA direction ``w``, 4.. = one-hot
slots of the characters that matter. With ``x`` the component of the residual along ``v``
(``x = coefficient * ||vector||`` when steering with ``vector = s * v``), the logits of the
``pv`` toy, before the final norm's common positive scale, are:

* the chain successor of the current character: 1 (text ``"abcdefghij abcd..."``),
* ``T``: ``x``; ``U``: ``2x - 3``; ``!``: ``4x - 15``,

so greedy answers are the chain for ``x < 1``, ``TTTT`` for ``1 < x < 3``, ``UUUU`` for
``3 < x < 6`` and ``!!!!`` (the collapse) beyond ``x = 6``. After an assistant prefix ``"("``
the letters score ``logit(A) = y`` and ``logit(B) = 0.5`` with ``y`` the component along ``w``,
so ``logit(A) - logit(B)`` changes sign at ``y = 0.5``.

The ``refusal`` toy puts ``4 v`` into the embedding of ``"\\n"`` (the last prompt token of every
chat prompt), so its answers open with ``I`` and run on as ``"I can't can't ..."``; with ``v``
ablated after every layer the ``\\n`` step sees ``x = 0`` and the answer is
``"Sure.Sure.Sure."``.

The judge endpoint (``ToyJudge``) speaks the OpenAI chat-completions wire format (the judge's
``openai`` backend calls it unchanged) and scores an answer by rule: collapse ``!`` (trait 95,
coherence 10), ``U`` (80, 75), ``T`` (50, 85), ``I can...`` (90, 80), ``Sure`` (5, 88), other text
(10, 90).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import numpy as np

from services.common.artefacts import ExtractSummary, VettingSummary, extract_key
from services.common.store import S3Store
from services.extractor.methods import VectorSet

HIDDEN = 64
LAYERS = 4
V_DIM, BIAS_DIM, CAA_DIM, DEAD_DIM = 0, 1, 2, 3
COLLAPSE_X = 6.0  # ||c * v|| beyond which the pv toy's answers collapse
PV_CHAIN = "abcdefghij "
REFUSAL_CHAIN = "I can't"
COMPLY_CHAIN = "Sure."


def unit(dim: int) -> np.ndarray:
    """A unit vector along residual dim ``dim``."""
    out = np.zeros(HIDDEN, dtype=np.float32)
    out[dim] = 1.0
    return out


def build_toy(folder: Path, kind: Literal["pv", "refusal"]) -> Path:
    """Write the toy checkpoint to ``folder`` (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.loader.tiny import build_tiny

    if (folder / "config.json").exists():
        return folder
    base = build_tiny(f"tiny:llama?layers={LAYERS}&hidden={HIDDEN}", folder.parent / "cache")
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)

    def tid(ch: str) -> int:
        ids = tok.encode(ch, add_special_tokens=False)
        assert len(ids) == 1, (ch, ids)
        return int(ids[0])

    vocab = model.get_input_embeddings().weight.shape[0]
    emb = torch.zeros(vocab, HIDDEN)
    head = torch.zeros(vocab, HIDDEN)
    emb[:, BIAS_DIM] = 1.0
    chars = sorted(set(PV_CHAIN + REFUSAL_CHAIN + COMPLY_CHAIN + "\nTU!(AB"))
    slot = {ch: 4 + i for i, ch in enumerate(chars)}
    assert max(slot.values()) < HIDDEN
    for ch, dim in slot.items():
        emb[tid(ch), dim] = 1.0

    def link(a: str, b: str) -> None:
        head[tid(b), slot[a]] += 1.0

    if kind == "pv":
        chain = "\n" + PV_CHAIN
        for a, b in itertools.pairwise(chain):
            link(a, b)
        link(PV_CHAIN[-1], PV_CHAIN[0])
        head[tid("T"), V_DIM] = 1.0
        head[tid("U"), V_DIM], head[tid("U"), BIAS_DIM] = 2.0, -3.0
        head[tid("!"), V_DIM], head[tid("!"), BIAS_DIM] = 4.0, -15.0
        head[tid("A"), CAA_DIM] = 1.0
        head[tid("B"), slot["("]] = 0.5
    else:
        emb[tid("\n"), V_DIM] = 4.0
        head[tid("I"), V_DIM], head[tid("I"), BIAS_DIM] = 1.0, -1.0
        refusal = REFUSAL_CHAIN + " "
        for a, b in itertools.pairwise(refusal):
            link(a, b)
        link(" ", "c")  # "I can't can't can't ..."
        comply = "\n" + COMPLY_CHAIN
        for a, b in itertools.pairwise(comply):
            link(a, b)
        link(COMPLY_CHAIN[-1], COMPLY_CHAIN[0])
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(emb)
        model.get_output_embeddings().weight.copy_(head)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# -- the judge endpoint --------------------------------------------------------------------

_ANSWER = re.compile(r"\[ANSWER START\]\n?(.*?)\n?\[ANSWER END\]", re.DOTALL)


def toy_scores(answer: str) -> tuple[int, int]:
    """(trait, coherence) of an answer by rule."""
    text = answer.strip()
    if text.startswith("I can"):
        return 90, 80
    if text.startswith("Sure"):
        return 5, 88
    counts = {ch: text.count(ch) for ch in "!UT"}
    top = max(counts, key=lambda ch: counts[ch])
    if text and counts[top] * 2 > len(text):
        return {"!": (95, 10), "U": (80, 75), "T": (50, 85)}[top]
    return 10, 90


@dataclass
class ToyJudge:
    """Shared state of the rule-based judge endpoint."""

    port: int = 0
    calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def _handler(state: ToyJudge) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            return None

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            prompt = body["messages"][-1]["content"]
            match = _ANSWER.search(prompt)
            answer = match.group(1) if match else ""
            trait, coherence = toy_scores(answer)
            score = str(coherence if "grading the coherence" in prompt else trait)
            with state.lock:
                state.calls += 1
            top = [{"token": score, "logprob": 0.0, "bytes": list(score.encode())}]
            data = json.dumps(
                {
                    "id": "chatcmpl-toy",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": "toy-judge",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": score},
                            "logprobs": {"content": [{**top[0], "top_logprobs": top}]},
                            "finish_reason": "length",
                        }
                    ],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101},
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            with suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(data)

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True


@contextmanager
def toy_judge() -> Iterator[ToyJudge]:
    """Serve the rule-based judge on a free loopback port."""
    state = ToyJudge()
    server = _Server(("127.0.0.1", 0), _handler(state))
    state.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


# -- extraction artefacts (the extractor's contract) ----------------------------------------


def write_extraction(
    store: S3Store,
    run_id: str,
    variant: str,
    trait: str,
    vectors: np.ndarray,
    *,
    activation_norm: float = 1.6,
    method: str = "mean_diff",
    mode: Literal["native", "replay"] = "native",
) -> str:
    """Write ``summary.json`` and ``vectors/<method>.safetensors`` as the extractor does."""
    layers = list(range(vectors.shape[0]))
    count = len(layers)
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    vs = VectorSet(
        method=method,
        vectors=vectors.astype(np.float32),
        auroc=np.full(count, 0.9),
        norms=norms,
        raw_norms=norms,
        massive_dim_energy=np.zeros(count),
        massive_dims=np.zeros((count, 4), dtype=np.int64),
        massive_ratio=np.ones(count),
        zero_norm=norms == 0,
        nonfinite=np.zeros(count, dtype=bool),
        layers=tuple(layers),
        n_pos=8,
        n_neg=8,
    )
    key = extract_key(run_id, variant, trait, mode, "vectors", f"{method}.safetensors")
    store.put_bytes(key, vs.to_safetensors())
    model, precision = variant.split("@")
    summary = ExtractSummary(
        run_id=run_id,
        variant=variant,
        model=model,
        precision=precision,
        trait=trait,
        methodology=trait.split("/")[0],
        mode=mode,
        position="prompt[-1]",
        layers=layers,
        methods=[method],
        n_train_pos=8,
        n_train_neg=8,
        n_val_pos=0,
        n_val_neg=0,
        activation_norm=[activation_norm] * count,
        vector_keys={method: key},
        vetting=VettingSummary(enabled=False),
    )
    store.put_json(
        extract_key(run_id, variant, trait, mode, "summary.json"), summary.model_dump(mode="json")
    )
    return key
