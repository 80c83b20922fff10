"""Nothing the user has is lost: hostile outputs, overwrite, concurrent exports, signals, stale folders."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

import cair_export.core.export as export_module
from cair_export.cli import main
from cair_export.core.export import ExportConfig, export_model
from cair_export.core.folder_transaction import export_lock
from cair_export.core.models import load_model
from cair_export.core.models.presets import PRESETS
from cair_runtime.errors import InvalidInputError
from cair_runtime.manifest import load_manifest

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                    str(Path(__file__).parents[1] / "runtime"),
                                                    os.environ.get("PYTHONPATH", "")])}


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for folders): 'nothing written' compares these."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def _fake_export(model, work, config, height, width, progress, release_unet=False):
    """Stands in for the slow trace and validation where only the folder handling is under test."""
    (work / "manifest.json").write_text("{}")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A folder holding a model, a user's folder, a file and broken UNet folders, for the table below."""
    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    config = PRESETS["tiny-sd15"].unet_config
    UNet2DConditionModel(**config).save_pretrained(root / "model")
    (root / "user").mkdir()
    (root / "user" / "thesis.txt").write_text("precious")
    (root / "file").write_text("a file")
    (root / "readonly").mkdir(mode=0o555)
    saved = json.loads((root / "model" / "config.json").read_text())
    for name, text in (("badjson", "{not json"), ("badfield", json.dumps({**saved, "attention_head_dim": 0})),
                       ("badsize", json.dumps({**saved, "sample_size": -3}))):
        (root / name).mkdir()
        (root / name / "config.json").write_text(text)
        (root / name / "diffusion_pytorch_model.safetensors").write_bytes(
            (root / "model" / "diffusion_pytorch_model.safetensors").read_bytes())
    return root


_ROOT_WRITES_ANYWHERE = pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")


@pytest.mark.parametrize("argv, needles", [
    (["export", "tiny-sd15", "{root}/out", "--opset", "99"], ["opset 99 is not supported", "17 to"]),
    (["export", "tiny-sd15", "{root}/out", "--opset", "16"], ["opset 16 is not supported"]),
    (["export", "tiny-sd15", "{root}/out", "--max-batch", "0"], ["--max-batch", "positive"]),
    (["export", "tiny-sd15", "{root}/out", "--cache-step-hint", "0"], ["--cache-step-hint", "positive"]),
    (["export", "tiny-sd15", "{root}/out", "--height", "-8"], ["height -8", "positive multiple of 8"]),
    (["export", "tiny-sd15", "{root}/out", "--width", "0"], ["width 0", "positive multiple of 8"]),
    (["macs", "tiny-sd15", "--batch", "0"], ["--batch", "positive"]),
    (["macs", "tiny-sd15", "--batch", "-2"], ["--batch", "positive"]),
    (["macs", "tiny-sd15", "--steps", "0"], ["--steps", "positive"]),
    (["profile", "tiny-sd15", "--prompts", "x.txt", "--batch", "0"], ["--batch", "positive"]),
    (["export", "tiny-sd15", "/dev/null/x"], ["/dev/null is a file, not a folder"]),
    (["export", "tiny-sd15", "/proc/x"], ["cannot write in folder /proc"]),
    (["export", "tiny-sd15", "{root}/file"], ["exists and is not a folder"]),
    (["export", "tiny-sd15", "{root}/file/out"], ["is a file, not a folder"]),
    pytest.param(["export", "tiny-sd15", "{root}/readonly/out"], ["cannot write in folder"],
                 marks=_ROOT_WRITES_ANYWHERE),
    (["export", "tiny-sd15", "{root}/user"], ["not empty", "--overwrite"]),
    (["export", "tiny-sd15", "{root}/user", "--overwrite"], ["only a complete engine folder", "would lose its files"]),
    (["export", "{root}/model", "{root}/model", "--overwrite"], ["is the model folder"]),
    (["export", "{root}/model", "{root}", "--overwrite"], ["holds the model folder"]),
    (["export", "{root}/model", "{root}/model/..", "--overwrite"], ["holds the model folder"]),
    (["export", "{root}/badjson", "{root}/out"], ["badjson/config.json", "not readable JSON"]),
    (["export", "{root}/badfield", "{root}/out"], ["badfield/config.json", "does not describe a UNet2DConditionModel"]),
    (["export", "{root}/badsize", "{root}/out"], ["badsize/config.json", "sample_size -3"]),
])
def test_hostile_input_is_one_line_and_writes_nothing(hostile, capsys, one_line_error, argv, needles):
    before = _snapshot(hostile)
    try:
        code = main([arg.format(root=hostile) for arg in argv])
    except SystemExit as exit_:  # argparse refuses a flag's value itself
        code = exit_.code
    one_line_error(code, capsys.readouterr().err, *needles, prog="cair-export")
    assert _snapshot(hostile) == before


