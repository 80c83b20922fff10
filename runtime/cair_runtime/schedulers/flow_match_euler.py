"""Port of diffusers `FlowMatchEulerDiscreteScheduler` (scheduling_flow_match_euler_discrete.py)."""

import math
from typing import ClassVar

import numpy as np

from cair_runtime.errors import InvalidInputError
from cair_runtime.noise import Generators, standard_normal
from cair_runtime.schedulers._common import BaseScheduler, check_choice, karras_sigmas, shift_flow_sigmas


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The dynamic shift ``mu`` for an image of ``image_seq_len`` latent tokens: linear in the token count from
    ``base_shift`` at ``base_seq_len`` to ``max_shift`` at ``max_seq_len`` (diffusers' Flux ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


class FlowMatchEulerDiscreteScheduler(BaseScheduler):
    """Port of diffusers `FlowMatchEulerDiscreteScheduler` (scheduling_flow_match_euler_discrete.py).

    Euler steps of a rectified flow (SD3, Flux, Sana's "flow-euler"): the sample lives at
    ``x = (1 - sigma) * x0 + sigma * noise``, the model predicts the velocity, and a step moves the
    sample along it from ``sigmas[i]`` to ``sigmas[i + 1]``. The timesteps are ``sigma * num_train_timesteps``
    (float32). A static ``shift``, or with ``use_dynamic_shifting`` a ``mu`` passed to ``set_timesteps``
    (``dynamic_shift_mu``), moves the noise levels towards 1. ``stochastic_sampling`` draws each step's
    noise from ``rng`` (as the ancestral Euler port does); otherwise ``step`` ignores ``rng``.
    """

    # beta sigmas need scipy's beta distribution, which the runtime does not depend on
    unported_options: ClassVar[dict[str, object]] = {"use_beta_sigmas": False}
    flow_matching = True

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ) -> None:
        if use_karras_sigmas and use_exponential_sigmas:
            raise InvalidInputError("scheduler options use_karras_sigmas and use_exponential_sigmas exclude each "
                                    "other; set at most one")
        check_choice("time_shift_type", time_shift_type, ("exponential", "linear"))
        self.num_train_timesteps = num_train_timesteps
        self.shift = shift
        self.use_dynamic_shifting = use_dynamic_shifting
        self.base_shift, self.max_shift = base_shift, max_shift
        self.base_image_seq_len, self.max_image_seq_len = base_image_seq_len, max_image_seq_len
        self.invert_sigmas = invert_sigmas
        self.shift_terminal = shift_terminal
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.time_shift_type = time_shift_type
        self.stochastic_sampling = stochastic_sampling

        # every training step, float32 as diffusers' torch tensors; the static shift applies here too,
        # so set_timesteps spaces its steps between shifted end points (and shifts them again)
        timesteps = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
        sigmas = timesteps / np.float32(num_train_timesteps)
        if not use_dynamic_shifting:
            sigmas = shift_flow_sigmas(sigmas, shift)
        self.timesteps = sigmas * np.float32(num_train_timesteps)
        self.sigmas = sigmas
        self.sigma_min = sigmas[-1].item()
        self.sigma_max = sigmas[0].item()

    def dynamic_shift_mu(self, image_seq_len: int) -> float:
        """``mu`` for ``set_timesteps`` under ``use_dynamic_shifting``, from the config's shift range and the image's
        latent token count (as diffusers' Flux pipeline computes it with ``calculate_shift``)."""
        return calculate_shift(image_seq_len, self.base_image_seq_len, self.max_image_seq_len,
                               self.base_shift, self.max_shift)

    def _time_shift(self, mu: float, sigmas: np.ndarray) -> np.ndarray:
        # diffusers' time_shift with sigma 1.0
        if self.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        return mu / (mu + (1 / sigmas - 1) ** 1.0)

    def set_timesteps(self, num_inference_steps: int, mu: float | None = None) -> None:
        """Choose the timesteps (float32, descending) and sigmas, ending at sigma 0; resets the step index.

        ``mu`` is the resolution-dependent shift of ``use_dynamic_shifting`` (required there, ignored otherwise).
        """
        if self.use_dynamic_shifting and mu is None:
            raise InvalidInputError("this flow-matching scheduler shifts its timesteps by the image size "
                                    "(use_dynamic_shifting): pass mu to set_timesteps (scheduler.dynamic_shift_mu)")
        n = self.num_train_timesteps
        sigmas = np.linspace(self.sigma_max * n, self.sigma_min * n, num_inference_steps) / n  # float64
        if self.use_dynamic_shifting:
            sigmas = self._time_shift(mu, sigmas)
        else:
            sigmas = shift_flow_sigmas(sigmas, self.shift)
        if self.shift_terminal:
            # stretch the schedule so that it ends at shift_terminal (diffusers' stretch_shift_to_terminal)
            one_minus_z = 1 - sigmas
            if one_minus_z[-1] == 0:  # one step at sigma 1: diffusers' stretch is 0 / 0 (NaN timesteps)
                raise InvalidInputError(f"{num_inference_steps} step(s) end the schedule at sigma 1, where "
                                        f"shift_terminal={self.shift_terminal} cannot stretch it; use more steps")
            scale_factor = one_minus_z[-1] / (1 - self.shift_terminal)
            sigmas = 1 - (one_minus_z / scale_factor)
        if self.use_karras_sigmas:
            sigmas = karras_sigmas(sigmas, num_inference_steps, None, None)
        elif self.use_exponential_sigmas:
            sigmas = np.exp(np.linspace(math.log(sigmas[0].item()), math.log(sigmas[-1].item()), num_inference_steps))

        sigmas = sigmas.astype(np.float32)
        if self.invert_sigmas:  # Mochi's: noise levels count up, the timesteps with them
            sigmas = np.float32(1) - sigmas
            final = np.ones(1, dtype=np.float32)
        else:
            final = np.zeros(1, dtype=np.float32)
        self.timesteps = sigmas * np.float32(n)
        self.sigmas = np.concatenate([sigmas, final])
        self._step_index = self._begin_index = None

    def scale_noise(self, sample: np.ndarray, timestep: float, noise: np.ndarray) -> np.ndarray:
        """``sample`` noised to ``timestep``'s sigma: ``sigma * noise + (1 - sigma) * sample`` (float32; diffusers'
        ``scale_noise``, the flow-matching forward process)."""
        sigma = self.sigmas[self._noise_index(timestep)]
        return (sigma * noise + (np.float32(1) - sigma) * sample).astype(np.float32)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        """``scale_noise`` with the other ports' argument order (image to image starts from it)."""
        return self.scale_noise(original_samples, timestep, noise)

    def _step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray,
              rng: Generators | None) -> np.ndarray:
        """One Euler step of the flow from ``sigmas[i]`` to ``sigmas[i + 1]``; returns ``prev_sample`` (float32)."""
        self._init_step_index(timestep)
        sample = sample.astype(np.float32, copy=False)
        sigma = self.sigmas[self._step_index]
        sigma_next = self.sigmas[self._step_index + 1]
        if self.stochastic_sampling:
            # jump to the predicted x0 and re-noise it to the next level with fresh noise
            x0 = sample - sigma * model_output
            noise = standard_normal(rng if rng is not None else np.random.default_rng(), sample.shape)
            prev_sample = (np.float32(1) - sigma_next) * x0 + sigma_next * noise
        else:
            prev_sample = sample + (sigma_next - sigma) * model_output
        self._step_index += 1
        return prev_sample.astype(np.float32, copy=False)
