"""Manifest reading: versions, paths, checksums, every problem at once; shape expressions."""

import json
import os
from pathlib import Path

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
        fidelity_guidance="none", dims=(Dim("batch", 1, 1, 4), Dim("latent_height", 4, 8, 16), Dim("latent_width", 4, 8, 16)),
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


def _count_hashes(monkeypatch) -> list[str]:
    import cair_runtime.manifest as manifest_module

    hashed, original = [], manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda path: hashed.append(Path(path).name) or original(path))
    return hashed


def test_fast_load_hashes_once_then_trusts_unchanged_files(tmp_path, monkeypatch):
    folder = tmp_path / "e"
    _write_folder(folder)
    hashed = _count_hashes(monkeypatch)
    load_manifest(folder)  # no record of a verification yet: every file hashed, then recorded
    assert sorted(set(hashed) - {"manifest.json"}) == ["fidelity.onnx", "planning.onnx"]
    hashed.clear()
    load_manifest(folder)  # unchanged since: only the small manifest is hashed
    assert hashed == ["manifest.json"]
    hashed.clear()
    load_manifest(folder, verify="full")  # on demand: every byte again
    assert {"fidelity.onnx", "planning.onnx"} <= set(hashed)


@pytest.mark.parametrize("change", ["replace", "rewrite_in_place", "truncate"])
def test_fast_load_catches_replaced_rewritten_and_truncated_files(tmp_path, change):
    folder = tmp_path / "e"
    _write_folder(folder)
    load_manifest(folder)
    target = folder / "planning.onnx"
    stat = target.stat()
    if change == "replace":  # same size, other bytes, moved over the original
        (folder / "other").write_bytes(b"X" * stat.st_size)
        os.replace(folder / "other", target)
    elif change == "rewrite_in_place":  # same size and inode, mtime set back: ctime still moves
        with open(target, "r+b") as handle:
            handle.write(b"X")
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    else:
        target.write_bytes(target.read_bytes()[:-1])
    with pytest.raises(ManifestError, match="planning.onnx (does not match its sha256|has .* bytes)"):
        load_manifest(folder)


def test_read_only_folder_still_loads(tmp_path, monkeypatch):
    folder = tmp_path / "e"
    _write_folder(folder)
    import cair_runtime.manifest as manifest_module

    def refuse(path, write):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(manifest_module, "write_atomically", refuse)
    assert load_manifest(folder) == load_manifest(folder, verify="full")
    assert not (folder / manifest_module.VERIFIED_NAME).exists()


def test_cair_verify_checks_every_byte_and_records_it(tmp_path, capsys):
    from cair_runtime.cli import verify_main
    from cair_runtime.manifest import VERIFIED_NAME

    folder = tmp_path / "e"
    _write_folder(folder)
    assert verify_main([str(folder)]) == 0
    assert "every sha256 matches" in capsys.readouterr().out and (folder / VERIFIED_NAME).is_file()
    (folder / "fidelity.onnx").write_bytes(b"fidelity.onnY")  # same size, other bytes
    assert verify_main([str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fidelity.onnx does not match its sha256" in err


def _mutated(data: dict, change: str) -> dict:
    graphs = data["graphs"]
    sample = graphs["planning"]["inputs"][0]
    if change == "graphs as a list":
        data["graphs"] = list(graphs.values())
    elif change == "unknown graph":
        graphs["refiner"] = dict(graphs["fidelity"], kind="refiner")
    elif change == "code in a shape":
        sample["shape"][0] = "__import__('os').getpid()"
    elif change == "absurd shape":
        sample["shape"][0] = "*".join(["latent_height"] * 8)  # 16**8 at the max
    elif change == "long shape":
        sample["shape"][0] = "+".join(["batch"] * 40)
    elif change == "division by zero":
        sample["shape"][0] = "batch//0"
    elif change == "float in a shape":
        sample["shape"][1] = 4.5
    elif change == "dims out of order":
        data["dims"][0].update(min=5, opt=2, max=1)
    elif change == "unknown fidelity guidance":
        data["fidelity_guidance"] = "maybe"
    elif change == "pipeline as a list":
        data["pipeline"] = []
    elif change == "tokenizer outside the folder":
        data["pipeline"] = {"type": "stable-diffusion", "vae_graph": "vae_decoder", "vae_scaling_factor": 0.18,
                            "force_zeros_for_empty_prompt": False, "pooled_from": None,
                            "text_encoders": [{"graph": "text_encoder", "tokenizer": "../../tokenizer.json",
                                               "max_length": 77, "bos_token_id": 0, "eos_token_id": 1,
                                               "pad_token_id": 1, "prompt_output": "last_hidden_state"}]}
    elif change == "file without sha256":
        del data["files"][0]["sha256"]
    elif change.startswith("switch"):
        data["caches"] = [{"name": "cache_000", "module": "mid_block.attentions.0.transformer_blocks.0.attn2",
                           "tokens": "latent_height*latent_width", "channels": 8}]
        data["switch"] = {"file": "planning.onnx", "condition": "use_cache", "cache_inputs": {"cache_000": "cache_000_in"},
                          "deep_feature": None}
        if change == "switch file not listed":
            data["switch"]["file"] = "unet.onnx"
        elif change == "switch missing a cache input":
            data["switch"]["cache_inputs"] = {}
        elif change == "switch condition named like a cache input":
            data["switch"]["condition"] = "cache_000_in"
        elif change == "switch deep feature without a branch":
            data["switch"]["deep_feature"] = "deep_feature"
        elif change == "switch as a list":
            data["switch"] = []
    return data


@pytest.mark.parametrize("change, message", [
    ("graphs as a list", "malformed"),
    ("unknown graph", "unknown graph 'refiner'"),
    ("code in a shape", "not an expression the manifest allows"),
    ("absurd shape", "expected 0..2147483647"),
    ("long shape", "at most 120"),
    ("division by zero", "divides by zero"),
    ("float in a shape", "expected an integer or a dim expression"),
    ("dims out of order", "expected integers 1 <= min <= opt <= max"),
    ("unknown fidelity guidance", "fidelity_guidance 'maybe' is not one of none, cfg"),
    ("pipeline as a list", "the pipeline section is a list"),
    ("tokenizer outside the folder", "tokenizer '../../tokenizer.json' is not among the listed files"),
    ("file without sha256", "malformed"),
    ("switch file not listed", "switch graph file 'unet.onnx' is not among the listed files"),
    ("switch missing a cache input", "a condition input and one distinct input per cache"),
    ("switch condition named like a cache input", "a condition input and one distinct input per cache"),
    ("switch deep feature without a branch", "deep feature 'deep_feature' must be the deep branch's None"),
    ("switch as a list", "the switch section must be an object"),
])
def test_malformed_manifest_corpus_is_refused_in_one_line(tmp_path, change, message):
    folder = tmp_path / "e"
    _write_folder(folder)
    data = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(_mutated(data, change)))
    with pytest.raises(ManifestError) as error:
        load_manifest(folder)
    assert message in str(error.value) and "\n" not in str(error.value)
