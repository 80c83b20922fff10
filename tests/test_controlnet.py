"""ControlNet in the torch reference: at n = T it is diffusers' ControlNet pipelines; after n the nets'
cross-attention is cached like the UNet's.

The oracle is diffusers' ``StableDiffusion(XL)ControlNetPipeline`` over the same modules, fed the same
prompt embeddings, initial latents and control image.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from cair_export.core.controlnet import tiny_controlnet
from cair_runtime.control import ControlRequest, controlnet_keep, residual_scales
from cair_export.core.models import load_model
from cair_export.core.reference import CrossAttentionCache, cair_denoise, encode_prompts
from cair_runtime.errors import InvalidInputError

STEPS = 6
PROMPTS = ["a small red circle on a white background"]


def control_image(seed: int, size: int = 64) -> Image.Image:
    """A random RGB control map (the runtime and diffusers both take it as pixels / 255)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def setup(preset: str, nets: int):
    model = load_model(preset, with_pipeline=True)
    pipe = model.diffusers_pipeline()
    controlnets = [tiny_controlnet(pipe.unet, seed=100 + j) for j in range(nets)]
    images = [control_image(j) for j in range(nets)]
    shape = (1, pipe.unet.config.in_channels, 8, 8)
    latents = torch.from_numpy(np.random.default_rng(7).standard_normal(shape, dtype=np.float32))
    return pipe, controlnets, images, latents


def reference(pipe, controlnets, images, latents, control, cache_step=STEPS, **extra):
    embeds, negative, added, negative_added = encode_prompts(pipe, PROMPTS, None, latents)
    return cair_denoise(pipe.unet, pipe.scheduler, latents, embeds, negative, num_inference_steps=STEPS,
                        cache_step=cache_step, guidance_scale=5.0, added_cond=added,
                        negative_added_cond=negative_added, controlnets=controlnets,
                        control_images=[as_tensor(image) for image in images], control=control, **extra)


def diffusers_controlnet(pipe, controlnets, images, latents, control):
    from diffusers import (MultiControlNetModel, StableDiffusionControlNetPipeline,
                           StableDiffusionXLControlNetPipeline)

    sdxl = hasattr(pipe, "text_encoder_2")
    kind = StableDiffusionXLControlNetPipeline if sdxl else StableDiffusionControlNetPipeline
    net = controlnets[0] if len(controlnets) == 1 else MultiControlNetModel(controlnets)
    controlled = kind.from_pipe(pipe, controlnet=net)
    embeds, negative, added, negative_added = encode_prompts(pipe, PROMPTS, None, latents)
    extra = {} if added is None else {"pooled_prompt_embeds": added["text_embeds"],
                                      "negative_pooled_prompt_embeds": negative_added["text_embeds"]}
    one = len(controlnets) == 1
    return controlled(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=latents.clone(),
                      image=images[0] if one else images, num_inference_steps=STEPS, guidance_scale=5.0,
                      controlnet_conditioning_scale=control.scales[0] if one else list(control.scales),
                      control_guidance_start=control.starts[0] if one else list(control.starts),
                      control_guidance_end=control.ends[0] if one else list(control.ends),
                      guess_mode=control.guess_mode, output_type="latent", **extra).images


CASES = {
    "one net": (1, dict(scale=0.8)),
    "guess mode": (1, dict(scale=0.9, guess_mode=True)),
    "two nets with start and end": (2, dict(scale=[1.0, 0.6], start=[0.2, 0.0], end=[0.7, 0.5])),
}


# SDXL adds the nets' added conditions (text_embeds, time_ids): one net, and guess mode's halves.
@pytest.mark.parametrize("preset, case", [*(("tiny-sd15", case) for case in CASES),
                                          ("tiny-sdxl", "one net"), ("tiny-sdxl", "guess mode")])
def test_reference_at_T_is_diffusers_controlnet_pipeline(preset, case):
    nets, options = CASES[case]
    pipe, controlnets, images, latents = setup(preset, nets)
    control = ControlRequest.make(nets, **options)
    ours = reference(pipe, controlnets, images, latents, control)
    theirs = diffusers_controlnet(pipe, controlnets, images, latents, control)
    # Guess mode runs the nets on both halves here, on the conditional half alone in diffusers.
    assert relative(ours, theirs) <= (1e-5 if control.guess_mode else 1e-6)


