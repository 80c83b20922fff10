"""Pieces shared by the scheduler ports: beta schedules, sigma conversions, option checks.

Each function mirrors one in diffusers, including its float32/float64 choices, so that the ports
reproduce diffusers' schedules to the last bit where that is cheap.
"""

import math
from collections.abc import Sequence

import numpy as np

from cair_runtime.errors import InvalidInputError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
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
        return np.asarray(trained_betas, dtype=np.float32)
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
