"""The flow-matching scheduler ports against diffusers' schedulers, the oracle: FlowMatchEulerDiscreteScheduler
("flow-euler") and DPMSolverMultistepScheduler with flow sigmas (Sana's default).

As runtime/tests/test_schedulers.py does for the noise-prediction ports: both sides run the same full
denoising loop with the same deterministic fake model (computed in numpy on both sides, so only the
schedulers differ) from the same seeded float32 latents, and must end at the same timesteps, sigmas
and latents. The bound on the latents is that file's, max |port - diffusers| / max |diffusers| <= 1e-5:
the Euler port reproduces diffusers bit for bit (the same float32 operations), while DPM-Solver's
float32 log/exp in numpy and in torch differ in the last bits (measured up to about 5e-7).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from cair_runtime.errors import InvalidInputError  # noqa: E402
from cair_runtime.schedulers import SCHEDULER_NAMES, img2img_start, make_scheduler, scheduler_names  # noqa: E402

# Sana's scheduler config as diffusers' Sana conversion script saves it:
# DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction"),
# flow_shift 3.0 for the 512, 1024 and 2048 px models, 6.0 for 4096 px
SANA = {
    "_class_name": "DPMSolverMultistepScheduler",
    "_diffusers_version": "0.32.0.dev0",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lambda_min_clipped": -float("inf"),
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}
# the script's other choice ("flow-euler"): FlowMatchEulerDiscreteScheduler(shift=3.0)
SANA_FLOW_EULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.32.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "shift_terminal": None,
    "use_beta_sigmas": False,
    "use_dynamic_shifting": False,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
# an SD3-style config (a static shift) and a Flux-style one (the shift follows the image size through mu)
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX = {**SD3, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
        "max_image_seq_len": 4096}
# a noise-prediction model's (SD 1.5)
SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "skip_prk_steps": True, "steps_offset": 1}

STEPS = [1, 4, 20, 28]
SHAPE = (2, 4, 8, 8)  # (batch, channels, latent_height, latent_width)


def fake_model(sample: np.ndarray, t: float) -> np.ndarray:
    return (0.3 * sample * np.cos(t / 300) + 0.1 * np.sin(sample)).astype(np.float32)


def initial_latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE, dtype=np.float32)


def oracle(config: dict, **overrides):
    return getattr(diffusers, config["_class_name"]).from_config(config, **overrides)


def patch_flow_noise(monkeypatch, noise_seed: int = 1) -> None:
    # stochastic sampling's noise: the same numpy stream the port draws from
    noise_rng = np.random.default_rng(noise_seed)

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(noise_rng.standard_normal(tuple(shape), dtype=np.float32))

    monkeypatch.setattr(diffusers.schedulers.scheduling_flow_match_euler_discrete, "randn_tensor", randn_tensor)


def run_diffusers(scheduler, num_steps: int, latents: np.ndarray, **set_timesteps):
    # the loop of diffusers' Sana/SD3/Flux pipelines: no init_noise_sigma, no scale_model_input
    scheduler.set_timesteps(num_steps, **set_timesteps)
    x = torch.from_numpy(latents)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.from_numpy(fake_model(x.numpy(), float(t))), t, x).prev_sample
    return scheduler.timesteps.numpy(), scheduler.sigmas.numpy(), x.numpy()


def run_port(scheduler, num_steps: int, latents: np.ndarray, noise_seed: int = 1, **set_timesteps):
    # the runtime's loop (cair_runtime.schedulers)
    rng = np.random.default_rng(noise_seed)
    scheduler.set_timesteps(num_steps, **set_timesteps)
    x = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(fake_model(scheduler.scale_model_input(x, t), float(t)), t, x, rng=rng)
    return scheduler.timesteps.copy(), scheduler.sigmas.copy(), x


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def assert_matches(name: str | None, config: dict, num_steps: int, monkeypatch, oracle_overrides=None,
                   **set_timesteps) -> float:
    latents = initial_latents()
    patch_flow_noise(monkeypatch)
    expected_timesteps, expected_sigmas, expected = run_diffusers(oracle(config, **(oracle_overrides or {})),
                                                                  num_steps, latents, **set_timesteps)
    port = make_scheduler(name, config)
    assert port.init_noise_sigma == 1.0 and port.flow_matching
    timesteps, sigmas, actual = run_port(port, num_steps, latents, **set_timesteps)

    assert timesteps.dtype == expected_timesteps.dtype and sigmas.dtype == expected_sigmas.dtype == np.float32
    np.testing.assert_array_equal(timesteps, expected_timesteps)
    np.testing.assert_array_equal(sigmas, expected_sigmas)
    assert actual.dtype == np.float32 and actual.shape == SHAPE
    assert np.isfinite(expected).all()
    error = relative_error(actual, expected)
    assert error <= 1e-5, f"max abs error / max abs value = {error:.2e}"
    return error


# --- Sana's default: DPM-Solver++ 2M with flow sigmas and flow prediction ------------------------

@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("options", [{}, {"flow_shift": 6.0}, {"solver_type": "heun"}, {"solver_order": 1},
                                     {"flow_shift": 1.0, "timestep_spacing": "trailing"}],
                         ids=lambda options: "-".join(f"{k}={v}" for k, v in options.items()) or "sana")
@pytest.mark.parametrize("name", [None, "dpm++2m"])
def test_full_loop_sana_dpm_solver(name, options, num_steps, monkeypatch):
    if name == "dpm++2m" and "solver_order" in options:
        pytest.skip("dpm++2m forces order 2")
    assert_matches(name, {**SANA, **options}, num_steps, monkeypatch)


@pytest.mark.parametrize("num_steps", [4, 20])
def test_full_loop_dpm_solver_dynamic_shift(num_steps, monkeypatch):
    # mu sets flow_shift = exp(mu); diffusers keeps it for later set_timesteps calls, and so does the port
    config = {**SANA, "use_dynamic_shifting": True}
    assert_matches(None, config, num_steps, monkeypatch, mu=0.8)
    scheduler, expected = make_scheduler(None, config), oracle(config)
    latents = initial_latents()
    run_port(scheduler, num_steps, latents, mu=0.8)
    run_diffusers(expected, num_steps, latents, mu=0.8)
    timesteps, sigmas, actual = run_port(scheduler, num_steps, latents)
    expected_timesteps, expected_sigmas, expected_latents = run_diffusers(expected, num_steps, latents)
    np.testing.assert_array_equal(timesteps, expected_timesteps)
    np.testing.assert_array_equal(sigmas, expected_sigmas)
    assert relative_error(actual, expected_latents) <= 1e-5


# --- flow-euler: FlowMatchEulerDiscreteScheduler -----------------------------------------------

FLOW_EULER_CONFIGS = {
    "sana": SANA_FLOW_EULER,
    "sd3": SD3,
    "shift-1": {**SD3, "shift": 1.0},
    "shift-terminal": {**SD3, "shift_terminal": 0.1},
    "invert-sigmas": {**SD3, "invert_sigmas": True},
    "karras": {**SD3, "use_karras_sigmas": True},
    "exponential": {**SD3, "use_exponential_sigmas": True},
    "stochastic": {**SD3, "stochastic_sampling": True},
}


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("config", FLOW_EULER_CONFIGS)
@pytest.mark.parametrize("name", [None, "flow-euler"])
def test_full_loop_flow_euler(name, config, num_steps, monkeypatch):
    if config == "shift-terminal" and num_steps == 1:
        pytest.skip("one step: diffusers' stretch is 0 / 0 (test_shift_terminal_needs_two_steps)")
    assert_matches(name, FLOW_EULER_CONFIGS[config], num_steps, monkeypatch)


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("image_seq_len", [1024, 4096])  # Flux at 512 and 1024 px
def test_full_loop_flow_euler_dynamic_shift(image_seq_len, time_shift_type, num_steps, monkeypatch):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = {**FLUX, "time_shift_type": time_shift_type}
    mu = make_scheduler(None, config).dynamic_shift_mu(image_seq_len)
    assert mu == calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    assert_matches(None, config, num_steps, monkeypatch, mu=mu)


def test_flow_euler_from_sana_config_takes_diffusers_from_config_options(monkeypatch):
    # as FlowMatchEulerDiscreteScheduler.from_config(sana_config): Sana's flow_shift is not its shift (1.0)
    scheduler = make_scheduler("flow-euler", SANA)
    assert scheduler.shift == diffusers.FlowMatchEulerDiscreteScheduler.from_config(SANA).config.shift == 1.0
    latents = initial_latents()
    expected = run_diffusers(diffusers.FlowMatchEulerDiscreteScheduler.from_config(SANA), 20, latents)
    actual = run_port(scheduler, 20, latents)
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(a, e)


def test_stochastic_sampling_follows_rng():
    latents = initial_latents()
    scheduler = make_scheduler(None, {**SD3, "stochastic_sampling": True})
    _, _, seeded = run_port(scheduler, 10, latents, noise_seed=5)
    _, _, reseeded = run_port(scheduler, 10, latents, noise_seed=5)
    _, _, other = run_port(scheduler, 10, latents, noise_seed=6)
    np.testing.assert_array_equal(seeded, reseeded)
    assert not np.array_equal(seeded, other)


def test_flow_euler_set_timesteps_resets_state():
    latents = initial_latents()
    scheduler = make_scheduler(None, SD3)
    run_port(scheduler, 10, latents)
    again = run_port(scheduler, 28, latents)
    fresh = run_port(make_scheduler(None, SD3), 28, latents)
    for a, f in zip(again, fresh):
        np.testing.assert_array_equal(a, f)


# --- image to image: scale_noise / add_noise at the begin index, then the rest of the loop -------

def run_img2img_diffusers(scheduler, num_steps, begin, clean, noise):
    scheduler.set_timesteps(num_steps)
    scheduler.set_begin_index(begin)
    timesteps = scheduler.timesteps[begin:]
    start = timesteps[:1].repeat(SHAPE[0])
    if hasattr(scheduler, "scale_noise"):
        x = scheduler.scale_noise(torch.from_numpy(clean), start, torch.from_numpy(noise))
    else:
        x = scheduler.add_noise(torch.from_numpy(clean), torch.from_numpy(noise), start)
    for t in timesteps:
        x = scheduler.step(torch.from_numpy(fake_model(x.numpy(), float(t))), t, x).prev_sample
    return timesteps.numpy(), x.numpy()


def run_img2img_port(scheduler, num_steps, begin, clean, noise):
    scheduler.set_timesteps(num_steps)
    scheduler.set_begin_index(begin)
    timesteps = scheduler.timesteps[begin:]
    x = scheduler.add_noise(clean, noise, timesteps[0])
    for t in timesteps:
        x = scheduler.step(fake_model(scheduler.scale_model_input(x, t), float(t)), t, x)
    return timesteps, x


@pytest.mark.parametrize("num_steps", [4, 28])
@pytest.mark.parametrize("strength", [1.0, 0.75, 0.3])
@pytest.mark.parametrize("config", ["sana", "sana-flow-euler", "sd3"])
def test_img2img_loop_matches_diffusers(config, strength, num_steps):
    config = {"sana": SANA, "sana-flow-euler": SANA_FLOW_EULER, "sd3": SD3}[config]
    clean, noise = initial_latents(2), initial_latents(3)
    port = make_scheduler(None, config)
    begin = img2img_start(num_steps, strength) * port.order
    expected_timesteps, expected = run_img2img_diffusers(oracle(config), num_steps, begin, clean, noise)
    timesteps, actual = run_img2img_port(port, num_steps, begin, clean, noise)
    assert len(timesteps) == min(int(num_steps * strength), num_steps)
    np.testing.assert_array_equal(timesteps, expected_timesteps)
    assert relative_error(actual, expected) <= 1e-5


@pytest.mark.parametrize("config", ["sana", "sd3"])
def test_noise_at_every_timestep_matches_diffusers(config):
    # without a begin index, as diffusers' training-style call: each timestep's own noise level
    config = {"sana": SANA, "sd3": SD3}[config]
    expected_scheduler, port = oracle(config), make_scheduler(None, config)
    expected_scheduler.set_timesteps(7)
    port.set_timesteps(7)
    clean, noise = initial_latents(2), initial_latents(3)
    for t in port.timesteps:
        timestep = torch.tensor([t] * SHAPE[0])
        if hasattr(expected_scheduler, "scale_noise"):
            expected = expected_scheduler.scale_noise(torch.from_numpy(clean), timestep, torch.from_numpy(noise))
            np.testing.assert_array_equal(port.scale_noise(clean, t, noise), expected.numpy())
        else:
            expected = expected_scheduler.add_noise(torch.from_numpy(clean), torch.from_numpy(noise), timestep)
        np.testing.assert_array_equal(port.add_noise(clean, noise, t), expected.numpy())


# --- make_scheduler: the model's own, names, refusals --------------------------------------------

def test_make_scheduler_builds_sana_and_flow_models():
    sana = make_scheduler(None, SANA)
    assert type(sana).__name__ == "DPMSolverMultistepScheduler" and sana.flow_matching
    assert (sana.use_flow_sigmas, sana.flow_shift, sana.prediction_type) == (True, 3.0, "flow_prediction")
    assert type(make_scheduler(None, SD3)).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert type(make_scheduler("FlowMatchEulerDiscreteScheduler", SD3)).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert scheduler_names(SANA) == ("dpm++2m", "flow-euler")
    assert scheduler_names(SANA_FLOW_EULER) == scheduler_names(FLUX) == ("flow-euler",)
    assert "flow-euler" not in SCHEDULER_NAMES and scheduler_names(SD15) == SCHEDULER_NAMES


@pytest.mark.parametrize(
    "name, config",
    [
        # a noise-prediction sampler for a flow-matching model, and the other way round
        ("euler", SANA),
        ("ddim", SANA),
        ("unipc", SANA),
        ("euler-ancestral", SD3),
        ("dpm++2m", SD3),
        ("flow-euler", SD15),
        # Karras sigmas of the betas with the flow's alpha_t = 1 - sigma: no schedule at all
        ("dpm++2m-karras", SANA),
        # options the ports do not have
        (None, {**SD3, "use_beta_sigmas": True}),
        (None, {**SD3, "use_karras_sigmas": True, "use_exponential_sigmas": True}),
        (None, {**SD3, "time_shift_type": "cubic"}),
        (None, {**SANA, "final_sigmas_type": "sigma_min"}),
        (None, {**SANA, "algorithm_type": "sde-dpmsolver++"}),
        (None, {**SANA, "solver_order": 3}),
        (None, {**SANA, "use_lu_lambdas": True}),
        (None, {**SANA, "time_shift_type": "linear"}),
        (None, {**SD3, "_class_name": "FlowMatchHeunDiscreteScheduler"}),
    ],
)
def test_unported_or_mismatched_schedulers_are_refused(name, config):
    with pytest.raises(InvalidInputError) as error:
        make_scheduler(name, config)
    assert "\n" not in str(error.value)


def test_mismatch_message_names_the_model_s_schedulers():
    with pytest.raises(InvalidInputError, match="choose one of dpm\\+\\+2m, flow-euler$"):
        make_scheduler("euler-ancestral", {k: v for k, v in SANA.items() if k != "prediction_type"})
    with pytest.raises(InvalidInputError, match="choose one of flow-euler$"):
        make_scheduler("ddim", FLUX)


def test_set_timesteps_refusals():
    with pytest.raises(InvalidInputError, match="mu"):
        make_scheduler(None, FLUX).set_timesteps(20)  # diffusers: ValueError
    with pytest.raises(InvalidInputError, match="use_dynamic_shifting"):
        make_scheduler(None, SANA).set_timesteps(20, mu=1.0)  # diffusers: AssertionError
    make_scheduler(None, SD3).set_timesteps(20, mu=1.0)  # a static shift ignores mu, as diffusers does


def test_shift_terminal_needs_two_steps():
    config = {**SD3, "shift_terminal": 0.1}
    expected = oracle(config)
    with np.errstate(invalid="ignore"):
        expected.set_timesteps(1)
    assert torch.isnan(expected.timesteps).all()
    with pytest.raises(InvalidInputError, match="shift_terminal"):
        make_scheduler(None, config).set_timesteps(1)
