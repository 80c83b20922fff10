"""Pieces shared by the scheduler ports: a base class, beta schedules, sigma conversions, option checks.

Each function mirrors one in diffusers, including its float32/float64 choices, so that the ports
reproduce diffusers' schedules to the last bit where that is cheap.
"""

import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from cair_runtime.errors import InvalidInputError
from cair_runtime.noise import Generators

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Sigma-schedule variants of diffusers' sigma-based schedulers that no port has: supported only off.
UNPORTED_SIGMA_OPTIONS: dict[str, object] = {
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "final_sigmas_type": "zero",
    "rescale_betas_zero_snr": False,
}
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def check_choice(option: str, value: object, choices: Sequence[object]) -> None:
    """Raise InvalidInputError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise InvalidInputError(
            f"scheduler option {option}={value!r} is not supported; expected one of "
            f"{', '.join(repr(c) for c in choices)}"
        )


def _torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    # torch.linspace(dtype=float32) on CPU casts start/end to float32, takes a float32 step, fills
    # the first half forward from start and the second half backward from end with a fused
    # multiply-add; np.linspace (float64) differs from it in the last bit of a third of the betas.
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    i = np.arange(steps)
    values = np.where(i < steps // 2, np.float64(start32) + step * i, np.float64(end32) - step * (steps - 1 - i))
    return values.astype(np.float32)


def _betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    # diffusers `betas_for_alpha_bar` with its default cosine alpha_bar (Nichol & Dhariwal 2021).
    def alpha_bar_fn(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar_fn(t2) / alpha_bar_fn(t1), max_beta))
    return np.array(betas, dtype=np.float32)


def make_betas(
    beta_schedule: str,
    beta_start: float,
    beta_end: float,
    num_train_timesteps: int,
    trained_betas: Sequence[float] | None,
) -> np.ndarray:
    """The training betas (float32), as every diffusers scheduler's ``__init__`` builds them."""
    if trained_betas is not None:
        try:
            betas = np.asarray(trained_betas, dtype=np.float32)
        except (TypeError, ValueError):
            betas = np.empty(0, dtype=np.float32)
        if betas.shape != (num_train_timesteps,) or not ((betas > 0) & (betas < 1)).all():
            raise InvalidInputError(f"scheduler option trained_betas must be {num_train_timesteps} numbers in (0, 1) "
                                    "(one per training timestep); re-export with the model's scheduler config")
        return betas
    check_choice("beta_schedule", beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
    if beta_schedule == "linear":
        return _torch_linspace_float32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        # the schedule of the latent diffusion models
        return _torch_linspace_float32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    return _betas_for_alpha_bar(num_train_timesteps)


def make_alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """``torch.cumprod(1 - betas)`` (float32): torch accumulates a float32 cumprod in float64."""
    alphas = 1.0 - betas
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def alphas_cumprod_to_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Karras-style noise levels ``sqrt((1 - alpha_bar) / alpha_bar)`` of the training timesteps, ascending."""
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of ``sigma`` by interpolation in log-sigma (diffusers `_sigma_to_t`)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]  # (num_train_timesteps, len(sigma))
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def karras_sigmas(
    in_sigmas: np.ndarray, num_inference_steps: int, sigma_min: float | None, sigma_max: float | None
) -> np.ndarray:
    """Noise levels of Karras et al. 2022 (eq. 5, rho = 7), float64 (diffusers `_convert_to_karras`)."""
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    rho = 7.0
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_alpha_sigma_t(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """VP-SDE ``alpha_t, sigma_t`` of a Karras-style ``sigma`` (diffusers `_sigma_to_alpha_sigma_t`)."""
    alpha_t = 1 / np.sqrt(sigma**2 + 1)
    return alpha_t, sigma * alpha_t


def sigma_to_lambda(sigma: np.float32) -> np.float32:
    """Half log-SNR ``log(alpha_t) - log(sigma_t)`` of a Karras-style ``sigma``; +inf at the final sigma 0."""
    alpha_t, sigma_t = sigma_to_alpha_sigma_t(sigma)
    with np.errstate(divide="ignore"):
        return np.log(alpha_t) - np.log(sigma_t)


def shift_flow_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """Flow-matching noise levels moved towards 1 by ``shift`` (SD3's ``shift * s / (1 + (shift - 1) * s)``),
    computed in the dtype of ``sigmas`` as diffusers' torch and numpy code computes it."""
    dtype = sigmas.dtype.type
    return dtype(shift) * sigmas / (1 + dtype(shift - 1) * sigmas)


def predict_x0(
    prediction_type: str, model_output: np.ndarray, sample: np.ndarray, alpha_t: np.float32, sigma_t: np.float32
) -> np.ndarray:
    """The data prediction x0 from a model output, where ``sample = alpha_t * x0 + sigma_t * epsilon``."""
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    if prediction_type == "sample":
        return model_output
    return alpha_t * sample - sigma_t * model_output  # "v_prediction"


def predict_epsilon(
    prediction_type: str, model_output: np.ndarray, sample: np.ndarray, alpha_t: np.float32, sigma_t: np.float32
) -> np.ndarray:
    """The noise prediction epsilon from a model output, where ``sample = alpha_t * x0 + sigma_t * epsilon``."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - alpha_t * model_output) / sigma_t
    return alpha_t * model_output + sigma_t * sample  # "v_prediction"


def index_for_timestep(timesteps: np.ndarray, timestep: float) -> int:
    """Step index of ``timestep`` in ``timesteps``, as diffusers' schedulers find it on their first step.

    Where the timestep occurs twice diffusers takes the second occurrence, so that a loop started
    in the middle of the schedule (image-to-image) does not skip a sigma.
    """
    candidates = np.flatnonzero(timesteps == timestep)
    if len(candidates) == 0:
        raise InvalidInputError(
            f"timestep {timestep} is not one of this scheduler's timesteps; pass the entries of "
            "scheduler.timesteps, in order, after set_timesteps"
        )
    return int(candidates[1] if len(candidates) > 1 else candidates[0])


class BaseScheduler:
    """What the denoising loop calls on every port: ``step``, the step index, the begin index, the input scaling.

    A port sets ``timesteps`` (and ``sigmas``) in ``set_timesteps`` and implements ``_step`` and
    ``add_noise``; ``step`` is the same for all. ``DiscreteScheduler`` adds diffusers' training betas;
    the flow-matching ports, which have none, derive from this directly.
    """

    order: ClassVar[int] = 1
    # diffusers options a port supports only at the value given (checked by make_scheduler)
    unported_options: ClassVar[dict[str, object]] = {}
    # a flow-matching sampler (x_t = (1 - sigma) * x0 + sigma * noise, a velocity model); make_scheduler
    # pairs these with flow-matching models only
    flow_matching: bool = False
    init_noise_sigma: float = 1.0  # latents are multiplied by this before the loop
    _step_index: int | None = None  # this step's index in timesteps, for the ports that count steps
    _begin_index: int | None = None  # the first step's index when a loop starts mid-schedule (image-to-image)
    timesteps: np.ndarray

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        rng: Generators | None = None,  # one generator, or one per batch row (cair_runtime.noise)
    ) -> np.ndarray:
        """One step from ``timestep`` (the entries of ``timesteps``, in order); returns ``prev_sample`` (float32).

        ``rng`` draws the noise of the stochastic samplers; the deterministic ports ignore it.
        """
        return self._step(model_output, timestep, sample, rng).astype(np.float32, copy=False)

    def _step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray,
              rng: Generators | None) -> np.ndarray:
        raise NotImplementedError

    def _init_step_index(self, timestep: float) -> int:
        """This step's index: the begin index, else found from ``timestep``, on the first step (diffusers'
        ``_init_step_index``), then counted."""
        if self._step_index is None:
            self._step_index = (index_for_timestep(self.timesteps, timestep) if self._begin_index is None
                                else self._begin_index)
        return self._step_index

    def set_begin_index(self, begin_index: int) -> None:
        """Start the loop at ``timesteps[begin_index]`` (diffusers' ``set_begin_index``, after ``set_timesteps``)."""
        self._begin_index = begin_index

    def _noise_index(self, timestep: float) -> int:
        # diffusers' add_noise of the sigma schedulers: the begin index before the first step, the
        # current index after it, the timestep's own index when no begin index was set
        if self._begin_index is None:
            return index_for_timestep(self.timesteps, timestep)
        return self._step_index if self._step_index is not None else self._begin_index

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        raise NotImplementedError

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        """The model's input: ``sample`` itself; only the Euler schedulers scale it."""
        return sample


class DiscreteScheduler(BaseScheduler):
    """Base of the noise-prediction ports: diffusers' training noise schedule, the options that place timesteps on it.

    Each port names its own diffusers options, with diffusers' defaults, in its ``__init__`` and
    passes the options every diffusers scheduler shares (training betas, prediction type, timestep
    placement) on to this one as keywords; ``make_scheduler`` gives each the options of a config
    that it names. A port implements ``_step``.
    """

    prediction_types: ClassVar[tuple[str, ...]] = PREDICTION_TYPES  # those the port supports
    default_timestep_spacing: ClassVar[str] = "linspace"  # the diffusers class's default

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
    ) -> None:
        # diffusers raises NotImplementedError for the prediction types a class lacks
        check_choice("prediction_type", prediction_type, self.prediction_types)
        timestep_spacing = timestep_spacing or self.default_timestep_spacing
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas)
        self.alphas_cumprod = make_alphas_cumprod(betas)
        self.timesteps = np.empty(0, dtype=np.int64)  # set by set_timesteps

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        """``original_samples`` noised to ``timestep`` (float32): port of DDIM's/PNDM's ``add_noise``,
        ``sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise``; the sigma schedulers override it."""
        alpha_prod = self.alphas_cumprod[int(timestep)]
        return (np.sqrt(alpha_prod) * original_samples + np.sqrt(1 - alpha_prod) * noise).astype(np.float32)

    def _spaced_timesteps(self, num_inference_steps: int) -> np.ndarray:
        # diffusers' DDIMScheduler.set_timesteps: int64, descending
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, self.num_train_timesteps - 1, num_inference_steps).round()[::-1]
        elif self.timestep_spacing == "leading":
            step_ratio = self.num_train_timesteps // num_inference_steps
            timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1] + self.steps_offset
        else:  # "trailing"
            step_ratio = self.num_train_timesteps / num_inference_steps
            timesteps = np.round(np.arange(self.num_train_timesteps, 0, -step_ratio)) - 1
        return timesteps.astype(np.int64)

    def _multistep_timesteps(self, num_inference_steps: int) -> np.ndarray:
        # diffusers' multistep solvers space num_inference_steps + 1 points and drop the last (t = 0);
        # "trailing" is DDIM's
        if self.timestep_spacing == "trailing":
            return self._spaced_timesteps(num_inference_steps)
        return self._spaced_timesteps(num_inference_steps + 1)[:-1]

    def _set_multistep_schedule(self, num_inference_steps: int, use_karras_sigmas: bool, sigma_min: float | None = None,
                                sigma_max: float | None = None, round_karras_timesteps: bool = True) -> None:
        # diffusers' DPM-Solver/UniPC set_timesteps: timesteps (int64, descending) and their sigmas
        # (float32) with a final sigma 0; Karras sigmas move the timesteps to match them
        timesteps = self._multistep_timesteps(num_inference_steps)
        sigmas = alphas_cumprod_to_sigmas(self.alphas_cumprod)
        if use_karras_sigmas:
            log_sigmas = np.log(sigmas)
            sigmas = karras_sigmas(sigmas[::-1], num_inference_steps, sigma_min, sigma_max)
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if round_karras_timesteps:
                timesteps = timesteps.round()
            if len(timesteps) > 1 and int(timesteps[0]) == int(timesteps[1]):
                # the first step's lookup takes the second occurrence and the loop runs past the end
                # (diffusers fails inside step() with an IndexError)
                raise InvalidInputError(f"the Karras sigmas from {sigmas[0]:.4g} down put the first steps of "
                                        f"{num_inference_steps} on the same training timestep {int(timesteps[0])}; "
                                        "lower sigma_max to the model's range or use a scheduler without Karras sigmas")
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.int64)
        self._begin_index = None

    def _add_noise_at_sigma(self, original_samples: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        # DPM-Solver's/UniPC's add_noise: alpha_t * x0 + sigma_t * noise at the step's Karras-style sigma
        alpha_t, sigma_t = sigma_to_alpha_sigma_t(self.sigmas[self._noise_index(timestep)])
        return (alpha_t * original_samples + sigma_t * noise).astype(np.float32)
