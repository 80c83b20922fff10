"""Hostile and careless input to the runtime: one line, exit code 2, nothing written, before any work.

Table-driven: each row is what a user might type, the fragment the one-line error must hold, and
(implicitly) that no output file appears.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cair_export.cli import main as cair_export
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


# --- round three: no silent black images, no tracebacks, offline means offline ---------------------
#
# Every adapter below targets one linear weight of the shapes UNet (96 x 24, time embedding), in the
# peft layout; each row names what a user might pass and the exact outcome on each surface.

LORA_MODULE = "unet.time_embedding.linear_1"
RANK = 2


def _write_lora(path, down, up, metadata=None, dtype=None):
    """A peft-layout adapter on ``LORA_MODULE``; ``dtype="bf16"`` writes bfloat16 through torch."""
    tensors = {f"{LORA_MODULE}.lora_A.weight": down, f"{LORA_MODULE}.lora_B.weight": up}
    if dtype == "bf16":
        import torch
        from safetensors.torch import save_file

        save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()}, str(path), metadata)
    else:
        from safetensors.numpy import save_file

        save_file(tensors, str(path), metadata)
    return path


def _factors(seed=0, value=None):
    rng = np.random.default_rng(seed)
    down, up = rng.standard_normal((RANK, 24), dtype=np.float32), 0.1 * rng.standard_normal((96, RANK), dtype=np.float32)
    if value is not None:
        down[:], up[:] = value, value
    return down, up


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Adapter files of every kind of wrong, and two good ones (float32, and the same values in bf16)."""
    import torch

    folder = tmp_path_factory.mktemp("adapters")
    down, up = _factors()
    # the bf16 adapter's values, exactly: float32 rounded to bfloat16 by torch, widened again
    down16, up16 = (torch.from_numpy(a).to(torch.bfloat16).float().numpy() for a in (down, up))
    nan_down = down.copy()
    nan_down[0, 3] = np.nan
    inf_up = up.copy()
    inf_up[5, 1] = np.inf
    paths = {
        "good": _write_lora(folder / "good.safetensors", down16, up16),
        "bf16": _write_lora(folder / "bf16.safetensors", down16, up16, dtype="bf16"),
        "nan": _write_lora(folder / "nan.safetensors", nan_down, up),
        "inf": _write_lora(folder / "inf.safetensors", down, inf_up),
        "overflow": _write_lora(folder / "overflow.safetensors", *_factors(value=1e20)),  # up @ down = 2e40
        "alpha": _write_lora(folder / "alpha.safetensors", down, up,
                             {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 1e39})}),
        # finite fused weights (2e36) whose activations overflow inside the UNet
        "huge": _write_lora(folder / "huge.safetensors", *_factors(value=1e18)),
    }
    data = paths["good"].read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[:-40])
    paths["truncated"] = folder / "truncated.safetensors"
    (folder / "folder.safetensors").mkdir()
    paths["folder"] = folder / "folder.safetensors"
    os.mkfifo(folder / "fifo.safetensors")
    paths["fifo"] = folder / "fifo.safetensors"
    os.symlink(folder / "loop.safetensors", folder / "loop.safetensors")
    paths["loop"] = folder / "loop.safetensors"
    return paths


def test_bf16_adapters_read_exactly_as_torch_widens_them(adapters):
    import torch
    from safetensors.torch import load_file

    from cair_runtime.lora import read_lora_file

    tensors, _ = read_lora_file(adapters["bf16"])
    expected = {k: v.float().numpy() for k, v in load_file(str(adapters["bf16"])).items()}
    assert load_file(str(adapters["bf16"]))[f"{LORA_MODULE}.lora_A.weight"].dtype == torch.bfloat16
    assert tensors.keys() == expected.keys()
    for key, value in expected.items():
        assert tensors[key].dtype == np.float32 and np.array_equal(tensors[key], value)


def _images(tmp_path_factory):
    """Init images: EXIF-rotated JPEG and its upright twin, oversize chunks, a 12000 px header."""
    import struct
    import zlib

    from PIL import Image, ImageOps, PngImagePlugin

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    stored = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))  # 64 wide, 48 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    stored.save(folder / "rotated.jpg", exif=exif, quality=95)
    with Image.open(folder / "rotated.jpg") as opened:
        ImageOps.exif_transpose(opened).save(folder / "upright.png")  # the oracle: Pillow's own transpose
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (2 * 1024 * 1024), zip=True)
    stored.save(folder / "big_text.png", pnginfo=info)
    stored.save(folder / "big_icc.png", icc_profile=b"\0" * (2 * 1024 * 1024))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0)  # 12000 x 12000 RGB, 8 bits
    (folder / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                      + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b""))
    return {name: folder / name for name in ("rotated.jpg", "upright.png", "big_text.png", "big_icc.png", "huge.png")}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _images(tmp_path_factory)


