"""Job ids and run plans: stable hashing, normalisation and DAG validation."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.common.jobs import Job, JobKind, RunPlan, parse_job


def make(run: str = "r1", **params: object) -> Job:
    return Job(kind=JobKind.NOOP, run_id=run, params=dict(params))


def test_id_is_stable_and_ignores_the_label() -> None:
    a = Job(kind="extract", run_id="r1", params={"x": 1, "y": [1, 2]}, name="first")
    b = Job(kind="extract", run_id="r1", params={"y": [1, 2], "x": 1}, name="other label")
    assert a.id == b.id
    assert len(a.id) == 16
    assert a.id != Job(kind="steer", run_id="r1", params={"x": 1, "y": [1, 2]}).id
    assert a.id != Job(kind="extract", run_id="r2", params={"x": 1, "y": [1, 2]}).id
    assert a.id != Job(kind="extract", run_id="r1", params={"x": 2, "y": [1, 2]}).id


def test_deps_are_sorted_and_deduplicated() -> None:
    a = Job(kind="noop", run_id="r1", deps=["b", "a", "b"])
    b = Job(kind="noop", run_id="r1", deps=("a", "b"))
    assert a.deps == ("a", "b")
    assert a.id == b.id
    assert a.id != Job(kind="noop", run_id="r1", deps=["a"]).id


def test_wire_round_trip_checks_the_id() -> None:
    job = make(alpha=0.5)
    assert parse_job(job.to_json()) == job
    tampered = job.to_json().replace(b'"alpha":0.5', b'"alpha":0.7')
    with pytest.raises(InvalidArgument, match="does not match"):
        parse_job(tampered)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"{not json", "job"),
        (b'{"kind": "bake", "run_id": "r1"}', "job.kind"),
        (b'{"kind": "noop", "run_id": "../etc"}', "job.run_id"),
        (b'{"kind": "noop", "run_id": "r1", "extra": 1}', "job.extra"),
    ],
)
def test_bad_jobs_name_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_job(raw)
    assert info.value.field == field


def test_plan_orders_and_maps_the_dag() -> None:
    a, b = make(n=1), make(n=2)
    c = Job(kind="analyze", run_id="r1", deps=[a.id, b.id])
    d = Job(kind="noop", run_id="r1", deps=[c.id])
    plan = RunPlan(run_id="r1", spec_hash="s", jobs=[d, c, b, a])
    assert {j.id for j in plan.roots()} == {a.id, b.id}
    assert plan.dependents()[a.id] == (c.id,)
    assert plan.dependents()[d.id] == ()
    order = [j.id for j in plan.topological_order()]
    assert order.index(c.id) > max(order.index(a.id), order.index(b.id))
    assert order[-1] == d.id


def test_plan_rejects_unknown_deps_naming_the_job() -> None:
    a = make(n=1)
    b = Job(kind="noop", run_id="r1", deps=[a.id, "feedfeedfeedfeed"], name="needs-ghost")
    with pytest.raises(InvalidArgument) as info:
        RunPlan(run_id="r1", spec_hash="s", jobs=[a, b])
    assert info.value.field == "jobs[1].deps[1]"
    assert "needs-ghost" in str(info.value)


def test_plan_rejects_foreign_and_duplicate_jobs() -> None:
    with pytest.raises(InvalidArgument, match=r"jobs\[1\].run_id"):
        RunPlan(run_id="r1", spec_hash="s", jobs=[make(n=1), make("r2", n=1)])
    with pytest.raises(InvalidArgument, match="duplicates jobs"):
        RunPlan(run_id="r1", spec_hash="s", jobs=[make(n=1), make(n=1)])


def test_plan_rejects_cycles_naming_the_jobs() -> None:
    # Hash ids make cycles impossible to build honestly; force ids to show the check works.
    a = Job(kind="noop", run_id="r1", deps=["bbbb"], name="job-a")
    b = Job(kind="noop", run_id="r1", deps=["aaaa"], name="job-b")
    c = Job(kind="noop", run_id="r1", name="job-c")
    a._id, b._id = "aaaa", "bbbb"
    with pytest.raises(InvalidArgument) as info:
        RunPlan(run_id="r1", spec_hash="s", jobs=[c, a, b])
    assert "cycle" in str(info.value)
    assert "job-a -> job-b -> job-a" in str(info.value)
    assert info.value.field == "jobs[1].deps"
