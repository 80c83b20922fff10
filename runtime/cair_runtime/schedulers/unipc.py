"""Port of diffusers `UniPCMultistepScheduler` (scheduling_unipc_multistep.py)."""

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from cair_runtime.schedulers._common import (
    UNPORTED_SIGMA_OPTIONS, DiscreteScheduler, check_choice, predict_x0, sigma_to_alpha_sigma_t, sigma_to_lambda
)


class UniPCMultistepScheduler(DiscreteScheduler):
    """Port of diffusers `UniPCMultistepScheduler` (scheduling_unipc_multistep.py); Zhao et al. 2023.

    Each step first corrects the current sample with the new model output (UniC), then predicts
    the next one (UniP), both in data prediction (diffusers' ``predict_x0=True``) with the
    ``B(h)`` of ``solver_type`` "bh1" or "bh2". Deterministic; ``step`` ignores ``rng``.
    """

    unported_options: ClassVar[dict[str, object]] = {
        **UNPORTED_SIGMA_OPTIONS,
        "thresholding": False,
        "predict_x0": True,
        # False raises order 2+ on the step to sigma 0, where diffusers' coefficients are inf/singular
        "lower_order_final": True,
        "solver_p": None,
        "use_flow_sigmas": False,
        "use_dynamic_shifting": False,
        "shift_terminal": None,
    }

    def __init__(
        self,
        solver_order: int = 2,
        solver_type: str = "bh2",
        disable_corrector: Sequence[int] = (),
        use_karras_sigmas: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        **schedule: Any,
    ) -> None:
        super().__init__(**schedule)
        # diffusers maps the solver types of DPM-Solver onto "bh2"
        check_choice("solver_type", solver_type, ("bh1", "bh2", "midpoint", "heun", "logrho"))
        self.solver_order = solver_order
        self.solver_type = "bh1" if solver_type == "bh1" else "bh2"
        self.disable_corrector = tuple(disable_corrector)
        self.use_karras_sigmas = use_karras_sigmas
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigmas = np.empty(0, dtype=np.float32)
        self._reset_state()

    def _reset_state(self) -> None:
        self.model_outputs: list[np.ndarray | None] = [None] * self.solver_order  # x0 predictions, oldest first
        self.lower_order_nums = 0  # steps taken, up to solver_order: the warm-up of the multistep
        self.this_order = 1
        self.last_sample: np.ndarray | None = None  # the sample the last prediction started from
        self._step_index: int | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the timesteps (int64, descending) and sigmas; clears the multistep history."""
        self._set_multistep_schedule(num_inference_steps, self.use_karras_sigmas, self.sigma_min, self.sigma_max)
        self._reset_state()

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        """``original_samples`` noised to ``timestep``: ``alpha_t * x0 + sigma_t * noise`` (diffusers' ``add_noise``)."""
        return self._add_noise_at_sigma(original_samples, noise, timestep)

    def _coefficients(self, h: np.float32, rks: list[np.float32], order: int) -> tuple:
        # h*phi_1(-h), B(h), and the linear system R rho = b of the order conditions (Zhao et al., eq. 8)
        rks = np.stack(rks + [np.float32(1.0)])
        hh = -h  # data prediction
        h_phi_1 = np.expm1(hh)  # e^hh - 1
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        B_h = hh if self.solver_type == "bh1" else np.expm1(hh)
        R, b = [], []
        for i in range(1, order + 1):
            R.append(rks ** (i - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        return h_phi_1, B_h, np.stack(R), np.stack(b)

    def _predictor_update(self, sample: np.ndarray, order: int) -> np.ndarray:
        # UniP: from sigmas[i] to sigmas[i + 1] with the last `order` x0 predictions
        i = self._step_index
        m0 = self.model_outputs[-1]
        alpha_t, sigma_t = sigma_to_alpha_sigma_t(self.sigmas[i + 1])
        _, sigma_s0 = sigma_to_alpha_sigma_t(self.sigmas[i])
        lambda_s0 = sigma_to_lambda(self.sigmas[i])
        h = sigma_to_lambda(self.sigmas[i + 1]) - lambda_s0

        rks, D1s = [], []
        for k in range(1, order):
            rk = (sigma_to_lambda(self.sigmas[i - k]) - lambda_s0) / h
            rks.append(rk)
            D1s.append((self.model_outputs[-(k + 1)] - m0) / rk)
        h_phi_1, B_h, R, b = self._coefficients(h, rks, order)

        x_t_ = sigma_t / sigma_s0 * sample - alpha_t * h_phi_1 * m0
        if not D1s:
            # diffusers subtracts alpha_t * B_h * 0 here, which is NaN on the last step with bh1 (B_h = -inf)
            return x_t_
        if order == 2:
            rhos_p = np.array([0.5], dtype=np.float32)
        else:
            rhos_p = np.linalg.solve(R[:-1, :-1], b[:-1]).astype(np.float32)
        pred_res = sum(rho * D1 for rho, D1 in zip(rhos_p, D1s))
        return x_t_ - alpha_t * B_h * pred_res

    def _corrector_update(self, this_model_output: np.ndarray, order: int) -> np.ndarray:
        # UniC: redo the last step, from last_sample at sigmas[i - 1] to sigmas[i], with the new x0 prediction
        i = self._step_index
        m0 = self.model_outputs[-1]
        alpha_t, sigma_t = sigma_to_alpha_sigma_t(self.sigmas[i])
        _, sigma_s0 = sigma_to_alpha_sigma_t(self.sigmas[i - 1])
        lambda_s0 = sigma_to_lambda(self.sigmas[i - 1])
        h = sigma_to_lambda(self.sigmas[i]) - lambda_s0

        rks, D1s = [], []
        for k in range(1, order):
            rk = (sigma_to_lambda(self.sigmas[i - (k + 1)]) - lambda_s0) / h
            rks.append(rk)
            D1s.append((self.model_outputs[-(k + 1)] - m0) / rk)
        h_phi_1, B_h, R, b = self._coefficients(h, rks, order)

        if order == 1:
            rhos_c = np.array([0.5], dtype=np.float32)
        else:
            rhos_c = np.linalg.solve(R, b).astype(np.float32)
        x_t_ = sigma_t / sigma_s0 * self.last_sample - alpha_t * h_phi_1 * m0
        corr_res = sum(rho * D1 for rho, D1 in zip(rhos_c[:-1], D1s))
        D1_t = this_model_output - m0
        return x_t_ - alpha_t * B_h * (corr_res + rhos_c[-1] * D1_t)

    def _step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray,
              rng: np.random.Generator | None) -> np.ndarray:
        """Correct ``sample`` with the new model output, then predict the next one; returns it (float32)."""
        self._init_step_index(timestep)
        use_corrector = (
            self._step_index > 0
            and self._step_index - 1 not in self.disable_corrector
            and self.last_sample is not None
        )
        # UniPC (predict_x0) works on the data prediction x0
        alpha_s, sigma_s = sigma_to_alpha_sigma_t(self.sigmas[self._step_index])
        x0_pred = predict_x0(self.prediction_type, model_output, sample, alpha_s, sigma_s)
        if use_corrector:
            sample = self._corrector_update(x0_pred, self.this_order)

        self.model_outputs = self.model_outputs[1:] + [x0_pred]
        # lower_order_final: the order never exceeds the steps left, so the step to sigma 0 is first order
        this_order = min(self.solver_order, len(self.timesteps) - self._step_index)
        self.this_order = min(this_order, self.lower_order_nums + 1)  # warm-up of the multistep
        self.last_sample = sample
        prev_sample = self._predictor_update(sample, self.this_order)

        self.lower_order_nums = min(self.lower_order_nums + 1, self.solver_order)
        self._step_index += 1
        return prev_sample.astype(np.float32, copy=False)
