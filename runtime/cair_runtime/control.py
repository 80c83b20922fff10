"""ControlNet requests: per net a scale, a start and an end, and guess mode, as diffusers defines them.

Numpy only (the runtime's side): which nets act at each step (``controlnet_keep``) and the factor each
residual of each net is multiplied by (``residual_scales``). ``cair_export.core.controlnet`` runs the
same requests through diffusers' own ``ControlNetModel`` arguments in the torch reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cair_runtime.errors import InvalidInputError


@dataclass(frozen=True)
class ControlRequest:
    """How a generation uses its ControlNets: one scale, start and end per net, and guess mode."""

    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]
    guess_mode: bool = False

    @classmethod
    def make(cls, count: int, scale: float | Sequence[float] = 1.0, start: float | Sequence[float] = 0.0,
             end: float | Sequence[float] = 1.0, guess_mode: bool = False) -> ControlRequest:
        """Broadcast single values to ``count`` nets, as diffusers does, and check them."""
        def per_net(value, name):
            values = tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * count
            if len(values) != count:
                raise InvalidInputError(f"{len(values)} {name} values for {count} ControlNets; give one, or one each",
                                        field=name)
            return values

        request = cls(per_net(scale, "control_scale"), per_net(start, "control_guidance_start"),
                      per_net(end, "control_guidance_end"), bool(guess_mode))
        for start_j, end_j in zip(request.starts, request.ends):
            if not 0.0 <= start_j < end_j <= 1.0:
                raise InvalidInputError(f"control guidance start {start_j} and end {end_j}: need 0 <= start < end <= 1",
                                        field="control_guidance_start")
        return request


def controlnet_keep(evaluations: int, starts: Sequence[float], ends: Sequence[float]) -> list[list[float]]:
    """Per evaluation i, per net: 1.0 where the net acts, 0.0 outside its start/end (diffusers' formula)."""
    return [[1.0 - float(i / evaluations < start or (i + 1) / evaluations > end) for start, end in zip(starts, ends)]
            for i in range(evaluations)]


def residual_scales(keep: Sequence[float], request: ControlRequest, residuals: int, batch: int,
                    guided: bool) -> np.ndarray:
    """(batch, nets, residuals) float32: the factor on residual r of net j for each row of an evaluation.

    ``scale_j * keep_j``; in guess mode times ``logspace(-1, 0, residuals)`` (shallow to deep, the mid
    block's last, as ``ControlNetModel`` scales them), and on a guided evaluation (rows: unconditional
    half first) zero for the unconditional half, which diffusers gives no residuals in guess mode.
    """
    base = np.asarray(request.scales, np.float64) * np.asarray(keep, np.float64)  # (nets,)
    ramp = np.logspace(-1, 0, residuals) if request.guess_mode else np.ones(residuals)
    scales = np.broadcast_to(base[:, None] * ramp[None, :], (batch, len(base), residuals)).astype(np.float32)
    if request.guess_mode and guided:
        scales = scales.copy()
        scales[: batch // 2] = 0.0
    return scales
