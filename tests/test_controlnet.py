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
    "two nets": (2, dict(scale=[0.7, 1.3])),
    "guess mode": (1, dict(scale=0.9, guess_mode=True)),
    "start and end": (2, dict(scale=[1.0, 0.6], start=[0.2, 0.0], end=[0.7, 0.5])),
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
