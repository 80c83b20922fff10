"""Deep-feature caching (DeepCache's cut on top of CAIR's) in torch, against DeepCache's own code (PyPI ``DeepCache`` 0.1.1).

The oracle is DeepCache's ``DeepCacheSDHelper``, which caches module outputs of a plain diffusers
UNet; its pipeline module does not import with today's diffusers, so its non-uniform schedule
function is read from its source file. Without the package these tests skip with the reason.
"""

import ast
import types

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from cair_export.core.deep_feature import deep_branch, recorded_deep_feature, shallow_unet
from cair_export.core.models import load_model
from cair_export.core.reference import cair_denoise
from cair_runtime.errors import InvalidInputError
from cair_runtime.schedule import evaluation_plan, full_evaluations

deepcache = pytest.importorskip("DeepCache", reason="the peer's own code: pip install --no-deps DeepCache==0.1.1")


def _helper(unet, timesteps, interval, branch):
    helper = deepcache.DeepCacheSDHelper(pipe=types.SimpleNamespace(unet=unet,
                                                                    scheduler=types.SimpleNamespace(timesteps=timesteps)))
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    return helper


@pytest.mark.parametrize("preset, branches", [("tiny-sd15", (0, 1, 3, 4, 6, 7)), ("tiny-sdxl", (1, 3))])
def test_shallow_evaluation_is_deepcaches_skip_step(preset, branches):
    """Full step at t0 then a skip step at t1 through DeepCache's helper == full + our shallow evaluation.

    At a latent size that is no multiple of the upsampling factor (explicit upsample sizes), batch 2;
    every branch of the tiny SD-1.5 UNet (its up blocks have 2 layers: b % 3 < 2), two of SDXL's.
    """
    model = load_model(preset)
    unet = model.unet
    generator = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(2, 4, 9, 7, generator=generator), torch.randn(2, 4, 9, 7, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    added = None
    if model.added_conditions:
        added = {"text_embeds": torch.randn(2, 1280, generator=generator),
                 "time_ids": torch.tensor([[64.0, 56, 0, 0, 64, 56]] * 2)}
    timesteps = torch.tensor([900, 700])
    for branch_id in branches:
        branch = deep_branch(unet, branch_id)
        helper = _helper(unet, timesteps, 2, branch_id)
        with torch.no_grad():
            helper.enable()
            try:
                unet(x0, timesteps[0], context, added_cond_kwargs=added, return_dict=False)
                expected = unet(x1, timesteps[1], context, added_cond_kwargs=added, return_dict=False)[0]
            finally:
                helper.disable()
            with recorded_deep_feature(unet, branch) as recorded:
                unet(x0, timesteps[0], context, added_cond_kwargs=added, return_dict=False)
            actual = shallow_unet(unet, branch, x1, timesteps[1], recorded[0], context, added)
            full = unet(x1, timesteps[1], context, added_cond_kwargs=added, return_dict=False)[0]
        assert recorded[0].shape[1] == branch.channels
        assert recorded[0].shape[2] == -(-9 // 2 ** branch.level)
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=f"branch {branch_id}")
        assert (actual - full).abs().max() > 1e-3  # the skip step really reuses a stale feature


def test_reference_without_cross_attention_caching_is_deepcache_on_the_diffusers_pipeline():
    """cair_denoise(cache_step=None, deep interval k) == diffusers' pipeline with DeepCache's helper enabled,
    and so does the schedule n = m = T with planning interval k."""
    model = load_model("tiny-sd21")
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    prompt, negative = (torch.randn(1, 77, 1024, generator=generator) for _ in range(2))
    steps, interval, branch = 5, 2, 1

    def scheduler():
        return DDIMScheduler.from_config(model.scheduler_config)

    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=model.unet, scheduler=scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    helper = deepcache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        expected = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, latents=latents,
                        num_inference_steps=steps, guidance_scale=6.0, output_type="latent", height=64,
                        width=64).images
    finally:
        helper.disable()
    actual = cair_denoise(model.unet, scheduler(), latents, prompt, negative, num_inference_steps=steps,
                          cache_step=None, guidance_scale=6.0, deep_interval=interval, deep_branch_id=branch)
    plain = cair_denoise(model.unet, scheduler(), latents, prompt, negative, num_inference_steps=steps,
                         cache_step=None, guidance_scale=6.0)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert (actual - plain).abs().max() > 1e-4
    # The same point of CAIR's schedule space: n = m = T, guided shallow steps every k-th in the planning phase.
    scheduled = cair_denoise(model.unet, scheduler(), latents, prompt, negative, num_inference_steps=steps,
                             cache_step=steps, guidance_scale=6.0, planning_interval=interval, deep_branch_id=branch)
    torch.testing.assert_close(scheduled, expected, rtol=0, atol=0)


