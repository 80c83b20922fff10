"""The shallow graph and the (n, m, k) schedule: export, manifest, runtime against the torch reference."""

import json

import numpy as np
import onnx
import pytest
import torch
from diffusers import DDIMScheduler

from cair_export.core.models import load_model
from cair_export.core.reference import cair_denoise
from cair_runtime.errors import InvalidInputError, ManifestError
from cair_runtime.manifest import MANIFEST_NAME, load_manifest
from cair_runtime.pipeline import CairEngine

STEPS = 10
GUIDANCE = 2.0  # the fp32 parity bound of test_runtime_parity.py
DEEP = {"deep_branch": 1}  # the validated tiny-sd15 export every test here shares (a shallow graph with cross-attention)
LEAN = {"fidelity_guidance": "none", "deep_branch": None}  # merged caches, no shallow graphs
_models = {}


def _inputs(engine, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch, engine.manifest.dim("text_len").opt, engine.context_dim)
    x = {"prompt_embeds": rng.standard_normal(shape, dtype=np.float32),
         "negative_prompt_embeds": rng.standard_normal(shape, dtype=np.float32),
         "latents": rng.standard_normal((batch, 4, 8, 12), dtype=np.float32)}
    if engine.added_conditions:
        x["text_embeds"] = rng.standard_normal((batch, engine.pooled_dim), dtype=np.float32)
        x["negative_text_embeds"] = rng.standard_normal((batch, engine.pooled_dim), dtype=np.float32)
    return x


def _model(preset):
    if preset not in _models:
        _models[preset] = load_model(preset)
    return _models[preset]


def _reference(preset, x, branch, **schedule):
    model = _model(preset)
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    added = negative = None
    if "text_embeds" in t:
        time_ids = torch.tensor([[64.0, 96, 0, 0, 64, 96]]).repeat(len(t["latents"]), 1)
        added = {"text_embeds": t["text_embeds"], "time_ids": time_ids}
        negative = {"text_embeds": t["negative_text_embeds"], "time_ids": time_ids}
    return cair_denoise(model.unet, DDIMScheduler.from_config(model.scheduler_config), t["latents"],
                        t["prompt_embeds"], t["negative_prompt_embeds"], num_inference_steps=STEPS,
                        guidance_scale=GUIDANCE, fidelity_guidance="cfg", deep_branch_id=branch,
                        added_cond=added, negative_added_cond=negative, **schedule).numpy()


def _relative(actual, expected):
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def test_export_writes_a_validated_shallow_graph(exported):
    folder = exported("tiny-sd15", **DEEP)
    manifest = load_manifest(folder, verify="full")
    assert manifest.deep_branch == {"name": "deep_feature", "branch": 1, "block": 0, "layer": 1, "up_block": 2,
                                    "up_layer": 0, "channels": 64, "level": 0}
    shallow, fidelity = manifest.graphs["shallow"], manifest.graphs["fidelity"]
    assert [s.name for s in fidelity.outputs] == ["noise_pred", "deep_feature"]
    assert fidelity.outputs[1].shape == ("2*batch", 64, "latent_height", "latent_width")
    # Branch 1 keeps down block 0's first layer and the last up block: three of the seven caches, no text.
    assert [s.name for s in shallow.inputs] == ["sample", "timestep", "deep_feature", "cache_000", "cache_005",
                                                "cache_006"]
    checks = json.loads((folder / "validation.json").read_text())
    assert {c["graph"] for c in checks} >= {"shallow", "chained"}
    assert len([c for c in checks if c["graph"] == "shallow"]) == 2  # two shapes, neither the trace shape

    def weights(kind):  # parameters the graph holds, read from the ONNX itself
        model = onnx.load(str(folder / f"{kind}.onnx"), load_external_data=False)
        return sum(int(np.prod(t.dims)) for t in model.graph.initializer)

    assert weights("shallow") < 0.5 * weights("fidelity")


def test_manifests_without_the_section_load_and_half_a_section_is_refused(exported, tmp_path):
    folder = exported("tiny-sd15", **DEEP)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data.pop("deep_branch")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="shallow graph and a deep_branch section come together"):
        load_manifest(broken, verify="none")
    assert load_manifest(exported("tiny-sd15", **LEAN), verify="size").deep_branch is None


@pytest.mark.filterwarnings("error::RuntimeWarning")  # m = n once averaged a deep-feature buffer nothing had written
@pytest.mark.parametrize("preset, branch", [("tiny-sd15", 1), ("tiny-sdxl", 3)])
def test_runtime_schedules_match_the_reference(exported, preset, branch):
    options = DEEP if preset == "tiny-sd15" else {"deep_branch": branch, "validate": False}
    engine = CairEngine(exported(preset, **options))
    x = _inputs(engine)
    for n, m, k, mode in [(3, 6, 3, "uniform"), (2, 2, 2, "uniform"), (3, 5, 3, "non-uniform")]:
        result = engine.denoise(**x, num_inference_steps=STEPS, cache_step=n, guidance_stop=m, deep_interval=k,
                                skip_mode=mode, guidance_scale=GUIDANCE, scheduler="ddim")
        expected = _reference(preset, x, branch, cache_step=n, guidance_stop=m, deep_interval=k, skip_mode=mode)
        assert _relative(result.latents, expected) <= 1e-4, (n, m, k, mode)
        assert result.timings.planning_steps == n and result.timings.fidelity_steps == STEPS - n
        assert result.timings.shallow_steps == 4
        assert 0 < result.timings.shallow_s < result.timings.fidelity_s


