"""``qsens run`` checks sizes and the run id before writing anything, and a failed submit leaves
nothing behind (issue 15 item 8), on a real NATS and a real S3.

A second nats-server with a small ``max_payload`` makes an oversized job record reachable with
a spec of ordinary size; the session's server (1 MB messages) takes the 1.2 MB spec of the
issue through the CLI.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from services.common import localstack
from services.common import settings as settings_mod
from services.common.dag import plan_key
from services.common.errors import InvalidArgument, NotFound
from services.common.natsconn import connection
from services.common.planner import build_plan
from services.common.settings import NatsSettings
from services.common.spec import ExperimentSpec, parse_spec
from services.common.state import JobRecord, JobState, StateStore
from services.common.store import AsyncS3Store, S3Store, run_key, run_prefix
from services.common.submission import ABANDONED_S, _run_record, submit_run, undo_submit
from tests.analyzer.conftest import store_for

REPO = Path(__file__).resolve().parents[2]
SMALL_PAYLOAD = 50_000

BASE = {
    "name": "guard",
    "models": [{"name": "m", "source": "tiny:llama"}],
    "precisions": ["bf16"],
    "traits": ["pv/evil"],
    "steering": {"enabled": False},
    "logit_diff": {"enabled": False},
    "probes": {"enabled": False},
}


def _spec(**over: object) -> ExperimentSpec:
    return parse_spec({**BASE, **over})


@pytest.fixture(scope="module")
def small_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[localstack.NatsServer]:
    """A nats-server whose messages carry at most ``SMALL_PAYLOAD`` bytes (reloaded config)."""
    server = localstack.start_nats(tmp_path_factory.mktemp("small-nats"))
    with open(server.config_path, "a") as f:
        f.write(f"max_payload: {SMALL_PAYLOAD}\n")
    os.kill(server.process.pid, signal.SIGHUP)

    async def payload() -> int:
        nc = await nats.connect(server.url, user=server.user, password=server.password)
        try:
            return int(nc.max_payload)
        finally:
            await nc.close()

    deadline = time.monotonic() + 10
    while asyncio.run(payload()) != SMALL_PAYLOAD:
        assert time.monotonic() < deadline, "nats-server did not reload max_payload"
        time.sleep(0.2)
    yield server
    server.stop(timeout_s=5)


@pytest.fixture
def small_env(
    small_nats: localstack.NatsServer, s3_env: object, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    for key, value in {
        **small_nats.env(),
        "QSENS_NATS_NAMESPACE": "g" + uuid.uuid4().hex[:8],
    }.items():
        monkeypatch.setenv(key, value)
    settings_mod.reset()
    yield
    settings_mod.reset()


async def _left(store: AsyncS3Store, run_id: str) -> tuple[list[str], bool]:
    """S3 keys under the run, and whether a run record exists."""
    keys = await store.list_keys(run_prefix(run_id))
    async with connection() as nc:
        state = await StateStore.open(nc.jetstream(), settings_mod.get(NatsSettings))
        try:
            await state.get_run(run_id)
        except NotFound:
            return keys, False
    return keys, True


@pytest.mark.usefixtures("small_env")
def test_an_oversized_record_is_refused_before_anything_is_written(run_id: str) -> None:
    store = AsyncS3Store()
    # The analyze job carries the spec: its record alone is over the server's limit.
    big = _spec(description="x" * 60_000)
    with pytest.raises(InvalidArgument) as err:
        asyncio.run(submit_run(big, run_id, store=store))
    assert err.value.field == "spec"
    assert "job 'analyze' would need a" in err.value.message
    assert f"at most {SMALL_PAYLOAD} bytes" in err.value.message
    assert asyncio.run(_left(store, run_id)) == ([], False)
    # The run id is free: a spec that fits is submitted under it.
    small = _spec()
    assert asyncio.run(submit_run(small, run_id, store=store)) == run_id
    keys, has_run = asyncio.run(_left(store, run_id))
    assert has_run and run_key(run_id, "spec.json") in keys and plan_key(run_id) in keys
    # Submitting the same spec again is a no-op; another spec under the id is refused first.
    assert asyncio.run(submit_run(small, run_id, store=store)) == run_id
    with pytest.raises(Exception, match="already used by another run"):
        asyncio.run(submit_run(_spec(precisions=["bf16", "nf4"]), run_id, store=store))


@pytest.mark.usefixtures("small_env")
def test_leftovers_of_an_old_failed_submit_do_not_hold_the_run_id(run_id: str) -> None:
    # What the old `qsens run` left after MaxPayloadError: spec.json and plan.json, no records.
    sync = S3Store()
    sync.put_json(run_key(run_id, "spec.json"), {"name": "old"})
    sync.put_json(plan_key(run_id), {"spec_hash": "old", "job_ids": ["x"]})
    spec = _spec()
    assert asyncio.run(submit_run(spec, run_id)) == run_id
    assert sync.get_json(run_key(run_id, "spec.json")) == spec.model_dump(mode="json")
    assert sync.get_json(plan_key(run_id))["spec_hash"] == spec.fingerprint()


@pytest.mark.usefixtures("small_env")
def test_undo_removes_a_partial_submit_and_keeps_a_complete_one(run_id: str) -> None:
    store = AsyncS3Store()
    spec = _spec()

    async def partial(run_id: str, complete: bool) -> bool:
        plan = build_plan(spec, run_id)
        async with connection() as nc:
            js = nc.jetstream()
            cfg = settings_mod.get(NatsSettings)
            state = await StateStore.open(js, cfg)
            await store.put_json(run_key(run_id, "spec.json"), spec.model_dump(mode="json"))
            await store.put_json(plan_key(run_id), {"spec_hash": plan.spec_hash})
            assert await state.create_run(_run_record(plan))
            jobs = plan.jobs if complete else plan.jobs[:1]
            for job in jobs:
                assert await state.create_job(JobRecord(job=job, state=JobState.PENDING))
            return await undo_submit(plan, js, store, cfg)

    assert asyncio.run(partial(run_id, complete=False)) is True
    assert asyncio.run(_left(store, run_id)) == ([], False)
    # After the undo the id takes a different spec (records and objects were really removed).
    other = _spec(precisions=["bf16", "nf4"])
    assert asyncio.run(submit_run(other, run_id, store=store)) == run_id
    # A submit whose every record exists may have published roots: it is kept.
    rid2 = run_id + "-b"
    assert asyncio.run(partial(rid2, complete=True)) is False
    keys, has_run = asyncio.run(_left(store, rid2))
    assert has_run and keys


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_qsens_run_refuses_a_spec_over_1_mb_and_the_run_id_stays_free(
    nats_server: localstack.NatsServer,
    s3_server: localstack.S3Server,
    tmp_path: Path,
    run_id: str,
) -> None:
    env = {
        **nats_server.env(),
        **s3_server.env(),
        "QSENS_NATS_NAMESPACE": "r" + uuid.uuid4().hex[:8],
    }
    big = tmp_path / "big.yaml"
    lines = "".join(f"# filler line {i:07d} {'x' * 40}\n" for i in range(20_000))
    big.write_text(
        "name: guard\nmodels: [{name: m, source: 'tiny:llama'}]\nprecisions: [bf16]\n"
        "traits: [pv/evil]\n" + lines
    )
    assert big.stat().st_size > 1_000_000
    out = _cli("run", str(big), "--run-id", run_id, "--detach", "--local", env=env)
    assert out.returncode == 2, out.stderr
    assert "over the 256 KiB a spec may have" in " ".join(out.stderr.split())
    assert "Traceback" not in out.stderr
    keys = store_for(s3_server).list_keys(run_prefix(run_id))
    assert keys == []
    small = tmp_path / "small.yaml"
    small.write_text(
        "name: guard\nmodels: [{name: m, source: 'tiny:llama'}]\nprecisions: [bf16]\n"
        "traits: [pv/evil]\nsteering: {enabled: false}\nlogit_diff: {enabled: false}\n"
    )
    out = _cli("run", str(small), "--run-id", run_id, "--detach", "--local", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == run_id


@pytest.mark.usefixtures("small_env")
def test_a_half_made_run_left_by_an_old_submit_frees_its_id_once_abandoned(run_id: str) -> None:
    # What the old `qsens run` left when MaxPayloadError hit the job records: spec.json,
    # plan.json, the run record and some of the job records.
    store = AsyncS3Store()
    old = build_plan(_spec(precisions=["bf16", "nf4"]), run_id)

    async def leave(age_s: float) -> None:
        async with connection() as nc:
            state = await StateStore.open(nc.jetstream(), settings_mod.get(NatsSettings))
            record = _run_record(old).model_copy(update={"created_at": time.time() - age_s})
            await state.runs.put(run_id, record.model_dump_json().encode())
            await state.create_job(JobRecord(job=old.jobs[0], state=JobState.PENDING))
        await store.put_json(run_key(run_id, "spec.json"), {"name": "old"})
        await store.put_json(plan_key(run_id), {"spec_hash": old.spec_hash})

    asyncio.run(leave(age_s=5))  # recent: may be a submit still under way
    with pytest.raises(Exception, match="already used by another run"):
        asyncio.run(submit_run(_spec(), run_id, store=store))
    asyncio.run(leave(age_s=ABANDONED_S + 60))
    assert asyncio.run(submit_run(_spec(), run_id, store=store)) == run_id
    sync = S3Store()
    assert sync.get_json(run_key(run_id, "spec.json")) == _spec().model_dump(mode="json")
