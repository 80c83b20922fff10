"""Port of diffusers `EulerAncestralDiscreteScheduler` (scheduling_euler_ancestral_discrete.py)."""

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from cair_runtime.schedulers._common import (
    TIMESTEP_SPACINGS,
    check_choice,
    index_for_timestep,
    make_alphas_cumprod,
    make_betas,
)


class EulerAncestralDiscreteScheduler:
    """Port of diffusers `EulerAncestralDiscreteScheduler` (scheduling_euler_ancestral_discrete.py).

    Ancestral sampling with Euler steps (k-diffusion's ``sample_euler_ancestral``): each step goes
    down to ``sigma_down`` deterministically and adds fresh noise of standard deviation
    ``sigma_up``. The noise is ``rng.standard_normal(sample.shape, dtype=np.float32)``, one draw
    per step, so a seeded ``rng`` makes the loop reproducible; with ``rng=None`` it comes from a
    fresh, unseeded ``np.random.default_rng()`` and every run differs.
    """

    order: ClassVar[int] = 1
    # diffusers options this port supports only at the value given (checked by make_scheduler)
    unported_options: ClassVar[dict[str, object]] = {"rescale_betas_zero_snr": False}

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ) -> None:
        # diffusers raises NotImplementedError for "sample"
        check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction"))
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.num_train_timesteps = num_train_timesteps
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset

        betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas)
        self.alphas_cumprod = make_alphas_cumprod(betas)
        # before set_timesteps the schedule is every training step (init_noise_sigma reads it)
        train_sigmas = np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)[::-1]
        self.sigmas = np.concatenate([train_sigmas, np.zeros(1, dtype=np.float32)])
        self.timesteps = np.arange(num_train_timesteps - 1, -1, -1).astype(np.float64)
        self._step_index: int | None = None

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise: the largest sigma, as the variance-preserving scale for "leading"."""
        max_sigma = self.sigmas.max()
        if self.timestep_spacing in ("linspace", "trailing"):
            return float(max_sigma)
        return float(np.sqrt(max_sigma**2 + 1))

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the timesteps (float32, descending) and their sigmas; resets the step index."""
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, self.num_train_timesteps - 1, num_inference_steps, dtype=np.float32)[::-1]
        elif self.timestep_spacing == "leading":
            step_ratio = self.num_train_timesteps // num_inference_steps
            timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].astype(np.float32)
            timesteps += self.steps_offset
        else:  # "trailing"
            step_ratio = self.num_train_timesteps / num_inference_steps
            timesteps = np.arange(self.num_train_timesteps, 0, -step_ratio).round().astype(np.float32) - 1

        sigmas = np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)  # float64
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = timesteps.copy()
        self._step_index = None

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        """Divide by ``sqrt(sigma**2 + 1)`` so that the model sees a unit-variance input."""
        if self._step_index is None:
            self._step_index = index_for_timestep(self.timesteps, timestep)
        sigma = self.sigmas[self._step_index]
        return sample / np.sqrt(sigma**2 + 1)

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """One ancestral Euler step; draws the step's noise from ``rng``; returns ``prev_sample`` (float32)."""
        if self._step_index is None:
            self._step_index = index_for_timestep(self.timesteps, timestep)
        sigma = self.sigmas[self._step_index]
        sample = sample.astype(np.float32, copy=False)

        if self.prediction_type == "epsilon":
            pred_original_sample = sample - sigma * model_output
        else:  # "v_prediction"
            pred_original_sample = model_output * (-sigma / np.sqrt(sigma**2 + 1)) + (sample / (sigma**2 + 1))

        # split the step to sigma_to into a deterministic part down to sigma_down and fresh noise
        # sigma_up, with sigma_down**2 + sigma_up**2 = sigma_to**2
        sigma_from = self.sigmas[self._step_index]
        sigma_to = self.sigmas[self._step_index + 1]
        sigma_up = np.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
        sigma_down = np.sqrt(sigma_to**2 - sigma_up**2)

        derivative = (sample - pred_original_sample) / sigma
        dt = sigma_down - sigma
        prev_sample = sample + derivative * dt

        rng = rng if rng is not None else np.random.default_rng()
        noise = rng.standard_normal(model_output.shape, dtype=np.float32)
        prev_sample = prev_sample + noise * sigma_up
        self._step_index += 1
        return prev_sample.astype(np.float32, copy=False)
