"""The torch reference CAIR against diffusers' own pipelines and T-GATE's definition."""

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline)

from cair_export.core.models import load_model
from cair_export.core.reference import CrossAttentionCache, cair_denoise, cross_attention_sites

SCHEDULERS = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler,
              "EulerDiscreteScheduler": EulerDiscreteScheduler}


def _inputs(model, batch=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = model.unet.config.cross_attention_dim
    tensors = {
        "latents": torch.randn(batch, 4, 8, 8, generator=generator),
        "prompt_embeds": torch.randn(batch, 77, width, generator=generator),
        "negative_prompt_embeds": torch.randn(batch, 77, width, generator=generator),
    }
    if model.added_conditions:
        tensors["pooled"] = torch.randn(batch, 1280, generator=generator)
        tensors["negative_pooled"] = torch.randn(batch, 1280, generator=generator)
    return tensors


def _scheduler(model):
    return SCHEDULERS[model.scheduler_config["_class_name"]].from_config(model.scheduler_config)


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sd21"])
def test_cache_step_T_is_the_diffusers_pipeline(preset):
    model = load_model(preset)
    x = _inputs(model, batch=2)
    steps = 8
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=model.unet,
                                   scheduler=_scheduler(model), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt_embeds=x["prompt_embeds"], negative_prompt_embeds=x["negative_prompt_embeds"],
                    latents=x["latents"], num_inference_steps=steps, guidance_scale=6.0,
                    output_type="latent", height=64, width=64).images
    actual = cair_denoise(model.unet, _scheduler(model), x["latents"], x["prompt_embeds"],
                          x["negative_prompt_embeds"], num_inference_steps=steps, cache_step=steps,
                          guidance_scale=6.0)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_cache_step_T_is_the_sdxl_pipeline():
    model = load_model("tiny-sdxl")
    x = _inputs(model)
    steps = 6
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=model.unet, scheduler=_scheduler(model))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt_embeds=x["prompt_embeds"], negative_prompt_embeds=x["negative_prompt_embeds"],
                    pooled_prompt_embeds=x["pooled"], negative_pooled_prompt_embeds=x["negative_pooled"],
                    latents=x["latents"], num_inference_steps=steps, guidance_scale=5.0,
                    output_type="latent", height=64, width=64).images
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    actual = cair_denoise(model.unet, _scheduler(model), x["latents"], x["prompt_embeds"],
                          x["negative_prompt_embeds"], num_inference_steps=steps, cache_step=steps,
                          guidance_scale=5.0, added_cond={"text_embeds": x["pooled"], "time_ids": time_ids},
                          negative_added_cond={"text_embeds": x["negative_pooled"], "time_ids": time_ids})
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def _attn2_modules(unet):
    return {site.module: unet.get_submodule(site.module) for site in cross_attention_sites(unet)}


def test_recorded_cache_is_the_cfg_mean_of_attn2_outputs():
    """T-GATE: cache = (uncond + cond) / 2 of each attn2 output at step n, after to_out."""
    model = load_model("tiny-sd21")
    unet = model.unet
    x = _inputs(model)
    seen = {}
    hooks = [module.register_forward_hook(lambda mod, args, out, path=path: seen.__setitem__(path, out))
             for path, module in _attn2_modules(unet).items()]
    sample = torch.cat([x["latents"]] * 2)
    context = torch.cat([x["negative_prompt_embeds"], x["prompt_embeds"]])
    with torch.no_grad(), CrossAttentionCache(unet) as cache:
        cache.mode = "record"
        unet(sample, torch.tensor(500.0), context)
        recorded = list(cache.values)
        sites = cache.sites
    for hook in hooks:
        hook.remove()
    assert len(recorded) == len(sites) == 7
    for site, value in zip(sites, recorded):
        uncond, cond = seen[site.module].chunk(2)
        torch.testing.assert_close(value, (uncond + cond) / 2, rtol=0, atol=0)
        assert value.shape == (1, 64 // 4 ** site.level, site.channels)


def test_replay_skips_cross_attention_and_injects_the_cache():
    """Replay equals the UNet whose attn2 outputs are overwritten by the cache; no projection runs."""
    model = load_model("tiny-sdxl")
    unet = model.unet
    x = _inputs(model)
    added = {"text_embeds": x["negative_pooled"], "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    modules = _attn2_modules(unet)
    sites = cross_attention_sites(unet)
    caches = [torch.randn(1, 64 // 4 ** s.level, s.channels, generator=torch.Generator().manual_seed(i))
              for i, s in enumerate(sites)]
    # Oracle: plain UNet with forward hooks replacing each attn2 output.
    hooks = [modules[s.module].register_forward_hook(lambda mod, args, out, c=c: c) for s, c in zip(sites, caches)]
    dummy_context = torch.zeros(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        expected = unet(x["latents"], torch.tensor(300.0), dummy_context, added_cond_kwargs=added).sample
    for hook in hooks:
        hook.remove()
    calls = []
    hooks = [module.to_q.register_forward_hook(lambda *a: calls.append(1)) for module in modules.values()]
    with torch.no_grad(), CrossAttentionCache(unet) as cache:
        cache.mode, cache.values = "replay", caches
        actual = unet(x["latents"], torch.tensor(300.0), None, added_cond_kwargs=added).sample
    for hook in hooks:
        hook.remove()
    assert calls == []
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_cache_processors_are_removed_afterwards():
    unet = load_model("tiny-sd15").unet
    before = {path: type(p).__name__ for path, p in unet.attn_processors.items()}
    with CrossAttentionCache(unet):
        assert any("Caching" in type(p).__name__ for p in unet.attn_processors.values())
    assert {path: type(p).__name__ for path, p in unet.attn_processors.items()} == before


def test_cair_changes_the_result_only_after_step_n():
    """n < T differs from the baseline; and a smaller n moves further from it (sanity of the switch)."""
    model = load_model("tiny-sd21")
    x = _inputs(model)
    run = lambda n: cair_denoise(model.unet, _scheduler(model), x["latents"], x["prompt_embeds"],
                                 x["negative_prompt_embeds"], num_inference_steps=6, cache_step=n,
                                 guidance_scale=5.0).numpy()
    baseline, late, early = run(6), run(5), run(1)
    assert not np.allclose(late, baseline)
    assert np.abs(early - baseline).max() > np.abs(late - baseline).max()