@pytest.mark.parametrize("preset, branch", [("tiny-sd15", 1), ("tiny-sdxl", 3)])
def test_guided_shallow_steps_match_the_reference(exported, preset, branch):
    """Planning interval k_p: DeepCache's own guided shallow steps before n, on the guided shallow graph.
    n = m = T with k_p = k is DeepCache's loop (the reference equals DeepCacheSDHelper bit for bit:
    test_deep_feature.py); with n < T the caches at n mix the last full step's and the last step's."""
    options = DEEP if preset == "tiny-sd15" else {"deep_branch": branch, "validate": False}
    engine = CairEngine(exported(preset, **options))
    x = _inputs(engine)
    for n, m, k, k_p, mode in [(STEPS, STEPS, 1, 3, "uniform"), (STEPS, STEPS, 1, 2, "non-uniform"),
                               (5, 7, 3, 2, "uniform"), (6, 6, 2, 4, "uniform")]:
        schedule = dict(cache_step=n, guidance_stop=m, deep_interval=k, planning_interval=k_p, skip_mode=mode)
        result = engine.denoise(**x, num_inference_steps=STEPS, guidance_scale=GUIDANCE, scheduler="ddim", **schedule)
        expected = _reference(preset, x, branch, **schedule)
        assert _relative(result.latents, expected) <= 1e-4, schedule
        plan = engine.resolve_schedule({"steps": STEPS, **schedule}).plan(STEPS)
        assert result.timings.planning_shallow_steps == sum(e.kind == "shallow_planning" for e in plan) > 0
        assert result.timings.planning_steps == n


def test_planning_interval_needs_the_guided_shallow_graph(exported):
    plain = CairEngine(exported("tiny-sd15", **LEAN))
    with pytest.raises(InvalidInputError, match="guided shallow graph") as error:
        plain.denoise(**_inputs(plain, batch=1), num_inference_steps=STEPS, cache_step=4, planning_interval=2)
    assert error.value.field == "planning_interval"


def test_image_to_image_schedules_match_the_reference(exported):
    """Image to image with a guidance stop and a deep interval: n, m and k count the steps that run (7 of 10)."""
    engine = CairEngine(exported("tiny-sd15", **DEEP))
    x = _inputs(engine)
    image_latents = np.random.default_rng(1).standard_normal(x["latents"].shape, dtype=np.float32)
    strength, steps_run = 0.7, 7
    # diffusers' get_timesteps and prepare_latents: start at t_start, the image latents noised to that timestep
    scheduler = DDIMScheduler.from_config(_model("tiny-sd15").scheduler_config)
    scheduler.set_timesteps(STEPS)
    t_start = STEPS - min(int(STEPS * strength), STEPS)
    assert t_start == STEPS - steps_run
    noised = scheduler.add_noise(torch.from_numpy(image_latents), torch.from_numpy(x["latents"]),
                                 scheduler.timesteps[t_start:t_start + 1]).numpy()
    for n, m, k in [(2, 4, 2), (3, None, 3)]:  # None: m defaults to n
        stop = {} if m is None else {"guidance_stop": m}
        result = engine.denoise(**x, image_latents=image_latents, strength=strength, num_inference_steps=STEPS,
                                cache_step=n, deep_interval=k, guidance_scale=GUIDANCE, scheduler="ddim", **stop)
        expected = _reference("tiny-sd15", {**x, "latents": noised}, 1, cache_step=n, deep_interval=k,
                              start_index=t_start, **stop)
        assert _relative(result.latents, expected) <= 1e-4, (n, m, k)
        assert result.timings.planning_steps == n and result.timings.fidelity_steps == steps_run - n
        assert result.timings.shallow_steps == 2
    with pytest.raises(InvalidInputError, match=r"outside 2\.\.7") as error:  # m beyond the steps that run
        engine.denoise(**x, image_latents=image_latents, strength=strength, num_inference_steps=STEPS, cache_step=2,
                       guidance_stop=steps_run + 1, scheduler="ddim")
    assert error.value.field == "guidance_stop"


def test_m_equal_n_and_k_1_are_todays_runs_bit_for_bit(exported):
    """Explicit m = n and k = 1 give the same bytes as the call without them, on merged and per-half caches."""
    for options, stop in ((LEAN, 4), (DEEP, 4)):
        engine = CairEngine(exported("tiny-sd15", **options))
        x = _inputs(engine)
        for scheduler in ("ddim", "dpm++2m"):
            run = dict(num_inference_steps=STEPS, cache_step=4, scheduler=scheduler, guidance_scale=5.0)
            today = engine.denoise(**x, **run).latents
            explicit = engine.denoise(**x, **run, guidance_stop=stop, deep_interval=1).latents
            assert np.array_equal(today, explicit)


def test_bad_schedules_are_one_line_errors_with_their_field(exported):
    plain = CairEngine(exported("tiny-sd15", **LEAN))
    deep = CairEngine(exported("tiny-sd15", **DEEP))
    x = _inputs(plain, batch=1)
    cases = [(deep, {"cache_step": 4, "guidance_stop": 3}, "guidance_stop"),
             (deep, {"cache_step": 4, "deep_interval": 0}, "deep_interval"),
             (deep, {"cache_step": 4, "skip_mode": "sometimes"}, "skip_mode"),
             (plain, {"cache_step": 4, "deep_interval": 2}, "deep_interval"),  # no shallow graph
             (plain, {"cache_step": 4, "guidance_stop": 6}, "guidance_stop")]  # caches merged at n
    for engine, options, field in cases:
        with pytest.raises(InvalidInputError) as error:
            engine.denoise(**x, num_inference_steps=STEPS, **options)
        assert error.value.field == field and "\n" not in str(error.value), options