def test_the_tiny_controlnets_are_not_vacuous():
    """Their zero convolutions are drawn at random: the control image changes the result."""
    pipe, controlnets, images, latents = setup("tiny-sd15", 1)
    on = reference(pipe, controlnets, images, latents, ControlRequest.make(1, scale=1.0))
    off = reference(pipe, controlnets, images, latents, ControlRequest.make(1, scale=0.0))
    other = reference(pipe, controlnets, [control_image(9)], latents, ControlRequest.make(1, scale=1.0))
    plain = reference(pipe, [], [], latents, None)
    assert relative(on, off) > 1e-2 and relative(on, other) > 1e-2
    torch.testing.assert_close(off, plain, rtol=0, atol=1e-6)  # scale 0: the UNet alone


def test_after_n_the_nets_cross_attention_is_cached():
    pipe, controlnets, images, latents = setup("tiny-sd15", 2)
    unet_names = [site.name for site in CrossAttentionCache(pipe.unet).sites]
    cache = CrossAttentionCache(pipe.unet, controlnets=controlnets)
    names = [site.name for site in cache.sites]
    assert names[:len(unet_names)] == unet_names  # the UNet's caches keep their names and order
    assert names[len(unet_names)] == "control0_cache_000" and names[-1].startswith("control1_cache_")
    calls = []
    hooks = [module.register_forward_hook(lambda *args: calls.append(1))
             for net in controlnets for path, module in net.named_modules() if path.endswith("attn2.to_k")]
    try:
        cached = reference(pipe, controlnets, images, latents, ControlRequest.make(2), cache_step=2)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == 2 * len(hooks)  # the text projections run on the 2 planning steps only
    full = reference(pipe, controlnets, images, latents, ControlRequest.make(2))
    assert 0 < relative(cached, full) < 1  # cached after n: close to, not equal to, the full loop
    per_half = reference(pipe, controlnets, images, latents, ControlRequest.make(2), cache_step=2,
                         fidelity_guidance="cfg", guidance_stop=4)
    assert relative(per_half, cached) > 0


