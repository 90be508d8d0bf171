"""``qsens vectors import | export | compare``: steering vectors in and out of qsens.

``import`` reads repeng's GGUF control vectors, persona-vectors' ``.pt`` tensors or plain
safetensors (``services.common.vector_formats``) and writes a qsens vector set: to ``--out`` or,
with ``--put``, to S3 under a content-addressed key (printed; a spec names it in ``vectors:``).
``export`` writes a qsens vector set (a file, an ``s3://`` object, or an extraction of a run:
``run:<run_id>/<variant>/<trait>/<method>[/replay]``) in any of those formats. ``compare``
prints the per-layer cosine of two vector sets (any format, any of those locations).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console

from services.common.errors import InvalidArgument, QsensError

app = typer.Typer(
    help="Steering vectors in and out: repeng GGUF, persona-vectors .pt, safetensors."
)
console = Console(stderr=True)

__all__ = ["app", "load_location"]

FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        help="qsens, repeng-gguf, pv-pt or safetensors (default: from the file name).",
    ),
]


def _run_ref(ref: str) -> tuple[str, bytes]:
    """``run:<run_id>/<variant>/<trait methodology>/<trait name>/<method>[/replay]``."""
    from services.common.artefacts import extract_key
    from services.common.store import S3Store

    parts = ref.removeprefix("run:").strip("/").split("/")
    mode = "native"
    if parts and parts[-1] in ("native", "replay"):
        mode = parts.pop()
    if len(parts) != 5:
        raise InvalidArgument(
            "source", f"{ref!r}: expected run:<run_id>/<variant>/<methodology>/<trait>/<method>"
        )
    run_id, variant, methodology, trait, method = parts
    key = extract_key(run_id, variant, f"{methodology}/{trait}", mode, "vectors")  # type: ignore[arg-type]
    return f"{method}.safetensors", S3Store().get_bytes(f"{key}/{method}.safetensors")


def load_location(location: str, fmt: str | None = None) -> tuple[str, bytes, str]:
    """(file name, bytes, format) of a vector file: a path, an ``s3://`` object or ``run:...``."""
    from services.common.datafiles import resolve_location
    from services.common.vector_formats import FORMATS, detect_format

    if location.startswith("run:"):
        name, blob = _run_ref(location)
    else:
        path = resolve_location(location, "source")
        if not path.is_file():
            raise InvalidArgument("source", f"{location} is not a readable file")
        name, blob = path.name, path.read_bytes()
    chosen = fmt or detect_format(name, blob)
    if chosen not in FORMATS:
        raise InvalidArgument("--format", f"unknown format {chosen!r}; one of {', '.join(FORMATS)}")
    return name, blob, chosen


def _fail(err: QsensError) -> typer.Exit:
    console.print(f"[red]error:[/red] {err}")
    return typer.Exit(2)


@app.command("import")
def import_(
    source: Annotated[str, typer.Argument(help="A .gguf, .pt or .safetensors file (or s3://).")],
    out: Annotated[Path | None, typer.Option(help="Write the qsens vector set here.")] = None,
    put: Annotated[bool, typer.Option("--put", help="Upload it to S3; print s3://.")] = False,
    fmt: FormatOpt = None,
    model: Annotated[str, typer.Option(help="The model the vectors are for (recorded).")] = "",
    trait: Annotated[str, typer.Option(help="The trait they express (recorded).")] = "",
    method: Annotated[str, typer.Option(help="Method name stored with the set.")] = "imported",
) -> None:
    """Convert SOURCE into a qsens vector set (--out and/or --put)."""
    from services.common.vector_formats import read_vectors

    try:
        if out is None and not put:
            raise InvalidArgument("--out", "give --out PATH, --put, or both")
        name, blob, chosen = load_location(source, fmt)
        meta = {k: v for k, v in (("model", model), ("trait", trait)) if v}
        vs = read_vectors(blob, chosen, name=name, method=method, meta=meta)  # type: ignore[arg-type]
        data = vs.to_safetensors()
        if out is not None:
            out.write_bytes(data)
            typer.echo(str(out))
        if put:
            typer.echo(_put(data, Path(name).stem))
    except QsensError as err:
        raise _fail(err) from err
    console.print(
        f"{len(vs.layers)} layers x {vs.hidden_size} from {name} ({chosen}); layers "
        f"{vs.layers[0]}..{vs.layers[-1]}"
    )


def _put(data: bytes, stem: str) -> str:
    import tempfile

    from services.common.datafiles import put_data

    with tempfile.TemporaryDirectory(prefix="qsens-vectors-") as tmp:
        path = Path(tmp) / f"{stem}.qsens.safetensors"
        path.write_bytes(data)
        return put_data(path)


@app.command("export")
def export(
    source: Annotated[
        str, typer.Argument(help="A qsens vector set: a file, s3://..., or run:<run>/<variant>/...")
    ],
    out: Annotated[Path, typer.Option(help="The file to write.")],
    fmt: FormatOpt = None,
    model_hint: Annotated[str, typer.Option(help="repeng's model_hint (default: recorded).")] = "",
) -> None:
    """Write the vector set SOURCE to --out in --format (default: from the --out name)."""
    from services.common.vector_formats import detect_format, read_vectors, write_vectors

    try:
        name, blob, chosen = load_location(source)
        vs = read_vectors(blob, chosen, name=name)  # type: ignore[arg-type]
        target = fmt or detect_format(out)
        out.write_bytes(write_vectors(vs, target, model_hint=model_hint))  # type: ignore[arg-type]
    except QsensError as err:
        raise _fail(err) from err
    typer.echo(str(out))


@app.command("compare")
def compare(
    first: Annotated[str, typer.Argument(help="A vector file, s3:// object or run:... reference.")],
    second: Annotated[str, typer.Argument(help="Another one.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Per-layer cosine of two vector sets over the layers both have."""
    from services.common.vector_formats import read_vectors

    try:
        sets = []
        for location in (first, second):
            name, blob, chosen = load_location(location)
            sets.append(read_vectors(blob, chosen, name=name))  # type: ignore[arg-type]
        a, b = sets
        if a.hidden_size != b.hidden_size:
            raise InvalidArgument(
                "second", f"hidden sizes differ: {a.hidden_size} vs {b.hidden_size}"
            )
        common = sorted(set(a.layers) & set(b.layers))
        if not common:
            raise InvalidArgument("second", "the two sets share no layer")
    except QsensError as err:
        raise _fail(err) from err
    rows = []
    for layer in common:
        x, y = a.vector(layer).astype(np.float64), b.vector(layer).astype(np.float64)
        denom = float(np.linalg.norm(x) * np.linalg.norm(y))
        cos = float(x @ y) / denom if denom > 0 else math.nan
        rows.append({"layer": layer, "cosine": cos, "norm_ratio": _ratio(x, y)})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        typer.echo(
            f"layer {row['layer']:>3}  cos {row['cosine']:+.6f}  |b|/|a| {row['norm_ratio']:.4f}"
        )


def _ratio(x: np.ndarray, y: np.ndarray) -> float:
    nx = float(np.linalg.norm(x))
    return float(np.linalg.norm(y)) / nx if nx > 0 else math.nan
