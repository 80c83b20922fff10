"""Port of diffusers `DPMSolverMultistepScheduler` (scheduling_dpmsolver_multistep.py), DPM-Solver++ 1S/2M."""

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from cair_runtime.schedulers._common import (
    DiscreteScheduler,
    alphas_cumprod_to_sigmas,
    check_choice,
    index_for_timestep,
    karras_sigmas,
    make_betas,
    predict_x0,
    sigma_to_alpha_sigma_t,
    sigma_to_lambda,
    sigma_to_t,
)


class DPMSolverMultistepScheduler(DiscreteScheduler):
    """Port of diffusers `DPMSolverMultistepScheduler` (scheduling_dpmsolver_multistep.py); Lu et al. 2022.

    Only the data-prediction solver ``algorithm_type="dpmsolver++"`` of order 1 or 2 ("DPM++ 2M",
    midpoint or heun) is ported, with diffusers' ``final_sigmas_type="zero"``, which makes the last
    step first order. It is deterministic and ignores ``rng``.
    """

    unported_options: ClassVar[dict[str, object]] = {
        "thresholding": False,
        "algorithm_type": "dpmsolver++",
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
    }

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        solver_type: str = "midpoint",
        use_karras_sigmas: bool = False,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ) -> None:
        check_choice("solver_order", solver_order, (1, 2))
        betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas)
        super().__init__(num_train_timesteps, betas, prediction_type, timestep_spacing, steps_offset)
        # diffusers maps the solver types of other multistep solvers onto "midpoint"
        check_choice("solver_type", solver_type, ("midpoint", "heun", "logrho", "bh1", "bh2"))
        self.beta_schedule = beta_schedule
        self.solver_order = solver_order
        self.solver_type = "heun" if solver_type == "heun" else "midpoint"
        self.use_karras_sigmas = use_karras_sigmas
        self.sigmas = np.empty(0, dtype=np.float32)
        self.model_outputs: list[np.ndarray | None] = [None] * solver_order
        self.lower_order_nums = 0
        self._step_index: int | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the timesteps (int64, descending) and sigmas; clears the multistep history."""
        timesteps = self._multistep_timesteps(num_inference_steps)
        sigmas = alphas_cumprod_to_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(sigmas)
        if self.use_karras_sigmas:
            sigmas = karras_sigmas(sigmas[::-1], num_inference_steps, None, None)
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if self.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.int64)
        self.model_outputs = [None] * self.solver_order
        self.lower_order_nums = 0
        self._step_index = None

    def _first_order_update(self, x0_pred: np.ndarray, sample: np.ndarray) -> np.ndarray:
        # DPM-Solver++(1S) = DDIM, eq. 5 of Lu et al. 2022b
        alpha_t, sigma_t = sigma_to_alpha_sigma_t(self.sigmas[self._step_index + 1])
        _, sigma_s = sigma_to_alpha_sigma_t(self.sigmas[self._step_index])
        h = sigma_to_lambda(self.sigmas[self._step_index + 1]) - sigma_to_lambda(self.sigmas[self._step_index])
        return (sigma_t / sigma_s) * sample - (alpha_t * (np.exp(-h) - 1.0)) * x0_pred

    def _second_order_update(self, sample: np.ndarray) -> np.ndarray:
        # DPM-Solver++(2M), Algorithm 2 of Lu et al. 2022b
        alpha_t, sigma_t = sigma_to_alpha_sigma_t(self.sigmas[self._step_index + 1])
        _, sigma_s0 = sigma_to_alpha_sigma_t(self.sigmas[self._step_index])
        lambda_t = sigma_to_lambda(self.sigmas[self._step_index + 1])
        lambda_s0 = sigma_to_lambda(self.sigmas[self._step_index])
        lambda_s1 = sigma_to_lambda(self.sigmas[self._step_index - 1])

        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)
        if self.solver_type == "midpoint":
            return (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (np.exp(-h) - 1.0)) * D0
                - 0.5 * (alpha_t * (np.exp(-h) - 1.0)) * D1
            )
        return (  # "heun"
            (sigma_t / sigma_s0) * sample
            - (alpha_t * (np.exp(-h) - 1.0)) * D0
            + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * D1
        )

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """One multistep DPM-Solver++ step; returns ``prev_sample`` (float32)."""
        if self._step_index is None:
            self._step_index = index_for_timestep(self.timesteps, timestep)
        # final_sigmas_type "zero": the step to sigma 0 is first order (diffusers' lower_order_final)
        lower_order_final = self._step_index == len(self.timesteps) - 1

        # DPM-Solver++ works on the data prediction x0
        alpha_s, sigma_s = sigma_to_alpha_sigma_t(self.sigmas[self._step_index])
        x0_pred = predict_x0(self.prediction_type, model_output, sample, alpha_s, sigma_s)
        self.model_outputs = self.model_outputs[1:] + [x0_pred]  # oldest first
        sample = sample.astype(np.float32, copy=False)

        if self.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self._first_order_update(x0_pred, sample)
        else:
            prev_sample = self._second_order_update(sample)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.solver_order)
        self._step_index += 1
        return prev_sample.astype(np.float32, copy=False)
