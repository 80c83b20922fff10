"""Port of diffusers `DDIMScheduler` (scheduling_ddim.py), deterministic (eta = 0)."""

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from cair_runtime.schedulers._common import (
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    check_choice,
    make_alphas_cumprod,
    make_betas,
)


class DDIMScheduler:
    """Port of diffusers `DDIMScheduler` (scheduling_ddim.py); Song et al. 2020, eq. 12 with eta = 0.

    Only the deterministic sampler (diffusers' and the pipelines' default ``eta=0``) is ported, so
    ``step`` never draws noise and ignores ``rng``.
    """

    order: ClassVar[int] = 1
    # diffusers options this port supports only at the value given (checked by make_scheduler)
    unported_options: ClassVar[dict[str, object]] = {"thresholding": False, "rescale_betas_zero_snr": False}

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
    ) -> None:
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.num_train_timesteps = num_train_timesteps
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        self.steps_offset = steps_offset
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing

        betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas)
        self.alphas_cumprod = make_alphas_cumprod(betas)
        # the alpha product "before" step 0, used by the last step
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = 0
        self.timesteps = np.empty(0, dtype=np.int64)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose ``num_inference_steps`` timesteps (int64, descending) per ``timestep_spacing``."""
        self.num_inference_steps = num_inference_steps
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, self.num_train_timesteps - 1, num_inference_steps).round()[::-1]
        elif self.timestep_spacing == "leading":
            step_ratio = self.num_train_timesteps // num_inference_steps
            timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1] + self.steps_offset
        else:  # "trailing"
            step_ratio = self.num_train_timesteps / num_inference_steps
            timesteps = np.round(np.arange(self.num_train_timesteps, 0, -step_ratio)) - 1
        self.timesteps = timesteps.astype(np.int64)

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        """DDIM does not scale the model input."""
        return sample

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """One DDIM step from ``timestep`` to the previous one; returns ``prev_sample`` (float32)."""
        timestep = int(timestep)
        prev_timestep = timestep - self.num_train_timesteps // self.num_inference_steps

        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t

        # "predicted x_0" and "direction pointing to x_t" of eq. 12
        if self.prediction_type == "epsilon":
            pred_original_sample = (sample - np.sqrt(beta_prod_t) * model_output) / np.sqrt(alpha_prod_t)
            pred_epsilon = model_output
        elif self.prediction_type == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - np.sqrt(alpha_prod_t) * pred_original_sample) / np.sqrt(beta_prod_t)
        else:  # "v_prediction"
            pred_original_sample = np.sqrt(alpha_prod_t) * sample - np.sqrt(beta_prod_t) * model_output
            pred_epsilon = np.sqrt(alpha_prod_t) * model_output + np.sqrt(beta_prod_t) * sample

        if self.clip_sample:
            pred_original_sample = np.clip(pred_original_sample, -self.clip_sample_range, self.clip_sample_range)

        # eta = 0: no variance term, the direction takes all of 1 - alpha_prod_t_prev
        pred_sample_direction = np.sqrt(1 - alpha_prod_t_prev) * pred_epsilon
        prev_sample = np.sqrt(alpha_prod_t_prev) * pred_original_sample + pred_sample_direction
        return prev_sample.astype(np.float32, copy=False)
