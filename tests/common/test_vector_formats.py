"""Vectors in and out: repeng GGUF, persona-vectors .pt and plain safetensors round-trip exactly,
and each lands on qsens's layer convention (layer k = decoder layer k's output)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from services.common.contracts.vectors import VectorSet
from services.common.errors import InvalidArgument
from services.common.tensor_codec import load_safetensors
from services.common.vector_formats import (
    FORMATS,
    detect_format,
    from_layers,
    read_vectors,
    write_vectors,
)
from services.extractor.methods import mean_diff

H = 48


def _extracted(layers: tuple[int, ...] = (2, 3, 5, 7)) -> VectorSet:
    """A real extracted set (mean_diff of random activations) on a subset of layers."""
    rng = np.random.default_rng(7)
    pos = rng.normal(size=(12, len(layers), H)).astype(np.float32) + 0.5
    neg = rng.normal(size=(12, len(layers), H)).astype(np.float32)
    return mean_diff(
        pos, neg, layers=list(layers), meta={"model": "llama-3.1-8b", "trait": "pv/evil"}
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_round_trips_vectors_and_layers_exactly(fmt: str) -> None:
    vs = _extracted()
    blob = write_vectors(vs, fmt)  # type: ignore[arg-type]
    back = read_vectors(blob, fmt, name=f"x.{fmt}")  # type: ignore[arg-type]
    assert back.layers == vs.layers
    assert back.vectors.dtype == np.float32
    np.testing.assert_array_equal(back.vectors, vs.vectors)
    np.testing.assert_allclose(back.norms, np.linalg.norm(vs.vectors.astype(np.float64), axis=1))
    # And once more through the format: the same file (safetensors' metadata order varies).
    again_blob = write_vectors(back, fmt)  # type: ignore[arg-type]
    if fmt in ("repeng-gguf", "pv-pt"):
        assert again_blob == blob
    elif fmt == "safetensors":
        assert load_safetensors(again_blob)[1] == load_safetensors(blob)[1]
    if fmt != "qsens":
        imported = back.meta["imported"]
        assert imported["format"] == fmt and imported["digest"].startswith("sha256:")
        assert np.isnan(back.auroc).all() and back.n_pos == 0
        # A qsens set of the import round-trips too (what `qsens vectors import` stores).
        again = VectorSet.from_safetensors(back.to_safetensors())
        np.testing.assert_array_equal(again.vectors, vs.vectors)
        assert again.meta == back.meta
    if fmt in ("repeng-gguf", "safetensors"):
        assert back.meta["imported"]["model_hint"] == "llama-3.1-8b"


def test_repeng_gguf_is_the_file_repeng_writes_and_reads() -> None:
    """The writer and reader of repeng 0.4's ControlVector.export_gguf / import_gguf, verbatim
    in substance, against ours: direction.<k> with model_hint and layer_count."""
    import gguf

    vs = _extracted()
    ours = write_vectors(vs, "repeng-gguf", model_hint="LlamaForCausalLM")
    path = Path(__import__("tempfile").mkdtemp()) / "v.gguf"
    path.write_bytes(ours)
    reader = gguf.GGUFReader(path)
    arch = reader.get_field("general.architecture")
    assert str(bytes(arch.parts[-1]), encoding="utf-8") == "controlvector"
    hint = reader.get_field("controlvector.model_hint")
    assert str(bytes(hint.parts[-1]), encoding="utf-8") == "LlamaForCausalLM"
    assert int(reader.get_field("controlvector.layer_count").parts[-1][0]) == len(vs.layers)
    directions = {int(t.name.split(".")[1]): t.data for t in reader.tensors}
    assert sorted(directions) == list(vs.layers)
    for i, layer in enumerate(vs.layers):
        np.testing.assert_array_equal(np.asarray(directions[layer]), vs.vectors[i])
    # repeng's writer (the same calls in the same order) gives a file we read back exactly.
    theirs_path = path.with_name("theirs.gguf")
    writer = gguf.GGUFWriter(theirs_path, "controlvector")
    writer.add_string("controlvector.model_hint", "mistral")
    writer.add_uint32("controlvector.layer_count", 2)
    rng = np.random.default_rng(3)
    theirs = {10: rng.normal(size=H).astype(np.float32), 11: rng.normal(size=H).astype(np.float32)}
    for layer, d in theirs.items():
        writer.add_tensor(f"direction.{layer}", d)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    back = read_vectors(theirs_path.read_bytes(), "repeng-gguf")
    assert back.layers == (10, 11) and back.meta["imported"]["model_hint"] == "mistral"
    np.testing.assert_array_equal(back.vectors, np.stack([theirs[10], theirs[11]]))


def test_persona_vectors_rows_are_hidden_states_and_only_tensors_are_loaded() -> None:
    """persona-vectors saves [n_layers + 1, H] with row r = hidden_states[r] (row 0: embeddings)
    and steers model.layers[r - 1] with row r: qsens layer k is row k + 1."""
    rng = np.random.default_rng(5)
    rows = rng.normal(size=(9, H)).astype(np.float32)  # an 8-layer model
    buf = io.BytesIO()
    torch.save(torch.from_numpy(rows), buf)
    vs = read_vectors(buf.getvalue(), "pv-pt")
    assert vs.layers == tuple(range(8))
    np.testing.assert_array_equal(vs.vectors, rows[1:])
    exported = torch.load(io.BytesIO(write_vectors(vs, "pv-pt")), weights_only=True)
    assert tuple(exported.shape) == (9, H)
    assert not exported[0].any()  # qsens has no embedding-layer vector
    np.testing.assert_array_equal(exported[1:].numpy(), rows[1:])
    # A .pt holding an arbitrary object (code to run on load) is refused by weights_only=True.
    evil = io.BytesIO()
    torch.save({"x": _Opaque()}, evil)
    with pytest.raises(InvalidArgument, match="weights_only"):
        read_vectors(evil.getvalue(), "pv-pt")
    with pytest.raises(InvalidArgument, match="n_layers"):
        buf = io.BytesIO()
        torch.save(torch.zeros(3), buf)
        read_vectors(buf.getvalue(), "pv-pt")


class _Opaque:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("ran on load!",))


def test_plain_safetensors_metadata_and_bad_inputs() -> None:
    from services.common.tensor_codec import save_safetensors

    vs = _extracted((0, 1))
    tensors, meta = load_safetensors(write_vectors(vs, "safetensors"))
    assert sorted(tensors) == ["layer.0", "layer.1"]
    assert meta["format"] == "qsens.vectors/1" and meta["layer_convention"] == "decoder_output"
    assert (meta["model"], meta["trait"], meta["method"]) == (
        "llama-3.1-8b",
        "pv/evil",
        "mean_diff",
    )
    assert read_vectors(write_vectors(vs, "safetensors"), "safetensors").method == "mean_diff"
    wrong = save_safetensors({"weird": np.zeros(4, np.float32)}, {})
    with pytest.raises(InvalidArgument, match=r"layer\.<k>"):
        read_vectors(wrong, "safetensors")
    other = save_safetensors({"layer.0": np.zeros(4, np.float32)}, {"layer_convention": "input"})
    with pytest.raises(InvalidArgument) as err:
        read_vectors(other, "safetensors")
    assert err.value.field == "layer_convention"
    with pytest.raises(InvalidArgument, match="different"):
        from_layers({0: np.zeros(3), 1: np.zeros(4)})
    with pytest.raises(InvalidArgument, match="not a GGUF"):
        read_vectors(b"not a gguf at all" * 4, "repeng-gguf")


def test_formats_are_told_by_name_and_qsens_sets_by_their_header() -> None:
    vs = _extracted((1,))
    assert detect_format("a.gguf") == "repeng-gguf" and detect_format("v.pt") == "pv-pt"
    assert detect_format("v.safetensors", vs.to_safetensors()) == "qsens"
    assert detect_format("v.safetensors", write_vectors(vs, "safetensors")) == "safetensors"
    with pytest.raises(InvalidArgument) as err:
        detect_format("v.npy")
    assert err.value.field == "format"