@pytest.mark.parametrize("guess_mode", [False, True])
def test_residual_scales_reproduce_the_nets_own_scaling(guess_mode):
    """What the exported graphs will do: run each net at scale 1 and multiply residual r of row b by
    ``residual_scales``; equal to diffusers' conditioning scale and guess mode, halves included."""
    from cair_export.core.controlnet import control_residuals

    pipe, controlnets, images, latents = setup("tiny-sd15", 2)
    request = ControlRequest.make(2, scale=[0.7, 1.3], end=[1.0, 0.4], guess_mode=guess_mode)
    keep = controlnet_keep(STEPS, request.starts, request.ends)[3]  # net 1 is off at step 3
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 768)
    images = [as_tensor(image) for image in images]
    expected = control_residuals(controlnets, images, request, keep, sample, 500, context, None, guided=True)
    down, mid = None, None
    for j, (net, image) in enumerate(zip(controlnets, images)):
        samples, middle = net(sample, 500, encoder_hidden_states=context, controlnet_cond=image.repeat(2, 1, 1, 1),
                              return_dict=False)
        factors = torch.from_numpy(residual_scales(keep, request, len(samples) + 1, 2, guided=True))[:, j]
        samples = [s * factors[:, r].view(-1, 1, 1, 1) for r, s in enumerate(samples)]
        middle = middle * factors[:, -1].view(-1, 1, 1, 1)
        down = samples if down is None else [a + b for a, b in zip(down, samples)]
        mid = middle if mid is None else mid + middle
    for ours, theirs in zip([*down, mid], [*expected[0], expected[1]]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_controlnet_keep_is_diffusers_formula():
    keep = controlnet_keep(10, [0.2, 0.0], [0.7, 1.0])
    assert [row[0] for row in keep] == [0, 0, 1, 1, 1, 1, 1, 0, 0, 0]
    assert all(row[1] == 1 for row in keep)


@pytest.mark.parametrize("options, needle", [
    (dict(scale=[1.0, 2.0, 3.0]), "3 control_scale values for 2 ControlNets"),
    (dict(start=0.5, end=0.5), "need 0 <= start < end <= 1"),
    (dict(end=1.5), "need 0 <= start < end <= 1"),
])
def test_bad_control_requests_are_one_line(options, needle):
    with pytest.raises(InvalidInputError, match=needle):
        ControlRequest.make(2, **options)


def test_bad_control_inputs_to_the_reference():
    pipe, controlnets, images, latents = setup("tiny-sd15", 2)
    with pytest.raises(InvalidInputError, match="1 control images for 2 ControlNets"):
        reference(pipe, controlnets, images[:1], latents, None)
    with pytest.raises(InvalidInputError, match="does not take ControlNets yet"):
        reference(pipe, controlnets, images, latents, None, cache_step=2, deep_interval=2, deep_branch_id=0)


# --- the exported graphs (ControlNets fused with the UNet) and the runtime --------------------------------

NETS = {"tiny-sd15": ("tiny:100", "tiny:101"), "tiny-sdxl": ("tiny:100",)}


def runtime_case(exported, preset):
    """The engine of ``preset`` with its ControlNets, the same nets in torch, embeddings, noise, images."""
    from cair_runtime.pipeline import CairEngine

    from cair_export.core.controlnet import load_controlnet

    engine = CairEngine(exported(preset, with_pipeline=True, controlnets=NETS[preset], validate=False))
    pipe = load_model(preset, with_pipeline=True).diffusers_pipeline()
    controlnets = [load_controlnet(spec, pipe.unet) for spec in NETS[preset]]
    images = [control_image(j) for j in range(len(controlnets))]
    latents = torch.from_numpy(np.random.default_rng(7).standard_normal((1, 4, 8, 8), dtype=np.float32))
    return engine, pipe, controlnets, images, latents


def runtime_run(engine, pipe, images, latents, control, cache_step, **schedule):
    with torch.no_grad():
        embeds, negative, added, negative_added = encode_prompts(pipe, PROMPTS, None, latents)
    extra = {} if added is None else {"text_embeds": added["text_embeds"].numpy(),
                                      "negative_text_embeds": negative_added["text_embeds"].numpy()}
    return engine.denoise(embeds.numpy(), negative.numpy(), latents=latents.numpy(), num_inference_steps=STEPS,
                          cache_step=cache_step, guidance_scale=5.0, scheduler="ddim",
                          control_images=[as_tensor(image).numpy() for image in images], control=control,
                          **schedule, **extra).latents


@pytest.mark.parametrize("preset", list(NETS))
def test_runtime_equals_diffusers_at_T_and_the_reference_below(exported, preset):
    from diffusers import DDIMScheduler

    engine, pipe, controlnets, images, latents = runtime_case(exported, preset)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    count = len(controlnets)
    full = ControlRequest.make(count, scale=[0.8, 1.2][:count], start=[0.0, 0.2][:count], end=[1.0, 0.7][:count])
    ours = runtime_run(engine, pipe, images, latents, full, STEPS)
    theirs = diffusers_controlnet(pipe, controlnets, images, latents, full)
    assert relative(torch.from_numpy(ours), theirs) <= 1e-4
    for control, schedule in ((full, {}), (ControlRequest.make(count, scale=0.9, guess_mode=True), {}),
                              (full, {"guidance_stop": 4})):
        ours = runtime_run(engine, pipe, images, latents, control, 2, **schedule)
        expected = reference(pipe, controlnets, images, latents, control, cache_step=2, fidelity_guidance="cfg",
                             **schedule)
        assert relative(torch.from_numpy(ours), expected) <= 1e-4, (control, schedule)


def test_fidelity_graph_holds_no_controlnet_cross_attention_weights(exported):
    import hashlib

    import onnx

    folder = exported("tiny-sd15", with_pipeline=True, controlnets=NETS["tiny-sd15"], validate=False)

    def digests(name):
        graph = onnx.load(str(folder / name), load_external_data=False)
        return graph, {hashlib.sha256(onnx.numpy_helper.to_array(t, base_dir=str(folder)).astype(np.float32)
                                      .tobytes()).hexdigest() for t in graph.graph.initializer}

    def weight_digests(weight):  # Linear weights may be stored transposed (MatMul)
        array = weight.detach().numpy()
        return {hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in (array, array.T)}

    planning, in_planning = digests("planning.onnx")
    fidelity, in_fidelity = digests("fidelity.onnx")
    from cair_export.core.controlnet import load_controlnet

    unet = load_model("tiny-sd15").unet
    for spec in NETS["tiny-sd15"]:
        net = load_controlnet(spec, unet)
        cross = [p for name, p in net.named_parameters() if ".attn2." in name and name.endswith("weight")]
        assert cross and all(weight_digests(w) & in_planning and not weight_digests(w) & in_fidelity for w in cross)
        # The rest of the net still runs after n: its zero convolutions are in both graphs.
        assert weight_digests(net.controlnet_down_blocks[0].weight) & in_fidelity
    inputs = [i.name for i in fidelity.graph.input]
    assert "encoder_hidden_states" not in inputs and {"control_image_0", "control_image_1", "control_scales"} <= set(inputs)
    assert any(i.name == "control0_cache_000" for i in fidelity.graph.input)


def test_bad_control_inputs_to_the_runtime(exported):
    from cair_runtime.errors import ShapeError

    engine, pipe, controlnets, images, latents = runtime_case(exported, "tiny-sd15")
    embeds = np.zeros((1, 77, 768), np.float32)
    image = as_tensor(images[0]).numpy()
    run = dict(latents=latents.numpy(), num_inference_steps=2, cache_step=1)
    with pytest.raises(InvalidInputError, match="1 control images for the engine's 2 ControlNet"):
        engine.denoise(embeds, control_images=[image], **run)
    with pytest.raises(InvalidInputError, match="0 control images"):
        engine.denoise(embeds, **run)
    with pytest.raises(ShapeError, match=r"expected \(1, 3, 64, 64\)"):
        engine.denoise(embeds, control_images=[image, image[:, :, :32]], **run)
    with pytest.raises(InvalidInputError, match="ControlNets; the engine has 2"):
        engine.denoise(embeds, control_images=[image, image], control=ControlRequest.make(1), **run)
    from cair_runtime.pipeline import CairEngine

    plain = CairEngine(exported("tiny-sd15", with_pipeline=True))
    with pytest.raises(InvalidInputError, match="exported without a ControlNet"):
        plain.denoise(embeds, control_images=[image], **run)


def test_a_diffusers_controlnet_folder_exports_like_the_module(tmp_path, capsys, one_line_error):
    """A ControlNetModel saved by diffusers (safetensors) is read as such; pickled weights are refused."""
    from cair_export.cli import main as cair_export
    from cair_export.core.controlnet import load_controlnet
    from cair_export.core.export import ExportConfig, export_model
    from cair_runtime.pipeline import CairEngine

    model = load_model("tiny-sd15", with_pipeline=True)
    load_controlnet("tiny:100", model.unet).save_pretrained(tmp_path / "net", safe_serialization=True)
    export_model(model, tmp_path / "engine", ExportConfig(controlnets=(str(tmp_path / "net"),), validate=False),
                 progress=lambda message: None)
    from diffusers import DDIMScheduler

    pipe = model.diffusers_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the runtime runs "ddim" below
    _, _, images, latents = setup("tiny-sd15", 1)
    control = ControlRequest.make(1, scale=1.1)
    ours = runtime_run(CairEngine(tmp_path / "engine"), pipe, images, latents, control, 2)
    expected = reference(pipe, [load_controlnet("tiny:100", pipe.unet)], images, latents, control, cache_step=2,
                         fidelity_guidance="cfg")
    assert relative(torch.from_numpy(ours), expected) <= 1e-4

    (tmp_path / "net" / "diffusion_pytorch_model.safetensors").rename(tmp_path / "net" / "diffusion_pytorch_model.bin")
    capsys.readouterr()  # what loading the models above logged
    code = cair_export(["export", "tiny-sd15", str(tmp_path / "other"), "--controlnet", str(tmp_path / "net")])
    one_line_error(code, capsys.readouterr().err, "no .safetensors weights", "safetensors only")
    assert not (tmp_path / "other").exists()


# --- text to image with control images: the Python API and cair-run ----------------------------------------


def test_text_to_image_with_control_images_is_diffusers_pipeline(exported, tmp_path):
    """Prompts, control maps from PNG files, VAE: at n = T the images are diffusers' ControlNet pipeline's."""
    from diffusers import DDIMScheduler, MultiControlNetModel, StableDiffusionControlNetPipeline

    from cair_export.core.controlnet import load_controlnet
    from cair_runtime.text2image import CairText2Image

    folder = exported("tiny-sd15", with_pipeline=True, controlnets=NETS["tiny-sd15"], validate=False)
    paths = []
    for j in range(2):
        control_image(j).save(tmp_path / f"control{j}.png")
        paths.append(tmp_path / f"control{j}.png")
    result = CairText2Image(folder)(PROMPTS, num_inference_steps=STEPS, cache_step=STEPS, guidance_scale=5.0,
                                     seed=3, scheduler="ddim", control_image=paths, control_scale=[0.8, 1.2],
                                     control_guidance_end=[1.0, 0.5])
    assert result.parameters[0]["control"] == {"images": ["control0.png", "control1.png"], "scale": [0.8, 1.2],
                                               "start": [0.0, 0.0], "end": [1.0, 0.5], "guess_mode": False}
    pipe = load_model("tiny-sd15", with_pipeline=True).diffusers_pipeline()
    nets = MultiControlNetModel([load_controlnet(spec, pipe.unet) for spec in NETS["tiny-sd15"]])
    controlled = StableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=nets)
    controlled.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    noise = torch.from_numpy(np.random.default_rng(3).standard_normal((1, 4, 8, 8), dtype=np.float32))
    expected = controlled(PROMPTS, image=[control_image(0), control_image(1)], latents=noise,
                          num_inference_steps=STEPS, guidance_scale=5.0, controlnet_conditioning_scale=[0.8, 1.2],
                          control_guidance_end=[1.0, 0.5], output_type="np").images  # (N, H, W, 3) in [0, 1]
    assert np.abs(result.decoded.transpose(0, 2, 3, 1) - expected).max() <= 1e-3


