"""Text to image: the runtime against the torch reference CAIR pipeline, and the user-facing details."""

import json
import subprocess
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cair_export.core.export import ExportConfig, export_model
from cair_export.core.models import load_model
from cair_export.core.reference import cair_text_to_image
from cair_runtime.cli import main as cair_run
from cair_runtime.text2image import CairText2Image, PromptTruncatedWarning

PROMPTS = ["a small red circle on a white background", "a large blue square left of a green triangle"]


def _latents(count, shape=(4, 8, 8), seed=0):
    return np.stack([np.random.default_rng(seed + k).standard_normal(shape, dtype=np.float32) for k in range(count)])


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sd21", "tiny-sdxl", "shapes"])
def test_images_match_reference_pipeline(exported, preset):
    folder = exported(preset, with_pipeline=True)
    runtime = CairText2Image(folder)
    pipe = load_model(preset, with_pipeline=True).diffusers_pipeline()
    latent_shape = (runtime.engine.in_channels, *runtime.engine.latent_size(None, None))
    for cache_step in (2, 6):
        result = runtime(PROMPTS, num_images_per_prompt=2, num_inference_steps=6, cache_step=cache_step,
                         guidance_scale=5.0, seed=3)
        expected = cair_text_to_image(pipe, PROMPTS, None, torch.from_numpy(_latents(4, latent_shape, seed=3)),
                                      num_images_per_prompt=2, num_inference_steps=6, cache_step=cache_step,
                                      guidance_scale=5.0).numpy()
        assert result.decoded.shape == expected.shape == (4, 3, 64, 64)
        assert np.abs(result.decoded - expected).max() <= 1e-3
        assert result.images.dtype == np.uint8 and result.images.shape == (4, 64, 64, 3)


def test_negative_prompt_matches_reference(exported):
    folder = exported("tiny-sd15", with_pipeline=True)
    result = CairText2Image(folder)(PROMPTS[:1], "blurry", num_inference_steps=4, cache_step=2, seed=5)
    pipe = load_model("tiny-sd15", with_pipeline=True).diffusers_pipeline()
    expected = cair_text_to_image(pipe, PROMPTS[:1], ["blurry"], torch.from_numpy(_latents(1, seed=5)),
                                  num_inference_steps=4, cache_step=2, guidance_scale=7.5).numpy()
    assert np.abs(result.decoded - expected).max() <= 1e-3


def test_each_image_is_reproducible_from_its_seed(exported):
    runtime = CairText2Image(exported("tiny-sd21", with_pipeline=True))
    batch = runtime(PROMPTS, num_images_per_prompt=3, num_inference_steps=3, cache_step=1, seed=10)
    assert len(batch.images) == 6  # more than the engine's max batch of 4: split, not an error
    assert [p["seed"] for p in batch.parameters] == list(range(10, 16))
    assert [p["prompt"] for p in batch.parameters] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    single = runtime(PROMPTS[1], num_inference_steps=3, cache_step=1, seed=14)
    np.testing.assert_allclose(single.decoded[0], batch.decoded[4], atol=1e-5)