# (what is given, CairText2Image keywords or an adapter name, the error class, the field, the message)
PYTHON_API = [
    ("lora NaN", dict(lora="nan"), "InvalidInputError", "loras", "holds 1 NaN or infinite values"),
    ("lora inf", dict(lora="inf"), "InvalidInputError", "loras", "holds 1 NaN or infinite values"),
    ("lora overflows when fused", dict(lora="overflow"), "InvalidInputError", "loras", "overflows float32"),
    ("lora alpha 1e39", dict(lora="alpha"), "InvalidInputError", "loras", "alpha 1e+39 / rank 2"),
    ("lora scale 1e39", dict(lora="good", scale=1e39), "InvalidInputError", "loras", "scale 1e+39 x alpha 2"),
    ("lora overflows in the UNet", dict(lora="huge"), "NonFiniteResultError", None,
     "the denoised latents hold"),
    ("lora truncated", dict(lora="truncated"), "InvalidInputError", "loras", "truncated"),
    ("lora folder", dict(lora="folder"), "InvalidInputError", "loras", "is a folder"),
    ("lora fifo", dict(lora="fifo"), "InvalidInputError", "loras", "not a regular file (a pipe"),
    ("lora link loop", dict(lora="loop"), "InvalidInputError", "loras", "a symbolic link loop"),
    ("guidance 1e308", dict(guidance_scale=1e308), "InvalidInputError", "guidance_scale", "outside 0..100"),
    ("guidance -1", dict(guidance_scale=-1.0), "InvalidInputError", "guidance_scale", "outside 0..100"),
    ("image big text chunk", dict(image="big_text.png"), "InvalidInputError", "image", "MAX_TEXT_CHUNK"),
    ("image big ICC chunk", dict(image="big_icc.png"), "InvalidInputError", "image", "MAX_TEXT_CHUNK"),
    ("image 12000 px", dict(image="huge.png"), "InvalidInputError", "image", "is 12000x12000 px; images are read up to 8192"),
]


@pytest.fixture(scope="module")
def pipeline(shapes):
    with CairText2Image(shapes, threads=1) as pipeline:
        yield pipeline


@pytest.mark.parametrize("what, given, error, field, message", PYTHON_API, ids=[row[0] for row in PYTHON_API])
def test_python_api_round_three(pipeline, adapters, images, what, given, error, field, message):
    import cair_runtime.errors as errors

    given = dict(given)
    arguments = {"prompt": "a red circle", "num_inference_steps": 4, "cache_step": 2}
    if "lora" in given:
        arguments["loras"] = [(adapters[given.pop("lora")], given.pop("scale", 1.0))]
    if "image" in given:
        arguments["image"] = images[given.pop("image")]
    with pytest.raises(getattr(errors, error)) as caught:
        pipeline(**arguments, **given)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert getattr(caught.value, "field", None) == field


def test_python_api_good_and_bf16_adapters_give_the_same_image(pipeline, adapters):
    call = dict(num_inference_steps=4, cache_step=2, seed=5)
    base = pipeline("a red circle", **call)
    good = pipeline("a red circle", loras=[(adapters["good"], 1.0)], **call)
    bf16 = pipeline("a red circle", loras=[(adapters["bf16"], 1.0)], **call)
    assert not np.array_equal(good.latents, base.latents)  # the adapter acts
    assert np.array_equal(bf16.latents, good.latents) and np.array_equal(bf16.images, good.images)


def test_python_api_exif_orientation_is_applied_as_pillow_does(pipeline, images):
    call = dict(num_inference_steps=4, cache_step=2, seed=5, strength=0.6)
    rotated = pipeline("a red circle", image=images["rotated.jpg"], **call)
    upright = pipeline("a red circle", image=images["upright.png"], **call)
    assert rotated.images.shape[1:3] == (64, 48)  # stored 64 wide, 48 high; viewed upright 48 wide, 64 high
    assert np.array_equal(rotated.images, upright.images)
    assert rotated.parameters[0]["image"] == "rotated.jpg"  # the file name, not the path given


def _fill(argv, paths):
    """``{name}`` and ``{name}:SCALE`` in arguments -> the file's path."""
    for name, path in paths.items():
        argv = [a.replace("{" + name + "}", str(path)) for a in argv]
    return argv


