"""The AOTInductor backend against the torch reference CAIR, end to end (fp32, CPU).

The same checks as test_runtime_parity.py for the onnxruntime backend. AOTInductor compiles
C++ for every graph: about 2-4 minutes per graph on two busy cores, so the packages are compiled
once per session (with ``QUICK_CPU_COMPILE``; 3.5 minutes for this file on 2 cores) and only
tiny-sd21 runs by default; CAIR_TEST_AOTI_SDXL=1 adds the SDXL case (another ~5 minutes).
"""

import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from cair_export.aoti import QUICK_CPU_COMPILE
from cair_export.build import BuildConfig, build_engines
from cair_export.models import load_model
from cair_export.reference import cair_denoise
from cair_runtime.errors import ShapeError
from cair_runtime.manifest import load_manifest
from cair_runtime.pipeline import CairEngine

STEPS = 10
GUIDANCE = 2.0  # the fp32 parity bound's regime, as in test_runtime_parity.py
SCHEDULERS = {
    "ddim": lambda config: DDIMScheduler.from_config(config),
    "dpm++2m": lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++",
                                                                      solver_order=2, use_karras_sigmas=False),
}
PRESETS = ["tiny-sd21"] + (["tiny-sdxl"] if os.environ.get("CAIR_TEST_AOTI_SDXL") == "1" else [])


@pytest.fixture(scope="session")
def aoti_folder(exported, tmp_path_factory):
    """``aoti_folder(preset)``: a copy of the exported folder with AOTInductor packages built into it."""
    folders = {}

    def get(preset):
        if preset not in folders:
            folder = tmp_path_factory.mktemp("aoti") / preset
            shutil.copytree(exported(preset), folder)
            with torch._inductor.config.patch(QUICK_CPU_COMPILE):
                build_engines(folder, BuildConfig(backend="aoti"), progress=lambda m: None)
            folders[preset] = folder
        return folders[preset]

    return get


def _inputs(engine, batch=1, seed=0, size=(8, 12)):
    rng = np.random.default_rng(seed)
    text_len = engine.manifest.dim("text_len").opt
    x = {"prompt_embeds": rng.standard_normal((batch, text_len, engine.context_dim), dtype=np.float32),
         "negative_prompt_embeds": rng.standard_normal((batch, text_len, engine.context_dim), dtype=np.float32),
         "latents": rng.standard_normal((batch, 4, *size), dtype=np.float32)}
    if engine.added_conditions:
        x["text_embeds"] = rng.standard_normal((batch, engine.pooled_dim), dtype=np.float32)
        x["negative_text_embeds"] = rng.standard_normal((batch, engine.pooled_dim), dtype=np.float32)
    return x


def _reference(preset, scheduler, x, cache_step):
    model = load_model(preset)
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    added = negative_added = None
    if "text_embeds" in t:
        height, width = 8 * x["latents"].shape[2], 8 * x["latents"].shape[3]
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(len(x["latents"]), 1)
        added = {"text_embeds": t["text_embeds"], "time_ids": time_ids}
        negative_added = {"text_embeds": t["negative_text_embeds"], "time_ids": time_ids}
    return cair_denoise(model.unet, SCHEDULERS[scheduler](model.scheduler_config), t["latents"], t["prompt_embeds"],
                        t["negative_prompt_embeds"], num_inference_steps=STEPS, cache_step=cache_step,
                        guidance_scale=GUIDANCE, added_cond=added, negative_added_cond=negative_added).numpy()


def _relative(actual, expected):
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("scheduler", ["ddim", "dpm++2m"])
def test_aoti_backend_matches_reference(aoti_folder, preset, scheduler):
    engine = CairEngine(aoti_folder(preset), backend="aoti")
    x = _inputs(engine)
    for cache_step in (1, STEPS // 2, STEPS):
        result = engine.denoise(**x, num_inference_steps=STEPS, cache_step=cache_step, guidance_scale=GUIDANCE,
                                scheduler=scheduler)
        assert _relative(result.latents, _reference(preset, scheduler, x, cache_step)) <= 1e-4, cache_step
        assert result.timings.planning_steps == cache_step


def test_aoti_packages_are_recorded_with_provenance(aoti_folder):
    manifest = load_manifest(aoti_folder("tiny-sd21"))  # sha256 of the packages checked here
    records = {record.graph: record for record in manifest.engines}
    assert set(records) == {"planning", "fidelity"} and {r.backend for r in records.values()} == {"aoti"}
    assert records["planning"].properties["device"] == "cpu"
    assert records["planning"].properties["latent_multiple"] == 4  # three UNet levels: 2**2
    assert {"planning.pt2", "fidelity.pt2"} <= {f.path for f in manifest.files}


def test_caches_are_handed_over_as_device_tensors(aoti_folder):
    """Fidelity receives the very tensors planning returned at step n: no copy, no host round trip."""
    engine = CairEngine(aoti_folder("tiny-sd21"), backend="aoti")
    backend = engine.backend
    seen = {}
    for kind in ("planning", "fidelity"):
        model = backend.models[kind]

        def record(*args, kind=kind, model=model):
            outputs = model(*args)
            seen.setdefault(kind, []).append((args, outputs))
            return outputs

        backend.models[kind] = record
    # Other shapes than the trace shape, batch 3: the dims are dynamic.
    engine.denoise(**_inputs(engine, batch=3, size=(16, 8)), num_inference_steps=4, cache_step=2, scheduler="ddim")
    step_n_caches = seen["planning"][-1][1][1:]
    first = len(engine.manifest.graphs["fidelity"].inputs) - len(engine.manifest.caches)
    names = [spec.name for spec in engine.manifest.graphs["fidelity"].inputs]
    for args, _ in seen["fidelity"]:
        fed = [args[names.index(cache.name)] for cache in engine.manifest.caches]
        assert all(a is b for a, b in zip(fed, step_n_caches)) and first >= 2
    assert all(isinstance(value, torch.Tensor) for value in backend.caches.values())


def test_latent_sizes_off_the_multiple_are_refused(aoti_folder):
    engine = CairEngine(aoti_folder("tiny-sd21"), backend="aoti")
    with pytest.raises(ShapeError, match="multiples of 4"):
        engine.denoise(**_inputs(engine, size=(8, 10)), num_inference_steps=2, cache_step=1)
