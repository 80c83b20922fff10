"""Image to image: the runtime against diffusers' img2img pipelines (n = T) and the torch reference (n < T).

Noise: diffusers' ``randn_tensor`` is replaced, where its img2img pipelines and the VAE's latent
sample call it, by the runtime's per-image numpy draws (image k: ``default_rng(seed + k)``), so both
sides start from the same numbers; everything else is diffusers' own code.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoPipelineForImage2Image
from PIL import Image

from cair_export.core.models import load_model
from cair_export.core.reference import cair_denoise, encode_prompts
from cair_runtime.cli import main as cair_run
from cair_runtime.errors import InvalidInputError, ManifestError
from cair_runtime.text2image import CairText2Image

PROMPTS = ["a small red circle on a white background", "a large blue square left of a green triangle"]
STEPS, GUIDANCE, SEED = 10, 2.0, 3


def init_image(size=(64, 64), seed=0) -> np.ndarray:
    """A smooth RGB picture with some texture: (H, W, 3) uint8."""
    y, x = np.mgrid[0:size[0], 0:size[1]] / 64.0
    rgb = np.stack([np.sin(3 * x + 1), np.cos(2 * y), np.sin(2 * (x + y))], axis=-1) * 0.4 + 0.5
    rgb += np.random.default_rng(seed).normal(0, 0.05, rgb.shape)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


class NumpyNoise:
    """``randn_tensor`` drawing image k's numbers from ``default_rng(seed + k)``, as the runtime does.

    ``generators`` are the torch generators to hand diffusers (one per image); each stands for its numpy stream.
    """

    def __init__(self, seeds):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.streams = {id(g): np.random.default_rng(seed) for g, seed in zip(self.generators, seeds)}

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        if isinstance(generator, list):
            return torch.from_numpy(np.stack([self.streams[id(g)].standard_normal(tuple(shape[1:]), dtype=np.float32)
                                              for g in generator]))
        return torch.from_numpy(self.streams[id(generator)].standard_normal(tuple(shape), dtype=np.float32))

    def install(self, monkeypatch, pipe):
        import diffusers.models.autoencoders.vae as vae_module

        monkeypatch.setattr(vae_module, "randn_tensor", self)  # DiagonalGaussianDistribution.sample
        monkeypatch.setattr(__import__(type(pipe).__module__, fromlist=["x"]), "randn_tensor", self)


def img2img_pipeline(preset):
    """diffusers' StableDiffusion(XL)Img2ImgPipeline over the preset's components, and its text-to-image pipeline."""
    text2image = load_model(preset, with_pipeline=True).diffusers_pipeline()
    return AutoPipelineForImage2Image.from_pipe(text2image), text2image


def relative_error(actual, expected):
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img2img") / "in.png"
    Image.fromarray(init_image()).save(path)
    return path


@pytest.mark.parametrize("preset,strength", [("tiny-sd15", 0.6), ("tiny-sd21", 0.75), ("tiny-sdxl", 0.5),
                                             ("shapes", 0.8), ("shapes", 1.0)])
def test_baseline_matches_diffusers_img2img_pipeline(exported, image_file, monkeypatch, preset, strength):
    runtime = CairText2Image(exported(preset, with_pipeline=True))
    steps_run = min(int(STEPS * strength), STEPS)
    result = runtime(PROMPTS[:1], num_images_per_prompt=2, image=image_file, strength=strength,
                     num_inference_steps=STEPS, cache_step=steps_run, guidance_scale=GUIDANCE, seed=SEED)
    assert result.timings.planning_steps + result.timings.fidelity_steps >= steps_run
    assert result.parameters[0]["strength"] == strength and result.parameters[0]["image"] == image_file.name

    pipe, _ = img2img_pipeline(preset)
    noise = NumpyNoise([SEED, SEED + 1])
    noise.install(monkeypatch, pipe)
    expected = pipe(PROMPTS[:1], image=Image.open(image_file), strength=strength, num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE, num_images_per_prompt=2, generator=noise.generators,
                    output_type="latent").images.numpy()
    assert result.latents.shape == expected.shape and result.latents.shape[:2] == (2, 4)
    assert relative_error(result.latents, expected) <= 1e-4


@pytest.mark.parametrize("preset,strength,cache_step", [("tiny-sd15", 0.6, 2), ("tiny-sd21", 0.75, 3),
                                                        ("tiny-sdxl", 0.5, 1), ("shapes", 0.8, 4)])
def test_cair_matches_torch_reference(exported, image_file, monkeypatch, preset, strength, cache_step):
    runtime = CairText2Image(exported(preset, with_pipeline=True))
    result = runtime(PROMPTS, image=image_file, strength=strength, num_inference_steps=STEPS, cache_step=cache_step,
                     guidance_scale=GUIDANCE, seed=SEED)
    assert result.timings.planning_steps == cache_step

    # The reference: diffusers' own start step and noised image latents, then the torch CAIR loop from there.
    pipe, text2image = img2img_pipeline(preset)
    noise = NumpyNoise([SEED, SEED + 1])
    noise.install(monkeypatch, pipe)
    pipe.scheduler.set_timesteps(STEPS)
    timesteps, steps_run = pipe.get_timesteps(STEPS, strength, "cpu")
    t_start = STEPS - steps_run
    image = pipe.image_processor.preprocess(Image.open(image_file))
    with torch.no_grad():
        latents = pipe.prepare_latents(image, timesteps[:1].repeat(2), 2, 1, torch.float32, "cpu",
                                       generator=noise.generators)
    embeds, negative, added, negative_added = encode_prompts(text2image, PROMPTS, None, latents)
    expected = cair_denoise(pipe.unet, pipe.scheduler, latents, embeds, negative, num_inference_steps=STEPS,
                            cache_step=cache_step, guidance_scale=GUIDANCE, added_cond=added,
                            negative_added_cond=negative_added, start_index=t_start).numpy()
    assert relative_error(result.latents, expected) <= 1e-4
    # and CAIR changed something: n < T is not the baseline
    baseline = runtime(PROMPTS, image=image_file, strength=strength, num_inference_steps=STEPS,
                       cache_step=steps_run, guidance_scale=GUIDANCE, seed=SEED)
    assert relative_error(baseline.latents, expected) > 1e-3


def test_grayscale_is_converted_and_seeds_are_per_image(exported):
    runtime = CairText2Image(exported("shapes", with_pipeline=True))
    rgb = init_image()
    gray = rgb[..., 0]
    call = dict(num_inference_steps=4, strength=0.5, cache_step=1, guidance_scale=GUIDANCE)
    from_gray = runtime(PROMPTS[0], image=gray, seed=7, **call)
    from_rgb = runtime(PROMPTS[0], image=np.repeat(gray[..., None], 3, axis=2), seed=7, **call)
    np.testing.assert_array_equal(from_gray.latents, from_rgb.latents)
    batch = runtime(PROMPTS[0], image=rgb, num_images_per_prompt=3, seed=7, **call)
    single = runtime(PROMPTS[0], image=rgb, seed=9, **call)
    np.testing.assert_allclose(single.latents[0], batch.latents[2], atol=1e-5)


def test_bad_images_and_strengths_are_one_line_errors(exported, tmp_path, image_file):
    runtime = CairText2Image(exported("tiny-sd15", with_pipeline=True))
    rgba, palette, wide16 = tmp_path / "rgba.png", tmp_path / "palette.png", tmp_path / "deep.png"
    Image.fromarray(init_image()).convert("RGBA").save(rgba)
    Image.fromarray(init_image()).convert("P").save(palette)
    Image.fromarray(init_image()[..., 0].astype(np.uint16) * 256).save(wide16)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    odd, large = tmp_path / "odd.png", tmp_path / "large.png"
    Image.fromarray(init_image((60, 64))).save(odd)
    Image.fromarray(init_image((64, 512))).save(large)
    cases = [
        (dict(image=rgba), "image", "mode RGBA"),
        (dict(image=palette), "image", "mode P"),
        (dict(image=wide16), "image", "mode I;16"),
        (dict(image=np.dstack([init_image(), init_image()[..., :1]])), "image", "(64, 64, 4) (RGBA?)"),
        (dict(image=init_image().astype(np.float32)), "image", "dtype float32"),
        (dict(image=not_image), "image", "not an image file"),
        (dict(image=tmp_path / "missing.png"), "image", "No such file"),
        (dict(image=odd), "image", "height 60 is not a positive multiple of 8"),
        (dict(image=large), "image", "width 512 is outside"),
        (dict(image=image_file, height=128), "height", "differs from the image's 64"),
        (dict(image=image_file, strength=0.0), "strength", "(0, 1]"),
        (dict(image=image_file, strength=1.5), "strength", "(0, 1]"),
        (dict(image=image_file, strength=float("nan")), "strength", "(0, 1]"),
        (dict(image=image_file, strength=float("inf")), "strength", "(0, 1]"),
        (dict(image=image_file, strength=True), "strength", "(0, 1]"),
        (dict(image=image_file, strength=0.05), "strength", "runs no step"),
        (dict(image=image_file, strength=0.5, cache_step=6), "cache_step", "outside 1..5"),
    ]
    for kwargs, field, needle in cases:
        with pytest.raises(InvalidInputError) as caught:
            runtime(PROMPTS[0], num_inference_steps=10, **kwargs)
        message = str(caught.value)
        assert caught.value.field == field and needle in message and "\n" not in message, (kwargs, message)


def test_cli_writes_png_and_refuses_bad_input(exported, tmp_path, image_file, capsys, one_line_error):
    folder = str(exported("tiny-sd15", with_pipeline=True))
    out = tmp_path / "out.png"
    assert cair_run([folder, PROMPTS[0], "--image", str(image_file), "--strength", "0.5", "--steps", "4",
                     "--cache-step", "1", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # 2 of 4 steps run; tiny-sd15's PNDM evaluates the UNet once more (its PLMS warm-up), as diffusers does
    assert report["planning_steps"] == 1 and report["fidelity_steps"] == 2 and report["image_s"] > 0
    written = json.loads(Image.open(out).text["parameters"])
    assert written["strength"] == 0.5 and written["image"] == image_file.name and Image.open(out).size == (64, 64)

    rgba = tmp_path / "rgba.png"
    Image.fromarray(init_image()).convert("RGBA").save(rgba)
    bad = tmp_path / "bad.png"
    for flags, needles in [(["--image", str(rgba)], ("mode RGBA", "RGB")),
                           (["--image", str(tmp_path / "none.png")], ("cannot read image",)),
                           (["--image", str(image_file), "--strength", "0"], ("strength 0.0", "(0, 1]")),
                           (["--image", str(image_file), "--strength", "nan"], ("strength nan",)),
                           (["--strength", "0.5"], ("--strength is for image to image",))]:
        code = cair_run([folder, PROMPTS[0], *flags, "-o", str(bad)])
        one_line_error(code, capsys.readouterr().err, *needles, prog="cair-run: error:")
        assert not bad.exists()


def test_folder_without_encoder_loads_and_refuses_img2img(exported, tmp_path, image_file):
    folder = tmp_path / "old"
    shutil.copytree(exported("tiny-sd15", with_pipeline=True), folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["graphs"]["vae_encoder"], manifest["pipeline"]["vae_encoder_graph"]
    manifest["files"] = [f for f in manifest["files"] if f["path"] != "vae_encoder.onnx"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "vae_encoder.onnx").unlink()
    runtime = CairText2Image(folder)
    assert runtime(PROMPTS[0], num_inference_steps=2, cache_step=1).images.shape == (1, 64, 64, 3)
    with pytest.raises(ManifestError, match="has no VAE encoder .*re-export") as caught:
        runtime(PROMPTS[0], image=image_file, num_inference_steps=2)
    assert "\n" not in str(caught.value)
