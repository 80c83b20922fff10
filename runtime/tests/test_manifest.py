"""Manifest reading: versions, paths, checksums, every problem at once; shape expressions."""

import json

import pytest

from cair_runtime.errors import ManifestError, ShapeError
from cair_runtime.manifest import (Dim, FileRecord, GraphSpec, Manifest, TensorSpec, eval_dim, load_manifest,
                                   record_file)


def test_eval_dim():
    dims = {"batch": 3, "latent_height": 9, "latent_width": 12}
    assert eval_dim(4, dims) == 4
    assert eval_dim("2*batch", dims) == 6
    assert eval_dim("latent_height*latent_width", dims) == 108
    assert eval_dim("cdiv(latent_height,2)*cdiv(latent_width,4)", dims) == 5 * 3
    assert eval_dim("(latent_height+1)//2", dims) == 5
    with pytest.raises(ShapeError, match="text_len"):
        eval_dim("text_len", dims)
    with pytest.raises(ManifestError):
        eval_dim("__import__('os')", dims)
    with pytest.raises(ManifestError):
        eval_dim("batch**2", dims)


def _write_folder(folder, files=("planning.onnx", "fidelity.onnx"), version=1, tamper=None):
    folder.mkdir(exist_ok=True)
    for name in files:
        (folder / name).write_bytes(name.encode())
    records = [record_file(folder, name) for name in files]
    if tamper:
        records = tamper(records)
    spec = TensorSpec("sample", "float32", ("batch", 4, "latent_height", "latent_width"))
    manifest = Manifest(
        schema_version=version, producer={"test": "1"}, model={"name": "m"}, scheduler_config={},
        fidelity_guidance="none", dims=(Dim("batch", 1, 1, 4),),
        graphs={kind: GraphSpec(kind, f"{kind}.onnx", (spec,), (spec,)) for kind in ("planning", "fidelity")},
        caches=(), files=tuple(records))
    (folder / "manifest.json").write_text(manifest.to_json())
    return manifest


def test_round_trip(tmp_path):
    written = _write_folder(tmp_path / "e")
    assert load_manifest(tmp_path / "e") == written


def test_unsupported_version_is_refused(tmp_path):
    _write_folder(tmp_path / "e", version=2)
    with pytest.raises(ManifestError, match="schema version 2.*reads versions 1"):
        load_manifest(tmp_path / "e")


def test_every_problem_is_reported_at_once(tmp_path):
    folder = tmp_path / "e"

    def tamper(records):
        planning, fidelity = records
        return [FileRecord(planning.path, "0" * 64, planning.size), fidelity,
                FileRecord("../outside.onnx", "0" * 64, 1), FileRecord("/etc/passwd", "0" * 64, 1)]

    _write_folder(folder, tamper=tamper)
    (folder / "fidelity.onnx").unlink()
    with pytest.raises(ManifestError) as error:
        load_manifest(folder)
    message = str(error.value)
    assert "planning.onnx does not match its sha256" in message
    assert "fidelity.onnx is missing" in message
    assert "'../outside.onnx' lies outside the engine folder" in message
    assert "'/etc/passwd' lies outside the engine folder" in message
    assert "\n" not in message


def test_malformed_manifest(tmp_path):
    folder = tmp_path / "e"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"schema_version": 1, "producer": {}}))
    with pytest.raises(ManifestError, match="malformed"):
        load_manifest(folder)
    (folder / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(folder)
