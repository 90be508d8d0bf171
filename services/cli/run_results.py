"""``qsens results``' data: job outcomes, extraction summaries and per-layer cosine to the
reference read from S3, and the table that shows the cosines."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from services.common.spec import ExperimentSpec

__all__ = ["collect_results", "cosine_table"]


async def collect_results(run_id: str) -> dict[str, Any]:
    """Job outcomes, extraction summaries and per-layer cosine to the reference (from S3)."""
    from services.common.contracts.vectors import VectorSet, layer_cosines
    from services.common.natsconn import connection
    from services.common.state import StateStore
    from services.common.store import AsyncS3Store, run_key, run_prefix

    store = AsyncS3Store()
    async with connection(name="qsens-cli") as nc:
        state = await StateStore.open(nc.jetstream())
        summary = await state.summary(run_id)
        records = await state.list_jobs(run_id)
    spec = ExperimentSpec.model_validate(await store.get_json(run_key(run_id, "spec.json")))
    extractions: dict[tuple[str, str, str], dict[str, Any]] = {}
    for key in await store.list_keys(run_prefix(run_id)):
        if key.endswith("/summary.json") and "/extract/" in key:
            doc = await store.get_json(key)
            # The reference on another variant's text (2x2 replay): one per variant.
            mode = doc["mode"] if doc["mode"] != "reverse" else f"reverse {doc['replay_from']}"
            extractions[(doc["variant"], doc["trait"], mode)] = doc
    cosines: list[dict[str, Any]] = []
    for model in spec.models:
        reference = f"{model.name}@{spec.reference.value}"
        for (variant, trait, mode), doc in sorted(extractions.items()):
            ref_doc = extractions.get((reference, trait, "native"))
            if (variant == reference and mode == "native") or ref_doc is None:
                continue
            for method, vkey in doc["vector_keys"].items():
                if method not in ref_doc["vector_keys"]:
                    continue
                mine = VectorSet.from_safetensors(await store.get_bytes(vkey))
                ref = VectorSet.from_safetensors(
                    await store.get_bytes(ref_doc["vector_keys"][method])
                )
                per_layer = layer_cosines(ref, mine)  # None where undefined (zero norm)
                cosines.append(
                    {
                        "variant": variant,
                        "reference": reference,
                        "trait": trait,
                        "mode": mode,
                        "method": method,
                        "layers": [c.layer for c in per_layer],
                        "cosine": [c.cosine for c in per_layer],
                    }
                )
    return {
        "run_id": run_id,
        "summary": summary.model_dump(mode="json"),
        "jobs": [
            {
                "name": r.job.name,
                "kind": r.job.kind.value,
                "state": r.state.value,
                "result": r.result,
                "error": r.error,
            }
            for r in records
        ],
        "extractions": [extractions[k] for k in sorted(extractions)],
        "cosine_to_reference": cosines,
    }


def _cell(cosine: float | None) -> str:
    return "" if cosine is None else f"{cosine:.3f}"


def cosine_table(results: dict[str, Any], columns: int = 6) -> Table:
    """Per-layer cosine to the reference, sampled at ``columns`` evenly spaced layers."""
    rows = results["cosine_to_reference"]
    table = Table(title="cosine similarity to the reference, per layer")
    if not rows:
        table.add_column("no vectors yet")
        return table
    layers = rows[0]["layers"]
    picks = sorted(
        {layers[round(i * (len(layers) - 1) / max(1, columns - 1))] for i in range(columns)}
    )
    for column in ("trait", "method", "variant", *[f"L{layer}" for layer in picks]):
        table.add_column(column, justify="right" if column.startswith("L") else "left")
    for row in rows:
        values = dict(zip(row["layers"], row["cosine"], strict=True))
        cells = [_cell(values.get(layer)) for layer in picks]
        label = row["variant"].split("@")[-1] + (" replay" if row["mode"] == "replay" else "")
        if row["mode"].startswith("reverse "):
            label += f" on {row['mode'].split('@')[-1]} text"
        table.add_row(row["trait"], row["method"], label, *cells)
    return table
