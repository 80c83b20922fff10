"""Port of diffusers `EulerDiscreteScheduler` (scheduling_euler_discrete.py)."""

from typing import Any, ClassVar

import numpy as np

from cair_runtime.schedulers._common import (
    UNPORTED_SIGMA_OPTIONS, DiscreteScheduler, alphas_cumprod_to_sigmas, karras_sigmas, sigma_to_t
)


class EulerDiscreteScheduler(DiscreteScheduler):
    """Port of diffusers `EulerDiscreteScheduler` (scheduling_euler_discrete.py); Karras et al. 2022, Algorithm 2.

    Without churn (diffusers' default ``s_churn=0``), so the sampler is deterministic and ``step``
    ignores ``rng``. The sample lives at the noise level ``sigma`` (``x = x0 + sigma * epsilon``),
    and the schedule, its initial noise and the input scaling are shared with the ancestral sampler,
    which subclasses this one.
    """

    unported_options: ClassVar[dict[str, object]] = {
        **UNPORTED_SIGMA_OPTIONS,
        "interpolation_type": "linear",
        "timestep_type": "discrete",
    }

    def __init__(
        self,
        use_karras_sigmas: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        **schedule: Any,
    ) -> None:
        super().__init__(**schedule)
        self.use_karras_sigmas = use_karras_sigmas
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        # before set_timesteps the schedule is every training step (init_noise_sigma reads it)
        train_sigmas = alphas_cumprod_to_sigmas(self.alphas_cumprod)[::-1]
        self.sigmas = np.concatenate([train_sigmas, np.zeros(1, dtype=np.float32)])
        self.timesteps = np.arange(self.num_train_timesteps - 1, -1, -1).astype(np.float32)
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
            # not rounded, unlike the other schedulers' timesteps
            timesteps = np.linspace(0, self.num_train_timesteps - 1, num_inference_steps, dtype=np.float32)[::-1]
        else:
            timesteps = self._spaced_timesteps(num_inference_steps).astype(np.float32)

        sigmas = alphas_cumprod_to_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(sigmas)
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)  # float64
        if self.use_karras_sigmas:
            sigmas = karras_sigmas(sigmas, num_inference_steps, self.sigma_min, self.sigma_max)
            timesteps = sigma_to_t(sigmas, log_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.float32)
        self._step_index = self._begin_index = None

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        """``original_samples`` noised to ``timestep``'s sigma: ``x0 + sigma * noise`` (diffusers' ``add_noise``)."""
        sigma = self.sigmas[self._noise_index(timestep)]
        return (original_samples + noise * sigma).astype(np.float32)

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        """Divide by ``sqrt(sigma**2 + 1)`` so that the model sees a unit-variance input."""
        self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return sample / np.sqrt(sigma**2 + 1)

    def _pred_original_sample(self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
        # the denoised x0 of k-diffusion
        if self.prediction_type == "sample":
            return model_output
        if self.prediction_type == "epsilon":
            return sample - sigma * model_output
        # "v_prediction": x0 = c_skip * x + c_out * v with the sample scaled by 1/sqrt(sigma^2+1)
        return model_output * (-sigma / np.sqrt(sigma**2 + 1)) + (sample / (sigma**2 + 1))

    def _step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray,
              rng: np.random.Generator | None) -> np.ndarray:
        """One Euler step from ``sigmas[i]`` to ``sigmas[i + 1]``; returns ``prev_sample`` (float32)."""
        self._init_step_index(timestep)
        sample = sample.astype(np.float32, copy=False)
        sigma = self.sigmas[self._step_index]
        sigma_hat = sigma  # s_churn = 0: gamma = 0, no noise is added back

        pred_original_sample = self._pred_original_sample(model_output, sample, sigma_hat)
        derivative = (sample - pred_original_sample) / sigma_hat
        dt = self.sigmas[self._step_index + 1] - sigma_hat
        prev_sample = sample + derivative * dt
        self._step_index += 1
        return prev_sample.astype(np.float32, copy=False)
