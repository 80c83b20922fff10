"""Hostile and careless input to the runtime: one line, exit code 2, nothing written, before any work.

Table-driven: each row is what a user might type, the fragment the one-line error must hold, and
(implicitly) that no output file appears.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from cair_runtime.cli import main as cair_run
from cair_runtime.errors import InvalidInputError
from cair_runtime.text2image import CairText2Image


@pytest.fixture(scope="module")
def shapes(exported):
    return exported("shapes", with_pipeline=True)


@pytest.fixture
def files(tmp_path):
    """Input files of every kind of wrong: (name -> path)."""
    paths = {}
    np.save(tmp_path / "nan.npy", np.full((1, 32, 64), np.nan, np.float32))
    np.save(tmp_path / "inf_latents.npy", np.full((1, 4, 8, 8), np.inf, np.float32))
    np.save(tmp_path / "good.npy", np.zeros((1, 32, 64), np.float32))
    (tmp_path / "empty.npy").write_bytes(b"")
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000, 77, 1024), }"
    header += b" " * (118 - len(header)) + b"\n"
    (tmp_path / "absurd.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(16))
    os.mkfifo(tmp_path / "fifo.png")
    for name in ("nan.npy", "inf_latents.npy", "good.npy", "empty.npy", "absurd.npy", "fifo.png"):
        paths[name] = tmp_path / name
    return paths


TEXT = [
    (["--guidance-scale", "nan"], "guidance scale nan must be a finite number"),
    (["--guidance-scale", "inf"], "guidance scale inf must be a finite number"),
    (["--steps", "1001"], "must be an integer in 1..1000 (the model's training timesteps)"),
    (["--steps", "0"], "must be an integer in 1..1000"),
    (["--num-images", "65"], "the limit is 1..64"),
    (["--num-images", "0"], "must be a positive integer"),
    (["--scheduler", "pndm", "--steps", "3"], "PNDM without skip_prk_steps needs at least 4 steps"),
    (["--scheduler", "lms"], "unknown scheduler 'lms'"),
    (["--cache-step", "9", "--steps", "8"], "cache step 9 is outside 1..8"),
    (["--height", "100000"], "(100000 px; allowed 32..128 px)"),
    (["--height", "62"], "not a positive multiple of 4"),
    (["--seed", "-1"], "non-negative integer"),
    (["--backend", "tensorrt", "--graph-optimization", "basic"], "--graph-optimization configure onnxruntime"),
    (["--device-id", "-1"], "--device-id -1 must be a GPU index"),
]


@pytest.mark.parametrize("argv, message", TEXT, ids=[" ".join(a) for a, _ in TEXT])
def test_text_to_image_refusals(shapes, tmp_path, capsys, one_line_error, argv, message):
    out = tmp_path / "out.png"
    code = cair_run([str(shapes), "a red circle", "-o", str(out), *argv])
    one_line_error(code, capsys.readouterr().err, message, prog="cair-run")
    assert list(tmp_path.iterdir()) == []


OUTPUTS = [
    ("x.jpg", "must end in .png"),
    ("fifo.png", "is not a regular file"),
    ("missing/x.png", "does not exist"),
]


@pytest.mark.parametrize("name, message", OUTPUTS, ids=[n for n, _ in OUTPUTS])
def test_output_refusals(shapes, files, capsys, one_line_error, name, message):
    target = files["fifo.png"].parent / name
    before = sorted(p.name for p in target.parent.iterdir()) if target.parent.is_dir() else []
    code = cair_run([str(shapes), "a red circle", "-o", str(target)])
    one_line_error(code, capsys.readouterr().err, message, prog="cair-run")
    assert (sorted(p.name for p in target.parent.iterdir()) if target.parent.is_dir() else []) == before
    assert files["fifo.png"].exists() and not files["fifo.png"].is_file()  # the pipe is still a pipe


UNET = [
    (["--encoder-hidden-states", "nan.npy"], "prompt embeddings contain NaN or infinity"),
    (["--encoder-hidden-states", "good.npy", "--latents", "inf_latents.npy"], "latents contain NaN or infinity"),
    (["--encoder-hidden-states", "empty.npy"], "cannot read --encoder-hidden-states"),
    (["--encoder-hidden-states", "absurd.npy"], "cannot read --encoder-hidden-states"),
    (["--encoder-hidden-states", "good.npy", "-o", "latents.png"], "must end in .npy"),
    (["--encoder-hidden-states", "good.npy", "--backend", "aoti", "--threads", "2"], "--threads configure onnxruntime"),
]


@pytest.mark.parametrize("argv, message", UNET, ids=[a[1] + (" " + a[3] if len(a) > 3 else "") for a, _ in UNET])
def test_unet_only_refusals(shapes, files, capsys, one_line_error, argv, message):
    folder = files["good.npy"].parent
    argv = [str(folder / a) if a.endswith((".npy",)) and a in files else a for a in argv]
    output = [] if "-o" in argv else ["-o", str(folder / "latents.npy")]
    code = cair_run([str(shapes), *argv, *output])
    one_line_error(code, capsys.readouterr().err, message, prog="cair-run")
    assert not (folder / "latents.npy").exists() and not (folder / "latents.png").exists()


API = [
    (dict(cache_step=2.5), "cache step 2.5 must be an integer"),
    (dict(num_inference_steps=4.0), "steps 4.0 must be an integer"),
    (dict(num_inference_steps=True), "steps True must be an integer"),
    (dict(guidance_scale="7"), "guidance scale '7' must be a finite number"),
    (dict(guidance_scale=float("nan")), "guidance scale nan must be a finite number"),
    (dict(num_images_per_prompt=1.5), "images per prompt 1.5 must be a positive integer"),
    (dict(seed=[1, 2]), "2 seeds for 1 images"),
    (dict(seed=1.0), "seed 1.0 must be a non-negative integer"),
    (dict(prompt=[None]), "prompts must be strings"),
]


@pytest.mark.parametrize("overrides, message", API, ids=[next(iter(o)) + "=" + repr(next(iter(o.values()))) for o, _ in API])
def test_python_api_validates_like_the_cli(shapes, overrides, message):
    with CairText2Image(shapes) as pipeline:
        arguments = {"prompt": "a red circle", "num_inference_steps": 4, **overrides}
        with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            pipeline(**arguments)