def test_long_prompt_is_truncated_with_a_warning(exported):
    runtime = CairText2Image(exported("tiny-sd21", with_pipeline=True))
    words = " ".join(["red"] * 74 + ["purple", "hexagon", "zebra"])  # BOS + 75 words + EOS = 77
    with pytest.warns(PromptTruncatedWarning, match="dropped: 'hexagon zebra'"):
        ids = runtime.text_encoders[0][1]([words])
    assert ids.shape == (1, 77) and ids[0, -1] == runtime.text_encoders[0][0]["eos_token_id"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.text_encoders[0][1](["a red circle"])  # a short prompt: no warning


def test_empty_prompt_is_allowed(exported):
    result = CairText2Image(exported("tiny-sd21", with_pipeline=True))("", num_inference_steps=2, cache_step=1)
    assert result.images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sd21", "tiny-sdxl"])
def test_pipeline_folder_in_diffusers_layout_exports(tmp_path, exported, preset):
    """A diffusers pipeline folder (save_pretrained layout, as downloaded checkpoints) exports like the preset."""
    model = load_model(preset, with_pipeline=True)
    model.diffusers_pipeline().save_pretrained(tmp_path / "checkpoint")
    assert (tmp_path / "checkpoint" / "model_index.json").is_file()
    export_model(load_model(str(tmp_path / "checkpoint"), with_pipeline=True), tmp_path / "engine",
                 ExportConfig(validate=False), progress=lambda message: None)  # the images below are the check
    from_folder = CairText2Image(tmp_path / "engine")(PROMPTS[0], num_inference_steps=3, cache_step=1)
    from_preset = CairText2Image(exported(preset, with_pipeline=True))(PROMPTS[0], num_inference_steps=3, cache_step=1)
    np.testing.assert_allclose(from_folder.decoded, from_preset.decoded, atol=1e-5)
    assert from_folder.parameters[0]["model"] == "checkpoint"


def test_cli_writes_png_with_parameters(exported, tmp_path, capsys):
    folder = exported("tiny-sd21", with_pipeline=True)
    out = tmp_path / "out.png"
    code = cair_run([str(folder), "a red circle", "-o", str(out), "--steps", "4", "--cache-step", "2",
                     "--num-images", "2", "--negative-prompt", "blue", "--seed", "7", "--scheduler", "dpm++2m"])
    assert code == 0, capsys.readouterr().err
    images = [Image.open(tmp_path / f"out-{k}.png") for k in range(2)]
    assert [im.size for im in images] == [(64, 64)] * 2
    parameters = json.loads(images[1].text["parameters"])
    # The schedule as it ran, defaults filled in (m = n on merged caches, k = 1): replaying it gives this image.
    assert parameters == {"prompt": "a red circle", "negative_prompt": "blue", "prompt_chunks": 1, "seed": 8, "steps": 4,
                          "cache_step": 2, "guidance_stop": 2, "deep_interval": 1, "skip_mode": "uniform",
                          "planning_interval": 1,
                          "guidance_scale": 7.5, "scheduler": "dpm++2m", "model": "tiny-sd21",
                          "height": 64, "width": 64}


def test_cli_bad_sizes_and_outputs(exported, tmp_path, capsys, one_line_error):
    folder = str(exported("tiny-sd21", with_pipeline=True))
    for argv, needle in (([folder, "x", "-o", str(tmp_path / "a.png"), "--height", "60"], "multiple of 8"),
                         ([folder, "x", "-o", str(tmp_path / "a.png"), "--width", "512"], "allowed 32..128 px"),
                         ([folder, "x", "-o", str(tmp_path / "missing" / "a.png")], "does not exist"),
                         ([folder, "x", "-o", str(tmp_path / "a.png"), "--seed", "-1"], "non-negative integer"),
                         ([folder, "x", "-o", str(tmp_path / "b.png"), "--num-images", "2"], "b-1.png is a folder")):
        (tmp_path / "b-1.png").mkdir(exist_ok=True)  # the second image's path is taken: refused before compute
        one_line_error(cair_run(argv), capsys.readouterr().err, needle)
    (tmp_path / "b-1.png").rmdir()
    assert list(tmp_path.iterdir()) == []


def test_cli_warns_once_for_a_truncated_prompt(exported, tmp_path):
    folder = exported("tiny-sdxl", with_pipeline=True)
    prompt = " ".join(["red"] * 80)
    result = subprocess.run(["cair-run", str(folder), prompt, "-o", str(tmp_path / "a.png"), "--steps", "2",
                             "--prompt-chunks", "1"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("warning: prompt longer than 1 window(s) of 75 tokens") == 1


def test_unet_only_folder_refuses_prompts(exported, tmp_path, capsys, one_line_error):
    code = cair_run([str(exported("tiny-sd21")), "a red circle", "-o", str(tmp_path / "a.png")])
    one_line_error(code, capsys.readouterr().err, "UNet-only export")