# (cair-run arguments, the one line's fragment); none writes a file
CLI = [
    (["--guidance-scale", "1e308"], "guidance scale 1e+308 is outside 0..100"),
    (["--guidance-scale", "101"], "guidance scale 101.0 is outside 0..100"),
    (["--lora", "{nan}"], "holds 1 NaN or infinite values"),
    (["--lora", "{inf}"], "holds 1 NaN or infinite values"),
    (["--lora", "{overflow}"], "overflows float32"),
    (["--lora", "{alpha}"], "alpha 1e+39 / rank 2"),
    (["--lora", "{good}:1e39"], "scale 1e+39 x alpha 2"),
    (["--lora", "{huge}"], "the denoised latents hold"),
    (["--lora", "{truncated}"], "truncated"),
    (["--lora", "{folder}"], "is a folder"),
    (["--lora", "{fifo}"], "not a regular file (a pipe"),
    (["--lora", "{loop}"], "a symbolic link loop"),
    (["--image", "{big_text.png}"], "MAX_TEXT_CHUNK"),
    (["--image", "{big_icc.png}"], "MAX_TEXT_CHUNK"),
    (["--image", "{huge.png}"], "is 12000x12000 px; images are read up to 8192"),
]


@pytest.mark.parametrize("argv, message", CLI, ids=[" ".join(a) for a, _ in CLI])
def test_cli_round_three(shapes, adapters, images, tmp_path, capsys, one_line_error, argv, message):
    argv = _fill(argv, {**adapters, **images})
    code = cair_run([str(shapes), "a red circle", "-o", str(tmp_path / "out.png"), "--steps", "4",
                     "--cache-step", "2", *argv])
    one_line_error(code, capsys.readouterr().err, message, prog="cair-run")
    assert list(tmp_path.iterdir()) == []


def _png_pixels(path):
    from PIL import Image

    with Image.open(path) as image:
        return np.array(image), dict(image.text)


def test_cli_exif_and_bf16_give_the_right_images(shapes, adapters, images, tmp_path, capsys):
    common = [str(shapes), "a red circle", "--steps", "4", "--cache-step", "2", "--strength", "0.6"]
    outputs = {}
    for name, extra in (("rotated", ["--image", str(images["rotated.jpg"]), "--lora", str(adapters["bf16"])]),
                        ("upright", ["--image", str(images["upright.png"]), "--lora", str(adapters["good"])])):
        assert cair_run([*common, "-o", str(tmp_path / f"{name}.png"), *extra]) == 0
        outputs[name] = _png_pixels(tmp_path / f"{name}.png")
    assert outputs["rotated"][0].shape == (64, 48, 3)
    assert np.array_equal(outputs["rotated"][0], outputs["upright"][0])
    assert json.loads(outputs["rotated"][1]["parameters"])["image"] == "rotated.jpg"
    assert str(images["rotated.jpg"].parent) not in outputs["rotated"][1]["parameters"]


def _run(argv, **kwargs):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, **kwargs)


def test_cli_onto_a_full_disk_is_one_line_and_leaves_nothing(shapes, tmp_path, one_line_error):
    import resource

    def small_files():  # a file size limit: writes past 4 KiB fail as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    result = _run(["-m", "cair_runtime.cli", str(shapes), "a red circle", "--steps", "2", "-o",
                   str(tmp_path / "out.png")], preexec_fn=small_files)
    one_line_error(result.returncode, result.stderr, "cannot write", "out.png", "File too large", prog="cair-run")
    assert list(tmp_path.iterdir()) == []