def _sample_from_quad_center():
    """DeepCache's own function, compiled from its source (its module needs an older diffusers)."""
    path = deepcache.__file__.replace("__init__.py", "sd/pipeline_stable_diffusion.py")
    tree = ast.parse(open(path).read())
    function = next(node for node in tree.body
                    if isinstance(node, ast.FunctionDef) and node.name == "sample_from_quad_center")
    namespace = {"np": np}
    exec(compile(ast.Module([function], []), path, "exec"), namespace)
    return namespace["sample_from_quad_center"]


@pytest.mark.filterwarnings("ignore::numpy.exceptions.ComplexWarning")
def test_non_uniform_full_steps_are_deepcaches():
    theirs = _sample_from_quad_center()
    for count, interval in [(50, 3), (20, 2), (20, 3), (20, 5), (10, 3), (4, 2)]:
        expected, _ = theirs(count, -(-count // interval), center=round(0.3 * count), pow=1.4)
        assert full_evaluations(count, interval, "non-uniform") == frozenset(int(i) for i in expected)
    assert full_evaluations(10, 3, "uniform") == {0, 3, 6, 9}


def test_plan_of_a_schedule():
    plan = evaluation_plan(planning=2, guided=4, num_evaluations=8, deep_interval=3)
    assert [(e.kind, e.guided) for e in plan] == [
        ("planning", True), ("planning", True), ("fidelity", True), ("shallow", True),
        ("shallow", False), ("fidelity", False), ("shallow", False), ("shallow", False)]


def _cair(model, **options):
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    prompt, negative = (torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=generator)
                        for _ in range(2))
    return cair_denoise(model.unet, DDIMScheduler.from_config(model.scheduler_config), latents, prompt, negative,
                        num_inference_steps=8, guidance_scale=6.0, **options)


def test_schedule_defaults_are_todays_cair():
    """m = n and k = 1 are the loop without the new keywords, on merged and on per-half caches."""
    model = load_model("tiny-sd15")
    torch.testing.assert_close(_cair(model, cache_step=3, guidance_stop=3, deep_interval=1),
                               _cair(model, cache_step=3), rtol=0, atol=0)
    torch.testing.assert_close(_cair(model, cache_step=3, fidelity_guidance="cfg", guidance_stop=3),
                               _cair(model, cache_step=3, fidelity_guidance="cfg"), rtol=0, atol=0)
    guided = _cair(model, cache_step=3, fidelity_guidance="cfg", guidance_stop=8)
    assert (guided - _cair(model, cache_step=3, fidelity_guidance="cfg")).abs().max() > 1e-4  # m matters


def test_shallow_steps_skip_the_deep_blocks():
    """With n = 2, k = 3 over 8 steps: the mid block runs in the 2 planning and 2 full fidelity steps only."""
    model = load_model("tiny-sd15")
    calls = []
    hook = model.unet.mid_block.register_forward_hook(lambda *args: calls.append(1))
    try:
        combined = _cair(model, cache_step=2, fidelity_guidance="cfg", guidance_stop=4, deep_interval=3,
                         deep_branch_id=0)
    finally:
        hook.remove()
    assert len(calls) == 4
    assert (combined - _cair(model, cache_step=2, fidelity_guidance="cfg", guidance_stop=4)).abs().max() > 1e-4


@pytest.mark.parametrize("options, field", [
    ({"cache_step": 4, "guidance_stop": 3, "fidelity_guidance": "cfg"}, "guidance_stop"),
    ({"cache_step": 4, "guidance_stop": 9, "fidelity_guidance": "cfg"}, "guidance_stop"),
    ({"cache_step": 4, "guidance_stop": 6}, "guidance_stop"),  # m > n needs per-half caches
    ({"cache_step": 4, "deep_interval": 0}, "deep_interval"),
    ({"cache_step": 4, "deep_interval": 2}, "deep_branch"),
    ({"cache_step": 4, "deep_interval": 2, "deep_branch_id": 2}, "deep_branch"),  # tiny up blocks have 2 layers
    ({"cache_step": 4, "skip_mode": "random"}, "skip_mode"),
])
def test_bad_schedules_are_refused_with_their_field(options, field):
    with pytest.raises(InvalidInputError) as error:
        _cair(load_model("tiny-sd15"), **options)
    assert error.value.field == field and "\n" not in str(error.value)
