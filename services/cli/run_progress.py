"""Plain-text views of a run in progress for ``qsens run`` and ``qsens status``: job counts per
kind, the progress line, the run's loaders and the local stack's restarts."""

from __future__ import annotations

import time
from typing import Any

from services.common.errors import QsensError

__all__ = ["loader_line", "loader_rows", "progress_line", "run_variants", "stack_restarts"]


def _kind_counts(records: list[Any]) -> dict[str, dict[str, int]]:
    """Per job kind: total, done, running, retried (an attempt failed or found no loader),
    waiting (queued until its loader, announced, is ready) and dead counts."""
    out: dict[str, dict[str, int]] = {}
    for record in records:
        c = out.setdefault(
            record.job.kind.value,
            {"total": 0, "done": 0, "running": 0, "dead": 0, "retried": 0, "waiting": 0},
        )
        c["total"] += 1
        state = record.state.value
        if state in c:
            c[state] += 1
        if record.failures or record.unavailable:
            c["retried"] += 1
        if state == "queued" and (record.error or "").startswith("LoaderStarting"):
            c["waiting"] += 1
    return dict(sorted(out.items()))


def progress_line(elapsed: float, counts: dict[str, dict[str, int]]) -> str:
    """One plain progress line: ``[  3m05s] extract 4/6 (2 running)  steer 0/12 ...``."""
    parts = []
    for kind, c in counts.items():
        extra = [f"{c['running']} running"] if c["running"] else []
        if c["retried"]:
            extra.append(f"{c['retried']} retried")
        if c.get("waiting"):
            extra.append(f"{c['waiting']} waiting for their loader")
        if c["dead"]:
            extra.append(f"{c['dead']} dead")
        parts.append(
            f"{kind} {c['done']}/{c['total']}" + (f" ({', '.join(extra)})" if extra else "")
        )
    minutes, seconds = divmod(int(elapsed), 60)
    return f"[{minutes:3d}m{seconds:02d}s] " + "  ".join(parts)


#: Seconds between plain progress lines when nothing changed (stdout not a terminal).


def stack_restarts() -> list[str]:
    """Restart lines of the local stack under QSENS_HOME (none when there is no stack)."""
    from services.common import settings as settings_mod
    from services.common.localstack import load_stack
    from services.common.localstack.supervisor import restart_lines

    try:
        stack = load_stack(settings_mod.get(settings_mod.CommonSettings).home.resolve())
    except QsensError:
        return []
    return restart_lines(stack) if stack is not None else []


def run_variants(records: list[Any]) -> list[str]:
    """The variants a run's jobs talk to (quantize jobs: the variant they make weights for)."""
    found: set[str] = set()
    for r in records:
        params = r.job.params
        for key in ("variant", "target"):
            if isinstance(params.get(key), str):
                found.add(params[key])
        if r.job.kind.value == "quantize" and {"model", "method"} <= set(params):
            found.add(f"{params['model']}@{params['method']}")
    return sorted(found)


def loader_rows(records: list[Any], entries: list[Any]) -> list[dict[str, Any]]:
    """One row per loader of the run's variants (and one 'none' row per variant without)."""
    rows: list[dict[str, Any]] = []
    for variant in run_variants(records):
        mine = [e for e in entries if e.variant == variant]
        if not mine:
            rows.append({"variant": variant, "state": "none", "since": None, "detail": ""})
        for e in sorted(mine, key=lambda e: (e.state != "ready", e.address)):
            caps = e.engine_capabilities()
            rows.append(
                {
                    "variant": variant,
                    "state": e.state,
                    "since": e.since,
                    "address": e.address,
                    "detail": e.detail,
                    "host": e.host,
                    # Jobs go to the loaders whose engine computes them exactly.
                    "engine": caps.engine if caps is not None else "",
                }
            )
    return rows


def loader_line(row: dict[str, Any], now: float | None = None) -> str:
    """``smollm2@gptq  waiting since 12:03:04 (5m10s) for checkpoint ... made by the job ...``."""
    head = f"{row['variant']:<28} {row['state']:<8}"
    if row["state"] == "none":
        return head + " no loader announced"
    if row["state"] == "ready":
        engine = row.get("engine")
        return f"{head} at {row['address']}" + (f" ({engine} engine)" if engine else "")
    since = row.get("since")
    if since is None:
        return f"{head} {row['detail']}".rstrip()
    waited = int((now if now is not None else time.time()) - since)
    minutes, seconds = divmod(max(0, waited), 60)
    stamp = time.strftime("%H:%M:%S", time.localtime(since))
    return f"{head} since {stamp} ({minutes}m{seconds:02d}s) {row['detail']}".rstrip()
