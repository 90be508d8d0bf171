"""The sizing table is computed: docs/SIZING.md equals the code's output, the seed shapes
give the parameter counts the seeds-matrix spec states, the GPU counts follow the placement
function, and the generated variant loaders (deploy/k8s/variants/) request those GPUs."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from services.common.errors import InvalidArgument
from services.common.settings import LoaderSettings
from services.common.variants import Precision
from services.loader import sizing
from services.loader.placement import (
    DeviceMemory,
    DoesNotFit,
    gpus_needed,
    meta_model,
    place,
    units_of,
)
from tests.deploy.manifests import find, kubectl
from tests.loader_procs import REPO


def test_docs_sizing_is_the_codes_output() -> None:
    text = (REPO / "docs" / "SIZING.md").read_text(encoding="utf-8")
    assert text.endswith(sizing.markdown_table())
    for seed in sizing.SEED_MODELS:
        assert f"| {seed.name} |" in text
    # The README carries the same table, without the generated footnote.
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    rows = [line for line in sizing.markdown_table().splitlines() if line.startswith("|")]
    assert "\n".join(rows) in readme


def test_seed_shapes_match_the_seeds_matrix_spec() -> None:
    spec = yaml.safe_load((REPO / "examples" / "seeds-matrix.yaml").read_text(encoding="utf-8"))
    stated = {m["name"]: (m["source"], float(m["size_b"])) for m in spec["models"]}
    assert {s.name for s in sizing.SEED_MODELS} == set(stated)
    assert [p.value for p in sizing.STUDY_PRECISIONS] == spec["precisions"]
    for seed in sizing.SEED_MODELS:
        source, size_b = stated[seed.name]
        assert seed.source == source
        params = sizing.sizing(seed.name, Precision.BF16).parameters
        assert abs(params / 1e9 - size_b) <= 0.02 * size_b, (seed.name, params)


def test_gpu_counts_follow_the_placement() -> None:
    big = sizing.sizing("llama-3.3-70b", Precision.BF16)
    assert big.weight_bytes > 140e9 and big.gpus == 2
    assert sizing.sizing("llama-3.3-70b", Precision.NF4).gpus == 1
    assert sizing.sizing("llama-3.1-8b", Precision.BF16).gpus == 1
    # The same units on one card do not fit: the count is the placement's, not a division.
    seed = next(s for s in sizing.SEED_MODELS if s.name == "llama-3.3-70b")
    units = units_of(meta_model(seed.config()), Precision.BF16)
    try:
        place(units, [DeviceMemory(0, sizing.H100_FREE_BYTES)])
    except DoesNotFit as exc:
        assert "141.1" not in str(exc) and "GiB" in str(exc)
    else:
        raise AssertionError("a 70B bf16 model placed on one H100")
    assert gpus_needed(units, sizing.H100_FREE_BYTES, headroom=0.5) == 4


VARIANTS = REPO / "deploy" / "k8s" / "variants"


def test_variant_loaders_are_the_generators_output_and_request_their_gpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folders = sorted(p for p in VARIANTS.iterdir() if p.is_dir())
    assert folders, "no generated variant loaders"
    for folder in folders:
        model, _, precision = folder.name.rpartition("-")
        want = sizing.loader_kustomization(model, Precision(precision))
        assert (folder / "kustomization.yaml").read_text(encoding="utf-8") == want, folder.name
        size = sizing.sizing(model, Precision(precision))
        out = subprocess.run(
            [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        deployment = find(
            [d for d in yaml.safe_load_all(out.stdout) if d],
            "Deployment",
            f"qsens-loader-{folder.name.replace('.', '-')}",
        )
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        resources = container["resources"]
        for side in ("requests", "limits"):
            assert resources[side]["nvidia.com/gpu"] == size.gpus
        assert resources["requests"]["memory"] == f"{32 * size.gpus}Gi"
        assert resources["limits"]["memory"] == f"{48 * size.gpus}Gi"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["VARIANT_PRECISION"] == precision and env["VARIANT_MODEL_NAME"] == model
        # The loader reads the count the Deployment gives it.
        monkeypatch.setenv("QSENS_LOADER_GPUS", env["QSENS_LOADER_GPUS"])
        assert LoaderSettings().gpus == size.gpus
    assert {f.name for f in folders} >= {"llama-3.3-70b-bf16", "llama-3.3-70b-nf4"}
    assert sizing.sizing("llama-3.3-70b", Precision.BF16).gpus == 2


def test_a_platform_quantized_or_unknown_variant_is_refused_by_name() -> None:
    with pytest.raises(InvalidArgument, match="precision: gptq loaders need the quantize"):
        sizing.loader_kustomization("llama-3.3-70b", Precision.GPTQ)
    with pytest.raises(InvalidArgument, match="model: unknown seed model 'gpt-5'"):
        sizing.loader_kustomization("gpt-5", Precision.BF16)


def test_example_study_loaders_request_the_sizing_tables_gpus() -> None:
    """The hand-written example-study loaders, GPTQ and AWQ among them, ask what the sizing
    table says for their seed model and precision (one H100 each for the 8B shape)."""
    folders = sorted((REPO / "deploy" / "k8s" / "overlays" / "example-study" / "loaders").iterdir())
    precisions = set()
    for folder in folders:
        out = subprocess.run(
            [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        (deployment,) = [
            d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Deployment"
        ]
        labels = deployment["metadata"]["labels"]
        size = sizing.sizing(labels["qsens.io/model"], Precision(labels["qsens.io/precision"]))
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == size.gpus, folder.name
        assert limits["memory"] == f"{sizing.MEMORY_LIMIT_GIB_PER_GPU * size.gpus}Gi", folder.name
        precisions.add(size.precision)
    assert {Precision.GPTQ, Precision.AWQ} <= precisions
