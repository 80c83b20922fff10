"""Port of diffusers `PNDMScheduler` (scheduling_pndm.py)."""

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from cair_runtime.errors import InvalidInputError

from cair_runtime.schedulers._common import DiscreteScheduler, check_choice, make_betas, predict_epsilon


class PNDMScheduler(DiscreteScheduler):
    """Port of diffusers `PNDMScheduler` (scheduling_pndm.py); pseudo numerical methods, Liu et al. 2022.

    Runge-Kutta warm-up steps (PRK, four model evaluations per step) then linear multistep steps
    (PLMS); ``skip_prk_steps=True`` (Stable Diffusion's setting) starts with PLMS directly. The
    timesteps hold one entry per model evaluation. Deterministic; ``step`` ignores ``rng``.
    """

    pndm_order: ClassVar[int] = 4

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ) -> None:
        check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction"))
        betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas)
        super().__init__(num_train_timesteps, betas, prediction_type, timestep_spacing, steps_offset)
        self.skip_prk_steps = skip_prk_steps
        # the alpha product "before" step 0, used by the last step
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps = 0
        self.prk_timesteps = np.empty(0, dtype=np.int64)
        self._reset_state()

    def _reset_state(self) -> None:
        self.ets: list[np.ndarray] = []  # past model outputs (epsilons), oldest first
        self.counter = 0  # model evaluations so far
        self.cur_model_output: np.ndarray | float = 0  # Runge-Kutta running sum
        self.cur_sample: np.ndarray | None = None  # sample at the start of a multi-evaluation step

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the timesteps (int64, one per model evaluation); clears the multistep history."""
        if not self.skip_prk_steps and num_inference_steps < self.pndm_order:
            # The Runge-Kutta warm-up takes the last pndm_order timesteps (diffusers fails with a
            # broadcasting error below 4).
            raise InvalidInputError(f"PNDM without skip_prk_steps needs at least {self.pndm_order} steps, got "
                                    f"{num_inference_steps}; use more steps or another scheduler")
        self.num_inference_steps = num_inference_steps
        _timesteps = self._spaced_timesteps(num_inference_steps)[::-1]  # ascending; reversed again below

        if self.skip_prk_steps:
            # PLMS needs a first-order warm-up: the first timestep after the start is evaluated twice
            self.prk_timesteps = np.empty(0, dtype=np.int64)
            plms_timesteps = np.concatenate([_timesteps[:-1], _timesteps[-2:-1], _timesteps[-1:]])[::-1]
        else:
            # each of the first 3 steps runs 4 evaluations: at t, twice at the midpoint, at t - step
            prk_timesteps = np.array(_timesteps[-self.pndm_order :]).repeat(2) + np.tile(
                np.array([0, self.num_train_timesteps // num_inference_steps // 2]), self.pndm_order
            )
            self.prk_timesteps = prk_timesteps[:-1].repeat(2)[1:-1][::-1].copy()
            plms_timesteps = _timesteps[:-3][::-1]
        self.timesteps = np.concatenate([self.prk_timesteps, plms_timesteps]).astype(np.int64)
        self._reset_state()

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """One model evaluation's step (PRK during warm-up, else PLMS); returns ``prev_sample`` (float32)."""
        if self.counter < len(self.prk_timesteps) and not self.skip_prk_steps:
            prev_sample = self._step_prk(model_output, int(timestep), sample)
        else:
            prev_sample = self._step_plms(model_output, int(timestep), sample)
        self.counter += 1
        return prev_sample.astype(np.float32, copy=False)

    def _step_prk(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        # fourth-order Runge-Kutta, one stage per call: weights 1/6, 1/3, 1/3, 1/6
        diff_to_prev = 0 if self.counter % 2 else self.num_train_timesteps // self.num_inference_steps // 2
        prev_timestep = timestep - diff_to_prev
        timestep = self.prk_timesteps[self.counter // 4 * 4]

        if self.counter % 4 == 0:
            self.cur_model_output += 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif (self.counter - 1) % 4 == 0:
            self.cur_model_output += 1 / 3 * model_output
        elif (self.counter - 2) % 4 == 0:
            self.cur_model_output += 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0

        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        return self._get_prev_sample(cur_sample, timestep, prev_timestep, model_output)

    def _step_plms(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        # linear multistep (Adams-Bashforth) on the epsilons, order rising to 4 with the history
        prev_timestep = timestep - self.num_train_timesteps // self.num_inference_steps
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            # second evaluation of the warm-up: redo the first step from its start with the mean epsilon
            prev_timestep = timestep
            timestep = timestep + self.num_train_timesteps // self.num_inference_steps

        if len(self.ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:
            model_output = (model_output + self.ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(self.ets) == 2:
            model_output = (3 * self.ets[-1] - self.ets[-2]) / 2
        elif len(self.ets) == 3:
            model_output = (23 * self.ets[-1] - 16 * self.ets[-2] + 5 * self.ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * self.ets[-1] - 59 * self.ets[-2] + 37 * self.ets[-3] - 9 * self.ets[-4])
        return self._get_prev_sample(sample, timestep, prev_timestep, model_output)

    def _get_prev_sample(
        self, sample: np.ndarray, timestep: int, prev_timestep: int, model_output: np.ndarray
    ) -> np.ndarray:
        # eq. 9 of the PNDM paper: the transfer x_t -> x_(t - delta) given epsilon
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev

        alpha_t, sigma_t = np.sqrt(alpha_prod_t), np.sqrt(beta_prod_t)
        model_output = predict_epsilon(self.prediction_type, model_output, sample, alpha_t, sigma_t)

        sample_coeff = np.sqrt(alpha_prod_t_prev / alpha_prod_t)
        model_output_denom_coeff = alpha_prod_t * np.sqrt(beta_prod_t_prev) + np.sqrt(
            alpha_prod_t * beta_prod_t * alpha_prod_t_prev
        )
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / model_output_denom_coeff