SIGTERM_AT_RENAME = """
import os, signal, sys
from cair_runtime.cli import main
replace = os.replace
def terminated_at_rename(source, target):
    os.kill(os.getpid(), signal.SIGTERM)  # the signal arrives as the temporary PNG is renamed
    return replace(source, target)
os.replace = terminated_at_rename
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_the_final_rename_leaves_no_temporary_png(shapes, tmp_path):
    result = _run(["-c", SIGTERM_AT_RENAME, str(shapes), "a red circle", "--steps", "2", "-o",
                   str(tmp_path / "out.png")])
    assert result.returncode == 143 and result.stderr.strip() == "cair-run: terminated; nothing was written"
    assert list(tmp_path.iterdir()) == []


def test_offline_no_telemetry_files_anywhere(shapes, tmp_path):
    home, temp, cache, out = (tmp_path / name for name in ("home", "tmp", "cache", "out"))
    for folder in (home, temp, cache, out):
        folder.mkdir()
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(temp), "XDG_CACHE_HOME": str(cache)}
    env.pop("ORT_DISABLE_TELEMETRY", None)
    # The oracle first: without the setting, onnxruntime writes its device id, database and .ses file.
    # It writes none where the environment already says CI (CI=true): there the check cannot fail.
    oracle = _run(["-c", "import onnxruntime"], env={**env, "ORT_DISABLE_TELEMETRY": "0"})
    assert oracle.returncode == 0, oracle.stderr
    if not (any(temp.iterdir()) and any(cache.rglob("deviceid"))):
        pytest.skip("this onnxruntime writes no telemetry files even with telemetry on (it keeps quiet where CI "
                    "is set), so their absence would prove nothing here")
    for folder in (temp, cache):
        shutil.rmtree(folder)
        folder.mkdir()
    result = _run(["-m", "cair_runtime.cli", str(shapes), "a red circle", "--steps", "2", "-o", str(out / "x.png")],
                  env=env)
    assert result.returncode == 0, result.stderr
    # the exporter's import path (torch first, then the sessions its validation makes) too
    script = ("import cair_export.core.export; from cair_runtime.backends.onnxruntime import make_session; "
              f"make_session({str(shapes / 'vae_decoder.onnx')!r})")
    result = _run(["-c", script], env=env)
    assert result.returncode == 0, result.stderr
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["out/x.png"]


def _edited(shapes, tmp_path, edit):
    folder = tmp_path / "edited"
    shutil.copytree(shapes, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


# hand-edited manifests: (the edit, cair-run arguments, the one line's fragment)
MANIFESTS = [
    ("vae_scale_factor 0", lambda m: m["model"].update(vae_scale_factor=0), ["--height", "64"],
     "model vae_scale_factor 0 must be an integer in 1..64"),
    ("vae_scale_factor '8'", lambda m: m["model"].update(vae_scale_factor="8"), [],
     "model vae_scale_factor '8' must be an integer"),
    ("cache_step_hint 0", lambda m: m["model"].update(cache_step_hint=0), [], "model cache_step_hint 0"),
    ("num_train_timesteps 0", lambda m: m["scheduler_config"].update(num_train_timesteps=0), [],
     "num_train_timesteps 0 must be an integer"),
    ("beta_start 'x'", lambda m: m["scheduler_config"].update(beta_start="x"), [], "beta_start 'x' must be a number"),
    ("trained_betas [0.1]", lambda m: m["scheduler_config"].update(trained_betas=[0.1]), [],
     "trained_betas must be 1000 numbers in (0, 1)"),
    ("cosine betas, Karras", lambda m: m["scheduler_config"].update(beta_schedule="squaredcos_cap_v2"),
     ["--scheduler", "dpm++2m-karras", "--steps", "7"], "do not work with this model's squaredcos_cap_v2 betas"),
    ("sigma_max beyond the model", lambda m: m["scheduler_config"].update(sigma_max=80.0),
     ["--scheduler", "dpm++2m-karras", "--steps", "13"], "on the same training timestep 999"),
]


@pytest.mark.parametrize("what, edit, argv, message", MANIFESTS, ids=[row[0] for row in MANIFESTS])
def test_hand_edited_manifests(shapes, tmp_path, capsys, one_line_error, what, edit, argv, message):
    folder = _edited(shapes, tmp_path, edit)
    code = cair_run([str(folder), "a red circle", "-o", str(tmp_path / "out.png"), *argv])
    one_line_error(code, capsys.readouterr().err, message, prog="cair-run")
    assert not (tmp_path / "out.png").exists()


def _prompt_files(folder):
    (folder / "latin1.txt").write_bytes("un caf\xe9 rouge\n".encode("latin-1"))
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 4)
    return {"latin1": (folder / "latin1.txt", "is not UTF-8 text (byte 0xe9 at offset 6)"),
            "binary": (folder / "binary.txt", "holds NUL bytes from offset 0"),
            "/dev/zero": (Path("/dev/zero"), "holds more than 16 MiB")}


@pytest.mark.parametrize("kind", ["latin1", "binary", "/dev/zero"])
@pytest.mark.parametrize("command", ["calibrate", "export --calibrate"])
def test_cair_export_prompt_files(shapes, tmp_path, capsys, one_line_error, kind, command):
    path, message = _prompt_files(tmp_path)[kind]
    if command == "calibrate":
        argv = ["calibrate", str(shapes), "--prompts", str(path)]
    else:
        argv = ["export", "shapes", str(tmp_path / "engine"), "--calibrate", str(path)]
    code = cair_export([*argv])
    one_line_error(code, capsys.readouterr().err, message, prog="cair-export")
    assert not (tmp_path / "engine").exists()
    assert json.loads((shapes / "manifest.json").read_text()).get("schedule") is None  # calibrate wrote nothing


EXPORTS = [
    (["--height", "100000"], "height 100000 px is above 4096 px"),
    (["--width", "100000"], "width 100000 px is above 4096 px"),
    (["--lora", "{truncated}"], "truncated"),
    (["--lora", "{nan}"], "holds 1 NaN or infinite values"),
    (["--lora", "{loop}"], "a symbolic link loop"),
]


@pytest.mark.parametrize("argv, message", EXPORTS, ids=[" ".join(a) for a, _ in EXPORTS])
def test_cair_export_refusals(adapters, tmp_path, capsys, one_line_error, argv, message):
    argv = _fill(argv, adapters)
    code = cair_export(["export", "shapes", str(tmp_path / "engine"), *argv])
    one_line_error(code, capsys.readouterr().err, message, prog="cair-export")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_onto_a_link_to_a_folder_leaves_no_old_link(shapes, tmp_path):
    from cair_export.core.folder_transaction import _move_into_place

    old_engine = tmp_path / "v1"
    shutil.copytree(shapes, old_engine)
    (tmp_path / "current").symlink_to(old_engine, target_is_directory=True)
    work = tmp_path / ".current.partial-1-x"
    shutil.copytree(shapes, work)
    (work / "marker").write_text("new")
    _move_into_place(work, tmp_path / "current", overwrite=True, existed=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v1"]
    assert not (tmp_path / "current").is_symlink() and (tmp_path / "current" / "marker").read_text() == "new"
    assert sorted(p.name for p in old_engine.iterdir()) == sorted(p.name for p in shapes.iterdir())


def test_cair_serve_port_out_of_range_is_one_line(shapes, one_line_error):
    result = _run(["-m", "cair_runtime.serve.cli", str(shapes), "--port", "99999"])
    one_line_error(result.returncode, result.stderr, "--port 99999 is outside 1..65535", prog="cair-serve")


# HTTP: the API layer's request handling (RequestValidator.parse), without a server:
# (the body, the status, the field named, the message's fragment)
HTTP = [
    (b"[" * 10000 + b"]" * 10000, 400, None, "nested too deeply"),  # past the stack on Python 3.11, parsed on 3.12+
    (b'{"prompt": "a", "seed": ' + b"[" * 40 + b"]" * 40 + b"}", 400, None, "nested too deeply"),  # parsed anywhere
    (b'{"prompt": "a", "seed": ' + b"7" * 5000 + b"}", 400, None, "Exceeds the limit (4300 digits)"),
    ({"prompt": "a", "guidance_scale": 1e308}, 400, "guidance_scale", "guidance scale 1e+308 is outside 0..100"),
    ({"prompt": "a", "guidance_scale": 100.5}, 400, "guidance_scale", "is outside 0..100"),
    ({"prompt": "a", "guidance_scale": -0.5}, 400, "guidance_scale", "is outside 0..100"),
    ({"prompt": "a", "scheduler": "dpm++2m-karras", "steps": 13}, 200, None, None),
]


@pytest.mark.parametrize("body, status, param, message", HTTP, ids=[str(row[0])[:40] for row in HTTP])
def test_http_round_three(pipeline, body, status, param, message):
    from cair_runtime.serve.api import ApiError, RequestValidator

    validator = RequestValidator(pipeline, max_images=4, max_steps=50)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    if status == 200:
        assert validator.parse(raw).scheduler == body["scheduler"]
        return
    with pytest.raises(ApiError) as caught:
        validator.parse(raw)
    error = caught.value
    assert error.status == status and error.param == param and message in error.message
    assert json.dumps(error.body())  # the body the server sends


def test_http_cosine_betas_with_karras_is_a_400_naming_the_scheduler(shapes, tmp_path):
    from cair_runtime.serve.api import ApiError, RequestValidator

    folder = _edited(shapes, tmp_path, lambda m: m["scheduler_config"].update(beta_schedule="squaredcos_cap_v2"))
    with CairText2Image(folder, threads=1) as edited:
        validator = RequestValidator(edited, max_images=4, max_steps=50)
        with pytest.raises(ApiError) as caught:
            validator.parse(json.dumps({"prompt": "a", "scheduler": "dpm++2m-karras", "steps": 7}).encode())
    assert caught.value.status == 400 and caught.value.param == "scheduler"
    assert "squaredcos_cap_v2" in caught.value.message
