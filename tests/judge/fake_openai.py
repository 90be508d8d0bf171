"""A local OpenAI chat-completions endpoint for the judge's tests and benchmark.

It speaks the real JSON wire format over real HTTP (stdlib ``ThreadingHTTPServer``, HTTP/1.1
keep-alive), so the official ``openai`` client talks to it unchanged. It stands in for the paid
endpoint and injects faults: the answer inside ``[ANSWER START]``/``[ANSWER END]`` selects the
first-token log-prob table (``tables``; else the question inside ``[QUESTION START]``/``[QUESTION
END]`` selects one from ``by_question``) and a queue of faults (``faults``) consumed one per
request: ``429`` / ``429:<retry-after>``, ``500``, ``503``, ``400``, ``sleep:<s>`` (answer after a
delay, to trip client timeouts), ``truncated`` (a cut JSON body), ``nologprobs``. ``fail_all``
applies one fault to every request. Every request is recorded in ``calls``.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Call", "FakeOpenAI", "fake_openai", "table"]

_ANSWER = re.compile(r"\[ANSWER START\]\n?(.*?)\n?\[ANSWER END\]", re.DOTALL)
_QUESTION = re.compile(r"\[QUESTION START\]\n?(.*?)\n?\[QUESTION END\]", re.DOTALL)


def table(probs: dict[str, float]) -> list[tuple[str, float]]:
    """A log-prob table from token probabilities."""
    return [(tok, math.log(p) if p > 0 else -math.inf) for tok, p in probs.items()]


@dataclass
class Call:
    answer: str
    action: str
    at: float
    body: dict[str, Any]
    authorization: str


@dataclass
class FakeOpenAI:
    """Shared state of the fake endpoint (set it from tests; read ``calls``)."""

    latency_s: float = 0.0
    tables: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    by_question: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    default_table: list[tuple[str, float]] = field(
        default_factory=lambda: table({"70": 0.5, "80": 0.5})
    )
    faults: dict[str, list[str]] = field(default_factory=dict)
    fail_all: str | None = None
    calls: list[Call] = field(default_factory=list)
    active: int = 0
    peak_active: int = 0
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def calls_for(self, answer: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.answer == answer]

    @property
    def call_count(self) -> int:
        with self.lock:
            return len(self.calls)

    def _next_action(self, answer: str) -> str:
        with self.lock:
            if self.fail_all is not None:
                return self.fail_all
            queue = self.faults.get(answer)
            return queue.pop(0) if queue else "ok"

    def completion(
        self, answer: str, *, logprobs: bool = True, question: str = ""
    ) -> dict[str, Any]:
        top = self.tables.get(answer) or self.by_question.get(question, self.default_table)
        best = max(top, key=lambda t: t[1])
        content = [
            {
                "token": best[0],
                "logprob": best[1],
                "bytes": list(best[0].encode()),
                "top_logprobs": [
                    {"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top
                ],
            }
        ]
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "fake-judge",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": best[0]},
                    "logprobs": {"content": content} if logprobs else None,
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101},
        }


def _handler(state: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in separate writes: without this, Nagle's algorithm and
        # delayed ACKs add ~40 ms to every response.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            return None

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            with suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)

        def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
            body = json.dumps({"error": {"message": message, "type": "fake", "code": status}})
            self._send(status, body.encode(), headers)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            if not self.path.endswith("/chat/completions"):
                self._error(404, "not found")
                return
            prompt = body["messages"][-1]["content"]
            match = _ANSWER.search(prompt)
            answer = match.group(1) if match else prompt
            asked = _QUESTION.search(prompt)
            question = asked.group(1) if asked else ""
            action = state._next_action(answer)
            with state.lock:
                state.calls.append(
                    Call(
                        answer,
                        action,
                        time.monotonic(),
                        body,
                        self.headers.get("Authorization", ""),
                    )
                )
                state.active += 1
                state.peak_active = max(state.peak_active, state.active)
            try:
                self._respond(answer, action, question)
            finally:
                with state.lock:
                    state.active -= 1

        def _respond(self, answer: str, action: str, question: str = "") -> None:
            if state.latency_s:
                time.sleep(state.latency_s)
            kind, _, arg = action.partition(":")
            if kind == "429":
                self._error(429, "rate limited", {"Retry-After": arg or "0"})
            elif kind in ("500", "503", "400"):
                self._error(int(kind), f"injected {kind}")
            elif kind == "truncated":
                data = json.dumps(state.completion(answer)).encode()
                self._send(200, data[: len(data) // 2])
            elif kind == "nologprobs":
                self._send(200, json.dumps(state.completion(answer, logprobs=False)).encode())
            else:
                if kind == "sleep":
                    time.sleep(float(arg))
                reply = state.completion(answer, question=question)
                self._send(200, json.dumps(reply).encode())

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


@contextmanager
def fake_openai(state: FakeOpenAI | None = None) -> Iterator[FakeOpenAI]:
    """Serve a fake endpoint on a free loopback port for the duration of the block."""
    state = state or FakeOpenAI()
    server = _Server(("127.0.0.1", 0), _handler(state))
    state.port = int(server.server_address[1])
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-openai", daemon=True
    )
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
