"""IP-Adapter: at n = T the runtime is diffusers' IP-Adapter pipeline; after n the cached cross-attention
carries the image prompt, so fidelity needs neither the image embedding nor the adapter's K/V.

The oracles: diffusers' ``load_ip_adapter`` (the loader), transformers' ``CLIPImageProcessorPil`` (the
preprocessing), diffusers' StableDiffusion(XL)Pipeline with ``ip_adapter_image`` (end to end, its own
feature extractor and image encoder), and the torch reference loop below T.
"""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from cair_export.core.ip_adapter import (clip_processor_spec, load_ip_adapter, read_ip_adapter, tiny_image_encoder,
                                         tiny_ip_adapter_state)
from cair_export.core.models import load_model
from cair_export.core.reference import cair_denoise, encode_prompts
from cair_runtime.errors import InvalidInputError
from cair_runtime.images import clip_pixels

STEPS = 6
PROMPTS = ["a small red circle on a white background"]
SCALE = 0.6
# At guidance 5 the tiny SDXL UNet amplifies fp32 rounding until diffusers itself sits ~5e-5 from float64,
# so two fp32 paths can differ by 1e-4; at 3 both stay within ~3e-5 and the 1e-4 bound tests the adapter.
GUIDANCE = 3.0


def image_prompt(seed: int, size=(40, 56)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def write_adapter(path, state) -> None:
    save_file({f"{group}.{name}": value.contiguous() for group, part in state.items() for name, value in part.items()},
              str(path))


def test_loader_equals_diffusers_load_ip_adapter(tmp_path):
    """read_ip_adapter + the UNet's own loader give what diffusers' IPAdapterMixin.load_ip_adapter gives."""
    base = load_model("tiny-sd15", with_pipeline=True)
    encoder, _ = tiny_image_encoder(1)
    write_adapter(tmp_path / "tiny.safetensors", tiny_ip_adapter_state(base.unet, 32, seed=5))
    ours = load_model("tiny-sd15").unet
    ours._load_ip_adapter_weights([read_ip_adapter(tmp_path / "tiny.safetensors")])
    pipe = base.diffusers_pipeline()
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="tiny.safetensors", image_encoder_folder=None)
    theirs = dict(pipe.unet.named_parameters())
    mine = dict(ours.named_parameters())
    adapter = [name for name in theirs if "to_k_ip" in name or "to_v_ip" in name or "encoder_hid_proj" in name]
    assert len(adapter) > 4 and set(mine) == set(theirs)
    assert all(torch.equal(mine[name], theirs[name]) for name in adapter)


@pytest.mark.parametrize("size", [(32, 32), (45, 70), (300, 200)])
def test_clip_pixels_are_transformers_clip_preprocessing(size):
    image = image_prompt(2, size)
    for edge in (32, 224):
        expected = CLIPImageProcessorPil(size={"shortest_edge": edge}, crop_size=edge)(image, return_tensors="np")
        ours = clip_pixels(image, clip_processor_spec({"size": {"shortest_edge": edge}, "crop_size": edge}))
        np.testing.assert_allclose(ours, expected.pixel_values[0], atol=1e-6)


