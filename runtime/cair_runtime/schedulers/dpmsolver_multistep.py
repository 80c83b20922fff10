"""Port of diffusers `DPMSolverMultistepScheduler` (scheduling_dpmsolver_multistep.py), DPM-Solver++ 1S/2M."""

from typing import Any, ClassVar

import numpy as np

from cair_runtime.errors import InvalidInputError
from cair_runtime.schedulers._common import (
    PREDICTION_TYPES, UNPORTED_SIGMA_OPTIONS, DiscreteScheduler, check_choice, predict_x0, shift_flow_sigmas,
    sigma_to_alpha_sigma_t
)


class DPMSolverMultistepScheduler(DiscreteScheduler):
    """Port of diffusers `DPMSolverMultistepScheduler` (scheduling_dpmsolver_multistep.py); Lu et al. 2022.

    Only the data-prediction solver ``algorithm_type="dpmsolver++"`` of order 1 or 2 ("DPM++ 2M",
    midpoint or heun) is ported, with diffusers' ``final_sigmas_type="zero"``, which makes the last
    step first order. It is deterministic and ignores ``rng``.

    ``use_flow_sigmas`` makes it a flow-matching solver (Sana's default scheduler): noise levels
    ``1 - 1/T .. 0`` evenly spaced and moved by ``flow_shift``, ``alpha_t = 1 - sigma``, ``sigma_t = sigma``,
    and with ``prediction_type="flow_prediction"`` the model predicts the velocity, ``x0 = x - sigma * v``.
    Under ``use_dynamic_shifting`` a ``mu`` passed to ``set_timesteps`` sets ``flow_shift = exp(mu)``.
    """

    unported_options: ClassVar[dict[str, object]] = {
        **UNPORTED_SIGMA_OPTIONS,
        "thresholding": False,
        "algorithm_type": "dpmsolver++",
        "use_lu_lambdas": False,
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "time_shift_type": "exponential",
    }
    prediction_types: ClassVar[tuple[str, ...]] = (*PREDICTION_TYPES, "flow_prediction")

    def __init__(self, solver_order: int = 2, solver_type: str = "midpoint", use_karras_sigmas: bool = False,
                 sigma_min: float | None = None, sigma_max: float | None = None, use_flow_sigmas: bool = False,
                 flow_shift: float = 1.0, use_dynamic_shifting: bool = False, **schedule: Any) -> None:
        check_choice("solver_order", solver_order, (1, 2))
        super().__init__(**schedule)
        if use_karras_sigmas and self.beta_schedule == "squaredcos_cap_v2":
            # The cosine schedule's last sigma (about 2e4) puts most Karras timesteps on 998; the step
            # lookup then runs past the end (diffusers' own loop fails the same way, inside step()).
            raise InvalidInputError("Karras sigmas (dpm++2m-karras) do not work with this model's squaredcos_cap_v2 "
                                    "betas: most timesteps fall on the same training step; use dpm++2m, unipc or ddim")
        if use_karras_sigmas and use_flow_sigmas:
            # diffusers takes the Karras sigmas of the betas and the flow's alpha_t = 1 - sigma: no schedule at all
            raise InvalidInputError("Karras sigmas (dpm++2m-karras) do not work with this model's flow sigmas "
                                    "(use_flow_sigmas); use dpm++2m")
        # diffusers maps the solver types of other multistep solvers onto "midpoint"
        check_choice("solver_type", solver_type, ("midpoint", "heun", "logrho", "bh1", "bh2"))
        self.solver_order = solver_order
        self.solver_type = "heun" if solver_type == "heun" else "midpoint"
        self.use_karras_sigmas = use_karras_sigmas
        # diffusers' _convert_to_karras reads sigma_min/sigma_max from the config (a model's Euler config has them)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.use_flow_sigmas = self.flow_matching = use_flow_sigmas
        self.flow_shift = flow_shift
        self.use_dynamic_shifting = use_dynamic_shifting
        self.sigmas = np.empty(0, dtype=np.float32)
        self.model_outputs: list[np.ndarray | None] = [None] * solver_order
        self.lower_order_nums = 0
        self._step_index: int | None = None

    def set_timesteps(self, num_inference_steps: int, mu: float | None = None) -> None:
        """Choose the timesteps (int64, descending) and sigmas; clears the multistep history.

        ``mu`` (``use_dynamic_shifting`` only) sets ``flow_shift = exp(mu)``, for this and later calls, as
        diffusers does.
        """
        if mu is not None:
            if not self.use_dynamic_shifting:
                raise InvalidInputError("mu (a resolution-dependent flow shift) needs use_dynamic_shifting in the "
                                        "scheduler config")
            self.flow_shift = np.exp(mu)
        if self.use_flow_sigmas:
            # 1 - alpha for alpha from 1 to 1/T, shifted, descending, without the final 0; the
            # timesteps are sigma * T truncated to integers
            alphas = np.linspace(1, 1 / self.num_train_timesteps, num_inference_steps + 1)
            sigmas = np.flip(shift_flow_sigmas(1.0 - alphas, self.flow_shift))[:-1]
            self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
            self.timesteps = (sigmas * self.num_train_timesteps).astype(np.int64)
            self._begin_index = None
        else:
            # diffusers rounds the Karras timesteps except under the cosine schedule
            self._set_multistep_schedule(num_inference_steps, self.use_karras_sigmas, self.sigma_min, self.sigma_max,
                                         round_karras_timesteps=self.beta_schedule != "squaredcos_cap_v2")
        self.model_outputs = [None] * self.solver_order
        self.lower_order_nums = 0
        self._step_index = None

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        """``original_samples`` noised to ``timestep``: ``alpha_t * x0 + sigma_t * noise`` (diffusers' ``add_noise``)."""
        alpha_t, sigma_t = self._alpha_sigma_t(self.sigmas[self._noise_index(timestep)])
        return (alpha_t * original_samples + sigma_t * noise).astype(np.float32)

    def _alpha_sigma_t(self, sigma: np.float32) -> tuple[np.float32, np.float32]:
        # diffusers' _sigma_to_alpha_sigma_t: the flow's (1 - sigma, sigma), else the VP-SDE's of a Karras sigma
        if self.use_flow_sigmas:
            return 1 - sigma, sigma
        return sigma_to_alpha_sigma_t(sigma)

    def _lambda(self, sigma: np.float32) -> np.float32:
        # half log-SNR log(alpha_t) - log(sigma_t); +inf at the final sigma 0
        alpha_t, sigma_t = self._alpha_sigma_t(sigma)
        with np.errstate(divide="ignore"):
            return np.log(alpha_t) - np.log(sigma_t)

    def _first_order_update(self, x0_pred: np.ndarray, sample: np.ndarray) -> np.ndarray:
        # DPM-Solver++(1S) = DDIM, eq. 5 of Lu et al. 2022b
        alpha_t, sigma_t = self._alpha_sigma_t(self.sigmas[self._step_index + 1])
        _, sigma_s = self._alpha_sigma_t(self.sigmas[self._step_index])
        h = self._lambda(self.sigmas[self._step_index + 1]) - self._lambda(self.sigmas[self._step_index])
        return (sigma_t / sigma_s) * sample - (alpha_t * (np.exp(-h) - 1.0)) * x0_pred

    def _second_order_update(self, sample: np.ndarray) -> np.ndarray:
        # DPM-Solver++(2M), Algorithm 2 of Lu et al. 2022b
        alpha_t, sigma_t = self._alpha_sigma_t(self.sigmas[self._step_index + 1])
        _, sigma_s0 = self._alpha_sigma_t(self.sigmas[self._step_index])
        lambda_t = self._lambda(self.sigmas[self._step_index + 1])
        lambda_s0 = self._lambda(self.sigmas[self._step_index])
        lambda_s1 = self._lambda(self.sigmas[self._step_index - 1])

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

    def _step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray,
              rng: np.random.Generator | None) -> np.ndarray:
        """One multistep DPM-Solver++ step; returns ``prev_sample`` (float32)."""
        self._init_step_index(timestep)
        # final_sigmas_type "zero": the step to sigma 0 is first order (diffusers' lower_order_final)
        lower_order_final = self._step_index == len(self.timesteps) - 1

        # DPM-Solver++ works on the data prediction x0
        if self.prediction_type == "flow_prediction":  # x0 = x - sigma * v, at the schedule's own sigma
            x0_pred = sample - self.sigmas[self._step_index] * model_output
        else:
            alpha_s, sigma_s = self._alpha_sigma_t(self.sigmas[self._step_index])
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
