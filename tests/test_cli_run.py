"""``cair-run`` from a user's seat: runs an exported folder; bad input is one line and exit code 2."""

import json
import shutil
import subprocess

import numpy as np
import pytest

from cair_runtime.cli import main


@pytest.fixture
def engine(exported, tmp_path):
    """A private copy of the tiny-sd21 engine folder, safe to tamper with."""
    folder = tmp_path / "engine"
    shutil.copytree(exported("tiny-sd21"), folder)
    return folder


@pytest.fixture
def embeddings(tmp_path):
    path = tmp_path / "ehs.npy"
    np.save(path, np.random.default_rng(0).standard_normal((1, 77, 1024), dtype=np.float32))
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_writes_latents_and_timings(engine, embeddings, tmp_path, capsys):
    out = tmp_path / "latents.npy"
    code, stdout, err = _run(capsys, engine, "--encoder-hidden-states", embeddings, "-o", out,
                             "--steps", 6, "--cache-step", 2, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["planning_steps"] == 2 and report["fidelity_steps"] == 4
    assert report["total_s"] >= report["planning_s"] + report["fidelity_s"]
    latents = np.load(out)
    assert latents.shape == (1, 4, 8, 8) and np.isfinite(latents).all()
    # Same seed, same result; n = T is the baseline and differs from n = 2.
    _run(capsys, engine, "--encoder-hidden-states", embeddings, "-o", tmp_path / "again.npy", "--steps", 6,
         "--cache-step", 2)
    np.testing.assert_array_equal(np.load(tmp_path / "again.npy"), latents)
    _run(capsys, engine, "--encoder-hidden-states", embeddings, "-o", tmp_path / "base.npy", "--steps", 6,
         "--cache-step", 6)
    assert not np.allclose(np.load(tmp_path / "base.npy"), latents)


def test_console_script_runs_without_torch(engine, embeddings, tmp_path):
    """`cair-run` as installed, in a process where importing torch would fail."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    for name in ("torch", "diffusers", "transformers", "onnx"):
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} must not be imported by the runtime')\n")
    out = tmp_path / "out.npy"
    env = {"PYTHONPATH": str(blocker), "PATH": shutil.os.environ["PATH"]}
    result = subprocess.run(["cair-run", str(engine), "--encoder-hidden-states", str(embeddings), "-o", str(out),
                             "--steps", "4", "--cache-step", "2"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert np.load(out).shape == (1, 4, 8, 8)


def test_missing_engine_folder(tmp_path, embeddings, capsys, one_line_error):
    code, _, err = _run(capsys, tmp_path / "nope", "--encoder-hidden-states", embeddings, "-o", tmp_path / "o.npy")
    one_line_error(code, err, "does not exist")
    assert not (tmp_path / "o.npy").exists()


def test_incomplete_engine_folder(engine, embeddings, tmp_path, capsys, one_line_error):
    (engine / "fidelity.onnx").unlink()
    code, _, err = _run(capsys, engine, "--encoder-hidden-states", embeddings, "-o", tmp_path / "o.npy")
    one_line_error(code, err, "fidelity.onnx is missing")
    (engine / "manifest.json").unlink()
    code, _, err = _run(capsys, engine, "--encoder-hidden-states", embeddings, "-o", tmp_path / "o.npy")
    one_line_error(code, err, "no manifest.json")
    assert not (tmp_path / "o.npy").exists()


def test_unsupported_schema_version(engine, embeddings, tmp_path, capsys, one_line_error):
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (engine / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = _run(capsys, engine, "--encoder-hidden-states", embeddings, "-o", tmp_path / "o.npy")
    one_line_error(code, err, "schema version 99", "reads versions 1")


def test_tampered_graph_fails_checksum(engine, embeddings, tmp_path, capsys, one_line_error):
    with open(engine / "planning.onnx", "r+b") as handle:  # same size, one byte changed
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 1]))
    code, _, err = _run(capsys, engine, "--encoder-hidden-states", embeddings, "-o", tmp_path / "o.npy")
    one_line_error(code, err, "planning.onnx does not match its sha256")


def test_grown_graph_fails_size_check(engine, embeddings, tmp_path, capsys, one_line_error):
    with open(engine / "planning.onnx", "ab") as handle:
        handle.write(b"\0")
    code, _, err = _run(capsys, engine, "--encoder-hidden-states", embeddings, "-o", tmp_path / "o.npy")
    one_line_error(code, err, "planning.onnx has", "(truncated or replaced)")


@pytest.mark.parametrize("shape,dtype,needle", [
    ((1, 4, 8), np.float32, "expected 4 dimensions"),
    ((1, 3, 8, 8), np.float32, "(1, 4, latent_height, latent_width)"),
    ((1, 4, 64, 64), np.float32, "latent_height 64 is outside 4..16"),
    ((1, 4, 8, 8), np.int64, "dtype int64"),
])
def test_latents_the_graphs_cannot_take(engine, embeddings, tmp_path, capsys, shape, dtype, needle, one_line_error):
    latents = tmp_path / "latents.npy"
    np.save(latents, np.zeros(shape, dtype=dtype))
    code, _, err = _run(capsys, engine, "--encoder-hidden-states", embeddings, "--latents", latents,
                        "-o", tmp_path / "o.npy")
    one_line_error(code, err, needle)
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.parametrize("cache_step", [0, 11])
def test_cache_step_outside_1_to_T(engine, embeddings, tmp_path, capsys, cache_step, one_line_error):
    code, _, err = _run(capsys, engine, "--encoder-hidden-states", embeddings, "-o", tmp_path / "o.npy",
                        "--steps", 10, "--cache-step", cache_step)
    one_line_error(code, err, f"cache step {cache_step} is outside 1..10")


def test_unknown_scheduler_lists_the_known_ones(engine, embeddings, tmp_path, capsys, one_line_error):
    code, _, err = _run(capsys, engine, "--encoder-hidden-states", embeddings, "-o", tmp_path / "o.npy",
                        "--scheduler", "heun")
    one_line_error(code, err, "unknown scheduler 'heun'", "ddim", "dpm++2m")


def test_unwritable_output_fails_before_compute(engine, embeddings, tmp_path, capsys, one_line_error):
    code, _, err = _run(capsys, engine, "--encoder-hidden-states", embeddings, "-o", tmp_path / "no" / "o.npy")
    one_line_error(code, err, "does not exist")


def test_unreadable_embeddings_file(engine, tmp_path, capsys, one_line_error):
    bad = tmp_path / "bad.npy"
    bad.write_text("not numpy")
    code, _, err = _run(capsys, engine, "--encoder-hidden-states", bad, "-o", tmp_path / "o.npy")
    one_line_error(code, err, "cannot read --encoder-hidden-states")
