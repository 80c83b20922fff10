"""The torch-free runtime against the torch reference CAIR, end to end (fp32)."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from cair_export.core.models import load_model
from cair_export.core.reference import cair_denoise
from cair_runtime.pipeline import CairEngine

STEPS = 10
# fp32 noise floor: at guidance 5 and above, torch fp32 itself drifts ~1e-4 from a float64 run of
# the same loop on these random-weight models (guidance and the epsilon->x0 step amplify rounding),
# so the 1e-4 parity bound is checked at guidance 2; test_runtime_is_as_accurate_as_torch_fp32
# covers guidance 7.5 against float64.
GUIDANCE = 2.0
DIFFUSERS_SCHEDULERS = {
    "ddim": lambda config: DDIMScheduler.from_config(config),
    "dpm++2m": lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++",
                                                                      solver_order=2, use_karras_sigmas=False),
}


def _inputs(engine, batch=1, seed=0):
    rng = np.random.default_rng(seed)
    text_len = engine.manifest.dim("text_len").opt
    x = {
        "prompt_embeds": rng.standard_normal((batch, text_len, engine.context_dim), dtype=np.float32),
        "negative_prompt_embeds": rng.standard_normal((batch, text_len, engine.context_dim), dtype=np.float32),
        "latents": rng.standard_normal((batch, 4, 8, 12), dtype=np.float32),
    }
    if engine.added_conditions:
        x["text_embeds"] = rng.standard_normal((batch, engine.pooled_dim), dtype=np.float32)
        x["negative_text_embeds"] = rng.standard_normal((batch, engine.pooled_dim), dtype=np.float32)
    return x


def _reference(preset, scheduler, x, cache_step, guidance_scale, fidelity_guidance="none", dtype=torch.float32):
    model = load_model(preset)
    model.unet.to(dtype)
    t = {k: torch.from_numpy(v).to(dtype) for k, v in x.items()}
    added = negative_added = None
    if "text_embeds" in t:
        height, width = 8 * x["latents"].shape[2], 8 * x["latents"].shape[3]
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype).repeat(len(x["latents"]), 1)
        added = {"text_embeds": t["text_embeds"], "time_ids": time_ids}
        negative_added = {"text_embeds": t["negative_text_embeds"], "time_ids": time_ids}
    return cair_denoise(model.unet, DIFFUSERS_SCHEDULERS[scheduler](model.scheduler_config), t["latents"],
                        t["prompt_embeds"], t["negative_prompt_embeds"], num_inference_steps=STEPS,
                        cache_step=cache_step, guidance_scale=guidance_scale, added_cond=added,
                        negative_added_cond=negative_added, fidelity_guidance=fidelity_guidance).numpy()


def _relative(actual, expected):
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sd21", "tiny-sdxl"])
@pytest.mark.parametrize("scheduler", ["ddim", "dpm++2m"])
def test_runtime_matches_reference(exported, preset, scheduler):
    engine = CairEngine(exported(preset))
    x = _inputs(engine)
    for cache_step in (1, STEPS // 2, STEPS):
        result = engine.denoise(**x, num_inference_steps=STEPS, cache_step=cache_step, guidance_scale=GUIDANCE,
                                scheduler=scheduler)
        expected = _reference(preset, scheduler, x, cache_step, GUIDANCE)
        assert _relative(result.latents, expected) <= 1e-4, (cache_step, _relative(result.latents, expected))
        assert result.timings.planning_steps == cache_step
        assert result.timings.fidelity_steps == STEPS - cache_step


def test_runtime_is_as_accurate_as_torch_fp32(exported):
    """At guidance 7.5 both fp32 paths drift from float64; the runtime drifts no more than torch."""
    engine = CairEngine(exported("tiny-sd21"))
    x = _inputs(engine)
    for cache_step in (3, STEPS):
        runtime = engine.denoise(**x, num_inference_steps=STEPS, cache_step=cache_step, guidance_scale=7.5,
                                 scheduler="ddim").latents
        torch32 = _reference("tiny-sd21", "ddim", x, cache_step, 7.5)
        torch64 = _reference("tiny-sd21", "ddim", x, cache_step, 7.5, dtype=torch.float64)
        assert _relative(runtime, torch64) <= 2 * _relative(torch32, torch64) + 1e-5


def test_cfg_fidelity_variant_matches_reference(exported):
    engine = CairEngine(exported("tiny-sd15", fidelity_guidance="cfg"))
    x = _inputs(engine, batch=2)
    result = engine.denoise(**x, num_inference_steps=STEPS, cache_step=3, guidance_scale=GUIDANCE, scheduler="ddim")
    expected = _reference("tiny-sd15", "ddim", x, 3, GUIDANCE, fidelity_guidance="cfg")
    assert _relative(result.latents, expected) <= 1e-4


def test_batches_above_max_batch_run_in_chunks(exported):
    engine = CairEngine(exported("tiny-sd21"))
    assert engine.manifest.dim("batch").max == 4
    x = _inputs(engine, batch=5)
    whole = engine.denoise(**x, num_inference_steps=4, cache_step=2, scheduler="ddim").latents
    first = engine.denoise(**{k: v[:4] for k, v in x.items()}, num_inference_steps=4, cache_step=2,
                           scheduler="ddim").latents
    last = engine.denoise(**{k: v[4:] for k, v in x.items()}, num_inference_steps=4, cache_step=2,
                          scheduler="ddim").latents
    np.testing.assert_array_equal(whole, np.concatenate([first, last]))


def test_caches_stay_device_values_between_the_sessions(exported, monkeypatch):
    """Planning writes into the backend's cache OrtValues in place; only noise_pred reaches numpy.

    Guided to T (m = T), so fidelity reads the per-half caches as written; a guidance stop before T
    reads each cache once more, to merge its halves (onnxruntime has no mean op outside a graph)."""
    engine = CairEngine(exported("tiny-sd21"))
    x = _inputs(engine)
    to_numpy = []
    original = ort.OrtValue.numpy
    monkeypatch.setattr(ort.OrtValue, "numpy", lambda self: to_numpy.append(self.shape()) or original(self))
    copies = []
    monkeypatch.setattr(ort.IOBinding, "copy_outputs_to_cpu",
                        lambda self: copies.append(1) or pytest.fail("outputs copied to the host"))

    engine.denoise(**x, num_inference_steps=6, cache_step=3, guidance_stop=6, scheduler="ddim")
    (context,) = engine.pool.contexts  # one call, one context (created lazily)
    pointers = {name: value.data_ptr() for name, value in context.caches.items()}
    assert len(pointers) == len(engine.manifest.caches)
    # Only noise_pred left the device: one host copy per step, each of the latent's shape.
    assert len(to_numpy) == 6 and copies == []
    assert {tuple(shape[1:]) for shape in to_numpy} == {(4, 8, 12)}
    # Planning's bound outputs are the very buffers fidelity reads.
    planning_outputs = {v.data_ptr() for v in context.bindings["planning"].get_outputs()}
    assert planning_outputs >= set(pointers.values())
    # Another generation at the same shape reuses the same context and device buffers.
    engine.denoise(**x, num_inference_steps=6, cache_step=3, guidance_stop=6, scheduler="ddim")
    assert engine.pool.contexts == [context]
    assert {name: value.data_ptr() for name, value in context.caches.items()} == pointers


def test_device_caches_hold_the_step_n_planning_outputs(exported):
    """The cache buffers after the switch equal the CFG-merged attn2 outputs planning emits at step n."""
    folder = exported("tiny-sd15")
    engine = CairEngine(folder)
    x = _inputs(engine)
    engine.denoise(**x, num_inference_steps=4, cache_step=4, scheduler="ddim")
    (context,) = engine.pool.contexts
    cached = {name: value.numpy() for name, value in context.caches.items()}
    session = ort.InferenceSession(str(folder / "planning.onnx"), providers=["CPUExecutionProvider"])
    # Re-run the last planning evaluation by hand: the buffers must hold exactly its cache outputs.
    from cair_runtime.schedulers import make_scheduler
    scheduler = make_scheduler("ddim", engine.manifest.scheduler_config)
    scheduler.set_timesteps(4)
    latents = x["latents"] * scheduler.init_noise_sigma
    context = np.concatenate([x["negative_prompt_embeds"], x["prompt_embeds"]])
    for t in scheduler.timesteps:
        outputs = session.run(None, {"sample": scheduler.scale_model_input(np.concatenate([latents] * 2), t),
                                     "timestep": np.array([t], np.float32), "encoder_hidden_states": context})
        uncond, text = np.split(outputs[0], 2)
        latents = scheduler.step(uncond + 7.5 * (text - uncond), t, latents)
    for spec, value in zip(engine.manifest.caches, outputs[1:]):
        np.testing.assert_allclose(cached[spec.name], value, rtol=1e-5, atol=1e-6)