def diffusers_ip_pipeline(preset: str, scale: float):
    """diffusers' pipeline with the tiny adapter loaded as load_ip_adapter would, its feature extractor and encoder."""
    from diffusers import DDIMScheduler

    model = load_model(preset, with_pipeline=True)
    adapter = load_ip_adapter("tiny", model.unet)
    pipe = model.diffusers_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.image_encoder = adapter.image_encoder
    processor = adapter.image_processor
    pipe.feature_extractor = CLIPImageProcessorPil(size={"shortest_edge": processor["shortest_edge"]},
                                                   crop_size=processor["crop_size"][0])
    pipe.set_ip_adapter_scale(scale)
    return pipe, adapter


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
def test_runtime_equals_diffusers_at_T_and_the_reference_below(exported, preset):
    from cair_runtime.text2image import CairText2Image

    folder = exported(preset, with_pipeline=True, ip_adapter="tiny", validate=False, max_prompt_chunks=1)
    runtime = CairText2Image(folder)
    image = image_prompt(0)
    noise = np.random.default_rng(3).standard_normal((1, 4, 8, 8), dtype=np.float32)
    run = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, scheduler="ddim", latents=noise)
    pipe, adapter = diffusers_ip_pipeline(preset, SCALE)
    with torch.no_grad():
        expected = pipe(PROMPTS, ip_adapter_image=Image.fromarray(image), latents=torch.from_numpy(noise),
                        num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent").images
    ours = runtime(PROMPTS, cache_step=STEPS, ip_adapter_image=image, ip_adapter_scale=SCALE, **run)
    assert ours.parameters[0]["ip_adapter"] == {"image": "array", "scale": SCALE}
    assert np.abs(ours.latents - expected.numpy()).max() <= 1e-4 * np.abs(expected.numpy()).max()

    # Below T, against the reference loop (fidelity CFG up to m, then the mean of the halves).
    latents = torch.from_numpy(noise)
    with torch.no_grad():
        embeds, negative, added, negative_added = encode_prompts(pipe, PROMPTS, None, latents)
        image_embeds = adapter.image_encoder(torch.from_numpy(clip_pixels(image, adapter.image_processor))[None])
    for n, m in ((2, 2), (2, 4)):
        ours = runtime(PROMPTS, cache_step=n, guidance_stop=m, ip_adapter_image=image, ip_adapter_scale=SCALE, **run)
        with torch.no_grad():
            reference = cair_denoise(pipe.unet, pipe.scheduler, latents, embeds, negative, num_inference_steps=STEPS,
                                     cache_step=n, guidance_stop=m, guidance_scale=GUIDANCE, added_cond=added,
                                     negative_added_cond=negative_added, fidelity_guidance="cfg",
                                     ip_image_embeds=image_embeds.image_embeds, ip_adapter_scale=SCALE).numpy()
        assert np.abs(ours.latents - reference).max() <= 1e-4 * np.abs(reference).max(), (n, m)

    # Without an image prompt the folder runs as the plain model: diffusers at scale 0; the adapter acts.
    plain = runtime(PROMPTS, cache_step=STEPS, **run).latents
    pipe.set_ip_adapter_scale(0.0)
    with torch.no_grad():
        expected = pipe(PROMPTS, ip_adapter_image=Image.fromarray(image), latents=torch.from_numpy(noise),
                        num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent").images.numpy()
    assert np.abs(plain - expected).max() <= 1e-4 * np.abs(expected).max()
    assert np.abs(plain - ours.latents).max() > 1e-2 * np.abs(plain).max()


def test_fidelity_graph_is_the_plain_models(exported):
    """No IP-Adapter weight (K/V, projection) in fidelity; every one in planning; fidelity's weights are
    exactly the plain export's, and it reads no image input."""
    import onnx

    def digests(folder, name):
        graph = onnx.load(str(folder / name), load_external_data=False)
        return graph, {hashlib.sha256(onnx.numpy_helper.to_array(t, base_dir=str(folder)).astype(np.float32)
                                      .tobytes()).hexdigest() for t in graph.graph.initializer}

    def weight_digests(weight):  # Linear weights may be stored transposed (MatMul)
        array = weight.detach().numpy()
        return {hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in (array, array.T)}

    folder = exported("tiny-sd15", with_pipeline=True, ip_adapter="tiny", validate=False, max_prompt_chunks=1)
    plain_folder = exported("tiny-sd15", with_pipeline=True)
    _, in_planning = digests(folder, "planning.onnx")
    fidelity, in_fidelity = digests(folder, "fidelity.onnx")
    _, in_plain_fidelity = digests(plain_folder, "fidelity.onnx")
    unet = load_model("tiny-sd15").unet
    load_ip_adapter("tiny", unet)
    weights = [p for name, p in unet.named_parameters() if "_ip." in name or "encoder_hid_proj" in name]
    assert len(weights) > 4
    assert all(weight_digests(w) & in_planning and not weight_digests(w) & in_fidelity for w in weights)
    assert in_fidelity == in_plain_fidelity
    assert not any(i.name.startswith("ip_") or i.name == "encoder_hidden_states" for i in fidelity.graph.input)


def test_cair_run_with_an_image_prompt_replays_and_refuses_bad_ones(exported, tmp_path, capsys, one_line_error,
                                                                    replay):
    from cair_runtime.cli import main as cair_run

    folder = str(exported("tiny-sd15", with_pipeline=True, ip_adapter="tiny", validate=False, max_prompt_chunks=1))
    Image.fromarray(image_prompt(1)).save(tmp_path / "style.png")
    out = tmp_path / "out.png"
    prompt = ["--ip-adapter-image", str(tmp_path / "style.png")]
    assert cair_run([folder, "a red circle", "-o", str(out), "--steps", "3", "--cache-step", "1",
                     "--ip-adapter-scale", "0.7", *prompt]) == 0, capsys.readouterr().err
    code, err = replay(folder, out, tmp_path / "again.png", *prompt, "--ip-adapter-scale", "0.7")
    assert code == 0, err
    assert (tmp_path / "again.png").read_bytes() == out.read_bytes()

    Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(tmp_path / "rgba.png")
    cases = [(["--ip-adapter-image", str(tmp_path / "rgba.png")], "mode RGBA"),
             (["--ip-adapter-image", str(tmp_path / "missing.png")], "missing.png"),
             (["--ip-adapter-scale", "0.5"], "give --ip-adapter-image too"),
             ([*prompt, "--ip-adapter-scale", "nan"], "IP-Adapter scale nan must be a finite number")]
    for extra, needle in cases:
        code = cair_run([folder, "a red circle", "-o", str(tmp_path / "bad.png"), "--steps", "2", *extra])
        one_line_error(code, capsys.readouterr().err, needle)
    plain = str(exported("tiny-sd15", with_pipeline=True))
    code = cair_run([plain, "a red circle", "-o", str(tmp_path / "bad.png"), *prompt])
    one_line_error(code, capsys.readouterr().err, "exported without an IP-Adapter")
    assert not (tmp_path / "bad.png").exists()
    from cair_export.cli import main as cair_export

    one_line_error(cair_export(["build", folder, "--backend", "aoti"]), capsys.readouterr().err,
                   "AOTInductor packages do not take yet")


def test_bad_adapters_are_one_line_at_export(tmp_path, capsys, one_line_error):
    from cair_export.cli import main as cair_export

    unet = load_model("tiny-sd15").unet
    state = tiny_ip_adapter_state(unet, 32, seed=0)
    write_adapter(tmp_path / "ok.safetensors", state)
    torch.save(state, tmp_path / "adapter.bin")
    (tmp_path / "truncated.safetensors").write_bytes((tmp_path / "ok.safetensors").read_bytes()[:200])
    write_adapter(tmp_path / "plus.safetensors", {"image_proj": {"latents": torch.zeros(1, 16, 8)},
                                                  "ip_adapter": state["ip_adapter"]})
    write_adapter(tmp_path / "sdxl.safetensors", tiny_ip_adapter_state(load_model("tiny-sdxl").unet, 32, seed=0))
    encoder, _ = tiny_image_encoder(1)
    encoder.save_pretrained(tmp_path / "image_encoder", safe_serialization=True)
    cases = [(["--ip-adapter", str(tmp_path / "adapter.bin")], "is a pickle", "safetensors only"),
             (["--ip-adapter", str(tmp_path / "missing.safetensors")], "does not exist"),
             (["--ip-adapter", str(tmp_path / "truncated.safetensors")], "truncated or not safetensors"),
             (["--ip-adapter", str(tmp_path / "plus.safetensors")], "IP-Adapter Plus", "only plain IP-Adapters"),
             (["--ip-adapter", str(tmp_path / "sdxl.safetensors")], "trained for another model"),
             (["--image-encoder", str(tmp_path / "image_encoder")], "give --ip-adapter too"),
             (["--ip-adapter", "tiny", "--controlnet", "tiny"], "not supported yet")]
    for extra, *needles in cases:
        capsys.readouterr()
        code = cair_export(["export", "tiny-sd15", str(tmp_path / "out"), *extra])
        one_line_error(code, capsys.readouterr().err, *needles)
        assert not (tmp_path / "out").exists()
    with pytest.raises(InvalidInputError, match="no image encoder"):
        load_ip_adapter(str(tmp_path / "ok.safetensors"), unet, image_encoder=str(tmp_path / "nowhere"))


def test_an_adapter_file_and_encoder_folder_export_like_the_modules(exported, tmp_path):
    """The release layout (adapter.safetensors, image_encoder/ beside it) gives the same images as the same
    weights built in memory."""
    from cair_export.core.export import ExportConfig, export_model
    from cair_runtime.text2image import CairText2Image

    model = load_model("tiny-sd15", with_pipeline=True)
    write_adapter(tmp_path / "adapter.safetensors", tiny_ip_adapter_state(model.unet, 32, seed=200))
    tiny_image_encoder(201)[0].save_pretrained(tmp_path / "image_encoder", safe_serialization=True)
    export_model(model, tmp_path / "engine", ExportConfig(ip_adapter=str(tmp_path / "adapter.safetensors"),
                                                          validate=False, max_prompt_chunks=1),
                 progress=lambda message: None)
    run = dict(num_inference_steps=3, cache_step=1, ip_adapter_image=image_prompt(4), seed=1)
    ours = CairText2Image(tmp_path / "engine")(PROMPTS, **run)
    built = CairText2Image(exported("tiny-sd15", with_pipeline=True, ip_adapter="tiny", validate=False,
                                    max_prompt_chunks=1))(PROMPTS, **run)
    np.testing.assert_array_equal(ours.latents, built.latents)