def test_cair_run_with_control_images_replays_and_refuses_bad_ones(exported, tmp_path, capsys, one_line_error,
                                                                   replay):
    from cair_runtime.cli import main as cair_run

    folder = str(exported("tiny-sd15", with_pipeline=True, controlnets=NETS["tiny-sd15"], validate=False))
    for j in range(2):
        control_image(j).save(tmp_path / f"c{j}.png")
    control = ["--control-image", str(tmp_path / "c0.png"), "--control-image", str(tmp_path / "c1.png")]
    out = tmp_path / "out.png"
    assert cair_run([folder, "a red circle", "-o", str(out), "--steps", "3", "--cache-step", "1",
                     "--control-scale", "0.7", "--guess-mode", *control]) == 0, capsys.readouterr().err
    code, err = replay(folder, out, tmp_path / "again.png", *control, "--control-scale", "0.7", "--guess-mode")
    assert code == 0, err
    assert (tmp_path / "again.png").read_bytes() == out.read_bytes()

    control_image(0, size=32).save(tmp_path / "small.png")
    cases = [([], "0 control images for the engine's 2 ControlNet(s)"),
             (["--control-image", str(tmp_path / "c0.png"), "--control-image", str(tmp_path / "small.png")],
              "small.png is 32x32 px; the output is 64x64"),
             ([*control, "--control-scale", "1", "--control-scale", "2", "--control-scale", "3"],
              "3 control_scale values for 2 ControlNets"),
             ([*control, "--control-guidance-start", "0.9", "--control-guidance-end", "0.2"], "start < end"),
             (["--control-image", str(tmp_path / "missing.png"), *control[2:]], "missing.png")]
    for extra, needle in cases:
        code = cair_run([folder, "a red circle", "-o", str(tmp_path / "bad.png"), "--steps", "2", *extra])
        one_line_error(code, capsys.readouterr().err, needle)
    plain = str(exported("tiny-sd15", with_pipeline=True))
    code = cair_run([plain, "a red circle", "-o", str(tmp_path / "bad.png"), *control])
    one_line_error(code, capsys.readouterr().err, "exported without a ControlNet")
    assert not (tmp_path / "bad.png").exists()
