"""Port of diffusers `DDIMScheduler` (scheduling_ddim.py), deterministic (eta = 0)."""

from typing import Any, ClassVar

import numpy as np

from cair_runtime.schedulers._common import DiscreteScheduler, predict_epsilon, predict_x0


class DDIMScheduler(DiscreteScheduler):
    """Port of diffusers `DDIMScheduler` (scheduling_ddim.py); Song et al. 2020, eq. 12 with eta = 0.

    Only the deterministic sampler (diffusers' and the pipelines' default ``eta=0``) is ported, so
    ``step`` never draws noise and ignores ``rng``.
    """

    unported_options: ClassVar[dict[str, object]] = {"thresholding": False, "rescale_betas_zero_snr": False}
    default_timestep_spacing: ClassVar[str] = "leading"

    def __init__(
        self, clip_sample: bool = True, set_alpha_to_one: bool = True, clip_sample_range: float = 1.0, **schedule: Any
    ) -> None:
        super().__init__(**schedule)
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        # the alpha product "before" step 0, used by the last step
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose ``num_inference_steps`` timesteps (int64, descending) per ``timestep_spacing``."""
        self.num_inference_steps = num_inference_steps
        self.timesteps = self._spaced_timesteps(num_inference_steps)

    def _step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray,
              rng: np.random.Generator | None) -> np.ndarray:
        """One DDIM step from ``timestep`` to the previous one; returns ``prev_sample`` (float32)."""
        timestep = int(timestep)
        prev_timestep = timestep - self.num_train_timesteps // self.num_inference_steps

        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t

        # "predicted x_0" and "direction pointing to x_t" of eq. 12
        alpha_t, sigma_t = np.sqrt(alpha_prod_t), np.sqrt(beta_prod_t)
        pred_original_sample = predict_x0(self.prediction_type, model_output, sample, alpha_t, sigma_t)
        pred_epsilon = predict_epsilon(self.prediction_type, model_output, sample, alpha_t, sigma_t)

        if self.clip_sample:
            pred_original_sample = np.clip(pred_original_sample, -self.clip_sample_range, self.clip_sample_range)

        # eta = 0: no variance term, the direction takes all of 1 - alpha_prod_t_prev
        pred_sample_direction = np.sqrt(1 - alpha_prod_t_prev) * pred_epsilon
        prev_sample = np.sqrt(alpha_prod_t_prev) * pred_original_sample + pred_sample_direction
        return prev_sample.astype(np.float32, copy=False)
