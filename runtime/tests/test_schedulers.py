"""The numpy scheduler ports against diffusers' schedulers, the oracle (pattern: diffusers' test_full_loop_*).

Both sides run the same full denoising loop with the same deterministic fake model (computed in
numpy on both sides, so only the schedulers differ) from the same seeded latents, and must end
at the same timesteps and latents.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from cair_runtime.errors import InvalidInputError  # noqa: E402
from cair_runtime.schedulers import SCHEDULER_NAMES, make_scheduler  # noqa: E402

# the published scheduler_config.json of the three model families
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21 = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
MODEL_CONFIGS = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL}

# the diffusers class and from_config overrides each name stands for
ORACLES = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpm++2m-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
ALL_CLASSES = sorted({class_name for class_name, _ in ORACLES.values()})
SHAPE = (2, 4, 8, 8)  # (batch, channels, latent_height, latent_width)


def fake_model(sample: np.ndarray, t: float) -> np.ndarray:
    return (0.3 * sample * np.cos(t / 300) + 0.1 * np.sin(sample)).astype(np.float32)


def initial_latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE, dtype=np.float32)


def diffusers_scheduler(name: str | None, config: dict):
    class_name, overrides = ORACLES[name] if name else (config["_class_name"], {})
    return getattr(diffusers, class_name).from_config(config, **overrides)


def run_diffusers(scheduler, num_steps: int, latents: np.ndarray, monkeypatch, noise_seed: int = 1, stop=None):
    # ancestral noise: the same numpy stream the port draws from
    noise_rng = np.random.default_rng(noise_seed)

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(noise_rng.standard_normal(tuple(shape), dtype=np.float32))

    module = diffusers.schedulers.scheduling_euler_ancestral_discrete
    monkeypatch.setattr(module, "randn_tensor", randn_tensor)

    scheduler.set_timesteps(num_steps)
    x = torch.from_numpy(latents) * scheduler.init_noise_sigma
    for t in scheduler.timesteps[:stop]:
        model_input = scheduler.scale_model_input(x, t)
        model_output = torch.from_numpy(fake_model(model_input.numpy(), float(t)))
        x = scheduler.step(model_output, t, x).prev_sample
    return scheduler.timesteps.numpy(), x.numpy()


def run_port(scheduler, num_steps: int, latents: np.ndarray, noise_seed: int = 1, stop=None):
    rng = np.random.default_rng(noise_seed)
    scheduler.set_timesteps(num_steps)
    x = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps[:stop]:
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(fake_model(model_input, float(t)), t, x, rng=rng)
    return scheduler.timesteps.copy(), x


def assert_matches(name: str | None, config: dict, num_steps: int, monkeypatch, stop=None) -> None:
    latents = initial_latents()
    oracle = diffusers_scheduler(name, config)
    expected_timesteps, expected = run_diffusers(oracle, num_steps, latents, monkeypatch, stop=stop)
    timesteps, actual = run_port(make_scheduler(name, config), num_steps, latents, stop=stop)

    assert timesteps.dtype == expected_timesteps.dtype
    # fractional (Karras) timesteps: torch's float32 sqrt is off by an ulp now and then
    np.testing.assert_allclose(timesteps, expected_timesteps, rtol=1e-6, atol=0)
    assert actual.dtype == np.float32 and actual.shape == SHAPE
    assert np.isfinite(expected).all()
    relative_error = np.abs(actual - expected).max() / np.abs(expected).max()
    assert relative_error <= 1e-5, f"max abs error / max abs value = {relative_error:.2e}"


@pytest.mark.parametrize("num_steps", [25, 10])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("model", MODEL_CONFIGS)
@pytest.mark.parametrize("name", [*SCHEDULER_NAMES, None])
def test_full_loop_model_configs(name, model, prediction_type, num_steps, monkeypatch):
    config = {**MODEL_CONFIGS[model], "prediction_type": prediction_type}
    assert_matches(name, config, num_steps, monkeypatch)


@pytest.mark.parametrize("timestep_spacing", ["trailing", "linspace", "leading"])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_full_loop_timestep_spacing(name, timestep_spacing, monkeypatch):
    assert_matches(name, {**SD21, "timestep_spacing": timestep_spacing}, 25, monkeypatch)


# a config of class defaults only: linear betas, steps_offset 0, DDIM clip_sample and
# set_alpha_to_one True, PNDM with its Runge-Kutta warm-up steps
@pytest.mark.parametrize("num_steps", [25, 4])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_full_loop_class_defaults(name, num_steps, monkeypatch):
    assert_matches(name, {"_class_name": "DDIMScheduler"}, num_steps, monkeypatch)


# not dpm++2m-karras: diffusers' own loop fails there (the cosine schedule's huge last sigma puts
# most Karras timesteps at 998, and its step-index lookup then runs past the end)
@pytest.mark.parametrize("name", [name for name in SCHEDULER_NAMES if name != "dpm++2m-karras"])
def test_full_loop_cosine_betas(name, monkeypatch):
    assert_matches(name, {**SD15, "beta_schedule": "squaredcos_cap_v2"}, 25, monkeypatch)


def test_karras_dpm_with_cosine_betas_is_refused_up_front():
    # diffusers' DPMSolverMultistepScheduler fails inside step() (IndexError) at 7, 13 or 50 steps
    oracle = diffusers_scheduler("dpm++2m-karras", {**SD15, "beta_schedule": "squaredcos_cap_v2"})
    oracle.set_timesteps(7)
    with pytest.raises(IndexError):
        x = torch.zeros(SHAPE)
        for t in oracle.timesteps:
            x = oracle.step(x, t, x).prev_sample
    with pytest.raises(InvalidInputError, match="squaredcos_cap_v2"):
        make_scheduler("dpm++2m-karras", {**SD15, "beta_schedule": "squaredcos_cap_v2"})


def test_karras_sigma_max_beyond_the_model_is_refused_up_front():
    config = {**SD15, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True, "sigma_max": 80.0}
    oracle = diffusers_scheduler(None, config)
    oracle.set_timesteps(10)
    with pytest.raises(IndexError):
        x = torch.zeros(SHAPE)
        for t in oracle.timesteps:
            x = oracle.step(x, t, x).prev_sample
    for name in (None, "unipc"):
        with pytest.raises(InvalidInputError, match="same training timestep 999"):
            make_scheduler(name, config).set_timesteps(10)


# sigma_min/sigma_max of a model's config (an Euler config, or hand-set): diffusers' Karras sigmas honour them
@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("sigmas", [{"sigma_min": 0.1, "sigma_max": 10.0}, {"sigma_min": 0.002},
                                    {"sigma_max": 12.0}, {"sigma_min": 0.05, "sigma_max": 5.0}])
@pytest.mark.parametrize("model", MODEL_CONFIGS)
@pytest.mark.parametrize("name", ["dpm++2m-karras", "unipc", "euler"])
def test_full_loop_karras_sigma_range(name, model, sigmas, num_steps, monkeypatch):
    config = {**MODEL_CONFIGS[model], "use_karras_sigmas": True, **sigmas}
    assert_matches(name, config, num_steps, monkeypatch)
    assert_matches(None, {**config, "_class_name": ORACLES[name][0]}, num_steps, monkeypatch)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++2m", "dpm++2m-karras", "unipc"])
def test_full_loop_sample_prediction(name, monkeypatch):
    assert_matches(name, {**SD15, "prediction_type": "sample"}, 25, monkeypatch)


@pytest.mark.parametrize(
    "options",
    [
        {"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True},
        {"_class_name": "DPMSolverMultistepScheduler", "solver_type": "heun"},
        {"_class_name": "DPMSolverMultistepScheduler", "solver_order": 1, "use_karras_sigmas": True},
        {"_class_name": "UniPCMultistepScheduler", "solver_order": 3, "use_karras_sigmas": True},
        {"_class_name": "UniPCMultistepScheduler", "disable_corrector": [0, 2]},
        {"_class_name": "PNDMScheduler", "skip_prk_steps": False, "timestep_spacing": "trailing"},
        {"_class_name": "DDIMScheduler", "trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()},
    ],
    ids=lambda options: "-".join(f"{v}" for k, v in options.items() if k != "trained_betas"),
)
def test_full_loop_options(options, monkeypatch):
    config = {k: v for k, v in SD15.items() if k != "_class_name"} | options
    assert_matches(None, config, 25, monkeypatch)


def test_full_loop_unipc_bh1(monkeypatch):
    # the last step is left out: diffusers' bh1 step to sigma 0 gives NaN (0 * -inf), the port does not
    config = {**SD15, "_class_name": "UniPCMultistepScheduler", "solver_type": "bh1"}
    assert_matches(None, config, 25, monkeypatch, stop=-1)
    _, latents = run_port(make_scheduler(None, config), 25, initial_latents())
    assert np.isfinite(latents).all()


@pytest.mark.parametrize("class_name", ALL_CLASSES)
def test_make_scheduler_picks_model_class(class_name):
    scheduler = make_scheduler(None, {**SD15, "_class_name": class_name})
    assert type(scheduler).__name__ == class_name


def test_use_default_values_are_not_carried_over():
    # diffusers records the keys it filled with defaults; another class then takes its own defaults
    config = dict(diffusers.DDIMScheduler.from_config(SD15).config)
    assert "timestep_spacing" in config["_use_default_values"]
    scheduler = make_scheduler("euler", config)
    assert scheduler.timestep_spacing == diffusers.EulerDiscreteScheduler.from_config(config).config.timestep_spacing


def test_unknown_name_lists_known_names():
    with pytest.raises(InvalidInputError) as error:
        make_scheduler("lms", SD15)
    message = str(error.value)
    assert "\n" not in message and "'lms'" in message
    assert all(name in message for name in SCHEDULER_NAMES)


def test_unknown_class_is_refused():
    with pytest.raises(InvalidInputError, match="LMSDiscreteScheduler"):
        make_scheduler(None, {**SD15, "_class_name": "LMSDiscreteScheduler"})


@pytest.mark.parametrize(
    "name, options",
    [
        ("ddim", {"thresholding": True}),
        ("dpm++2m", {"final_sigmas_type": "sigma_min"}),
        (None, {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}),
        (None, {"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}),
        ("euler", {"prediction_type": "flow_prediction"}),
        ("pndm", {"timestep_spacing": "karras"}),
        ("unipc", {"lower_order_final": False}),
    ],
)
def test_unported_options_are_refused(name, options):
    with pytest.raises(InvalidInputError):
        make_scheduler(name, {**SD15, **options})


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_set_timesteps_resets_state(name):
    latents = initial_latents()
    scheduler = make_scheduler(name, SD15)
    run_port(scheduler, 10, latents)
    timesteps_first, first = run_port(scheduler, 25, latents)
    timesteps_again, again = run_port(scheduler, 25, latents)
    timesteps_fresh, fresh = run_port(make_scheduler(name, SD15), 25, latents)
    np.testing.assert_array_equal(first, fresh)
    np.testing.assert_array_equal(again, fresh)
    np.testing.assert_array_equal(timesteps_first, timesteps_fresh)
    np.testing.assert_array_equal(timesteps_again, timesteps_fresh)


def test_ancestral_noise_follows_rng():
    latents = initial_latents()
    scheduler = make_scheduler("euler-ancestral", SD15)
    _, seeded = run_port(scheduler, 10, latents, noise_seed=5)
    _, reseeded = run_port(scheduler, 10, latents, noise_seed=5)
    _, other = run_port(scheduler, 10, latents, noise_seed=6)
    np.testing.assert_array_equal(seeded, reseeded)
    assert not np.array_equal(seeded, other)

    scheduler.set_timesteps(10)  # rng=None draws from an unseeded generator
    t = scheduler.timesteps[0]
    x = scheduler.step(fake_model(latents, float(t)), t, latents)
    assert x.dtype == np.float32 and np.isfinite(x).all()


# --- image to image: add_noise at diffusers' start step, begin index, the rest of the loop ------

def run_img2img_diffusers(scheduler, num_steps, strength, clean, noise, monkeypatch):
    from diffusers import StableDiffusionImg2ImgPipeline
    from types import SimpleNamespace

    noise_rng = np.random.default_rng(1)
    monkeypatch.setattr(diffusers.schedulers.scheduling_euler_ancestral_discrete, "randn_tensor",
                        lambda shape, **_: torch.from_numpy(noise_rng.standard_normal(tuple(shape), dtype=np.float32)))
    scheduler.set_timesteps(num_steps)
    # the pipeline's own get_timesteps: slices the timesteps and sets the scheduler's begin index
    timesteps, executed = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), num_steps,
                                                                         strength, "cpu")
    x = scheduler.add_noise(torch.from_numpy(clean), torch.from_numpy(noise), timesteps[:1].repeat(SHAPE[0]))
    for t in timesteps:
        model_output = torch.from_numpy(fake_model(scheduler.scale_model_input(x, t).numpy(), float(t)))
        x = scheduler.step(model_output, t, x).prev_sample
    return executed, timesteps.numpy(), x.numpy()


def run_img2img_port(scheduler, num_steps, strength, clean, noise):
    from cair_runtime.schedulers import img2img_start

    rng = np.random.default_rng(1)
    scheduler.set_timesteps(num_steps)
    start = img2img_start(num_steps, strength)
    begin = start * scheduler.order
    scheduler.set_begin_index(begin)
    timesteps = scheduler.timesteps[begin:]
    x = scheduler.add_noise(clean, noise, timesteps[0])
    for t in timesteps:
        x = scheduler.step(fake_model(scheduler.scale_model_input(x, t), float(t)), t, x, rng=rng)
    return num_steps - start, timesteps, x


@pytest.mark.parametrize("strength", [1.0, 0.75, 0.3])
@pytest.mark.parametrize("model", MODEL_CONFIGS)
@pytest.mark.parametrize("name", [*SCHEDULER_NAMES, None])
def test_img2img_loop_matches_diffusers(name, model, strength, monkeypatch):
    config = MODEL_CONFIGS[model]
    clean, noise = initial_latents(2), initial_latents(3)
    executed, expected_timesteps, expected = run_img2img_diffusers(diffusers_scheduler(name, config), 10, strength,
                                                                   clean, noise, monkeypatch)
    port_executed, timesteps, actual = run_img2img_port(make_scheduler(name, config), 10, strength, clean, noise)
    assert port_executed == executed == min(int(10 * strength), 10)
    np.testing.assert_allclose(timesteps, expected_timesteps, rtol=1e-6, atol=0)
    assert np.abs(actual - expected).max() / np.abs(expected).max() <= 1e-5


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_add_noise_matches_diffusers_at_every_timestep(name):
    # without a begin index, as diffusers' training-style call: each timestep's own noise level
    oracle, port = diffusers_scheduler(name, SD15), make_scheduler(name, SD15)
    oracle.set_timesteps(7)
    port.set_timesteps(7)
    clean, noise = initial_latents(2), initial_latents(3)
    for t in port.timesteps:
        expected = oracle.add_noise(torch.from_numpy(clean), torch.from_numpy(noise), torch.tensor([t] * SHAPE[0]))
        np.testing.assert_allclose(port.add_noise(clean, noise, t), expected.numpy(), rtol=1e-6, atol=1e-6)
