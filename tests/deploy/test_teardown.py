"""Tearing a study down keeps its data: no study target deletes the Namespace (and through it
the volumes), the StatefulSets' claims outlive them, and the retained-storage option puts the
data volumes on a class that keeps the disk when a claim goes."""

from __future__ import annotations

from typing import Any

from tests.deploy.manifests import CLUSTER_TARGETS, TARGETS, of_kind

DATA_SETS = ("qsens-nats", "qsens-minio")


def test_study_targets_have_no_namespace(renders: dict[str, list[dict[str, Any]]]) -> None:
    """`kubectl delete -k` of any overlay deletes what it renders: never the Namespace."""
    studies = [name for name in TARGETS if name not in CLUSTER_TARGETS]
    assert {"example-study", "example-study-submit", "local-kind"} <= set(studies)
    for name in studies:
        assert of_kind(renders[name], "Namespace") == [], name
        # Nor any other cluster-wide object another study would share.
        assert not of_kind(renders[name], "StorageClass"), name


def test_cluster_target_is_the_namespace_only(renders: dict[str, list[dict[str, Any]]]) -> None:
    docs = renders["cluster"]
    assert [d["kind"] for d in docs] == ["Namespace"]
    assert docs[0]["metadata"]["name"] == "qsens"


def _claims(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {sts["metadata"]["name"]: sts for sts in of_kind(docs, "StatefulSet")}


def test_claims_outlive_their_statefulsets(renders: dict[str, list[dict[str, Any]]]) -> None:
    for name, docs in renders.items():
        if name in CLUSTER_TARGETS:
            continue
        sets = _claims(docs)
        assert set(DATA_SETS) <= set(sets), name
        for sts_name in DATA_SETS:
            policy = sets[sts_name]["spec"]["persistentVolumeClaimRetentionPolicy"]
            assert policy == {"whenDeleted": "Retain", "whenScaled": "Retain"}, (name, sts_name)
            # The claim comes from the template, not from a rendered PVC that delete -k removes.
            assert sets[sts_name]["spec"]["volumeClaimTemplates"], (name, sts_name)


def test_retained_storage_option(renders: dict[str, list[dict[str, Any]]]) -> None:
    """With components/retained-storage both data volumes come from the qsens-retained class;
    without it they use the cluster's default class (no storageClassName)."""
    option = _claims(renders["base+retained-storage"])
    plain = _claims(renders["base"])
    for sts_name in DATA_SETS:
        (template,) = option[sts_name]["spec"]["volumeClaimTemplates"]
        assert template["spec"]["storageClassName"] == "qsens-retained", sts_name
        (default,) = plain[sts_name]["spec"]["volumeClaimTemplates"]
        assert "storageClassName" not in default["spec"], sts_name