def test_a_folder_that_appears_during_the_export_is_left_alone(tmp_path, monkeypatch):
    out = tmp_path / "engine"

    def export_while_someone_writes(model, work, *args):
        _fake_export(model, work, *args)
        out.mkdir()  # empty: a plain os.rename would silently replace it

    monkeypatch.setattr(export_module, "_export_into", export_while_someone_writes)
    with pytest.raises(InvalidInputError, match="appeared while exporting"):
        export_model(load_model("tiny-sd15"), out, progress=lambda message: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"] and not any(out.iterdir())

    def user_files_appear(model, work, *args):
        _fake_export(model, work, *args)
        (out / "notes.txt").write_text("mine")

    monkeypatch.setattr(export_module, "_export_into", user_files_appear)
    with pytest.raises(InvalidInputError, match="only a complete engine folder"):  # even with overwrite
        export_model(load_model("tiny-sd15"), out, overwrite=True, progress=lambda message: None)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_second_export_to_the_same_folder_fails_at_once(tmp_path, capsys, one_line_error):
    """One process holds the target's lock (as a running export does); the CLI export fails in one line."""
    out = tmp_path / "engine"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cair_export.core.folder_transaction import export_lock\n"
                               "with export_lock(sys.argv[1]):\n print('locked', flush=True); time.sleep(60)",
         str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.perf_counter()
        code = main(["export", "tiny-sd15", str(out)])
        one_line_error(code, capsys.readouterr().err, f"another export to {out} is running (pid {holder.pid})",
                       prog="cair-export")
        assert time.perf_counter() - started < 5  # before loading the model
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up (SIGKILL): its lock went with it, the next export wins.
    export_model(load_model("tiny-sd15"), out, ExportConfig(validate=False), progress=lambda message: None)
    load_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_lock_is_exclusive_between_threads_and_reentrant_within_one(tmp_path):
    import threading

    out = tmp_path / "engine"
    errors = []
    with export_lock(out), export_lock(out):  # re-entrant: the CLI and export_model both take it
        thread = threading.Thread(target=lambda: errors.append(_try_lock(out)))
        thread.start()
        thread.join()
    assert errors and "another export" in errors[0] and f"pid {os.getpid()}" in errors[0]
    assert list(tmp_path.iterdir()) == []  # the lock file goes with the lock
    assert _try_lock(out) == ""


def _try_lock(out: Path) -> str:
    try:
        with export_lock(out):
            return ""
    except InvalidInputError as error:
        return str(error)


def _export_subprocess(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cair_export.cli", "export", "tiny-sd15", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _wait_for_partial(out: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(f".{out.name}.partial-*")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_export_removes_the_partial_folder(tmp_path, signum, code):
    out = tmp_path / "engine"
    process = _export_subprocess(out)
    _wait_for_partial(out, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    lines = [line for line in err.splitlines() if not line.startswith("[cair-export]")]  # progress lines aside
    assert len(lines) == 1 and lines[0].startswith("cair-export: ") and "nothing was written" in lines[0], err
    assert list(tmp_path.iterdir()) == []  # no partial folder, no lock file, no engine


def test_stale_partial_folders_of_dead_exports_are_removed(tmp_path, monkeypatch):
    out = tmp_path / "engine"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".engine.partial-{dead.pid}-abc123"
    live = tmp_path / f".engine.partial-{os.getppid()}-def456"  # a running process: maybe another host's export
    other = tmp_path / f".other.partial-{dead.pid}-abc123"  # another target's: not ours to judge
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "planning.onnx").write_bytes(b"half")
    monkeypatch.setattr(export_module, "_export_into", _fake_export)
    export_model(load_model("tiny-sd15"), out, progress=lambda message: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["engine", live.name, other.name])


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module, "share_weights", full)  # where the UNet weights are written
    with pytest.raises(InvalidInputError, match="no space left to write the export") as caught:
        export_model(load_model("tiny-sd15"), tmp_path / "engine", progress=lambda message: None)
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_profile_runs_on_sdxl(tmp_path):
    """SDXL needs its added conditions (pooled text embeddings, size ids) in the profiled loop."""
    from cair_export.lab.profile import ProfileConfig, profile_model

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    figures = profile_model(ProfileConfig(model="tiny-sdxl", prompts=prompts, steps=3, batch=2),
                            progress=lambda message: None)
    assert figures["prompts"] == 2 and figures["evaluations"] == 3
    for quantity in ("maps", "outputs"):
        mean = np.array(figures["series"][quantity]["relative"]["mean"])
        assert mean.shape == (2,) and np.isfinite(mean).all() and (mean > 0).all()
    assert 1 <= figures["recommended_cache_step"] <= 3
