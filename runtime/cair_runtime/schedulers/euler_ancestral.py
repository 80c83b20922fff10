"""Port of diffusers `EulerAncestralDiscreteScheduler` (scheduling_euler_ancestral_discrete.py)."""

from typing import Any, ClassVar

import numpy as np

from cair_runtime.noise import Generators, standard_normal
from cair_runtime.schedulers.euler import EulerDiscreteScheduler


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    """Port of diffusers `EulerAncestralDiscreteScheduler` (scheduling_euler_ancestral_discrete.py).

    Ancestral sampling with Euler steps (k-diffusion's ``sample_euler_ancestral``): each step goes
    down to ``sigma_down`` deterministically and adds fresh noise of standard deviation
    ``sigma_up``. The noise is ``rng.standard_normal(sample.shape, dtype=np.float32)``, one draw
    per step, so a seeded ``rng`` makes the loop reproducible; with a list of generators, row k
    comes from generator k (``cair_runtime.noise``, diffusers' list-of-generators semantics); with
    ``rng=None`` it comes from a fresh, unseeded ``np.random.default_rng()`` and every run differs.

    The schedule is the Euler scheduler's without Karras sigmas: diffusers' ancestral scheduler has
    no ``use_karras_sigmas`` option, so it takes none here and ignores one in a config.
    """

    unported_options: ClassVar[dict[str, object]] = {"rescale_betas_zero_snr": False}
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")

    def __init__(self, **schedule: Any) -> None:
        super().__init__(**schedule)
        self.timesteps = self.timesteps.astype(np.float64)  # diffusers' dtype until set_timesteps

    def _step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray,
              rng: Generators | None) -> np.ndarray:
        """One ancestral Euler step; draws the step's noise from ``rng``; returns ``prev_sample`` (float32)."""
        self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        sample = sample.astype(np.float32, copy=False)
        pred_original_sample = self._pred_original_sample(model_output, sample, sigma)

        # split the step to sigma_to into a deterministic part down to sigma_down and fresh noise
        # sigma_up, with sigma_down**2 + sigma_up**2 = sigma_to**2
        sigma_from = self.sigmas[self._step_index]
        sigma_to = self.sigmas[self._step_index + 1]
        sigma_up = np.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
        sigma_down = np.sqrt(sigma_to**2 - sigma_up**2)

        derivative = (sample - pred_original_sample) / sigma
        dt = sigma_down - sigma
        prev_sample = sample + derivative * dt

        noise = standard_normal(rng if rng is not None else np.random.default_rng(), model_output.shape)
        prev_sample = prev_sample + noise * sigma_up
        self._step_index += 1
        return prev_sample.astype(np.float32, copy=False)
