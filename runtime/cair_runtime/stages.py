"""Which UNet evaluations are planning and which are fidelity: CAIR's one scheduling rule."""

from __future__ import annotations

from cair_runtime.errors import InvalidInputError


def check_cache_step(cache_step: int, num_inference_steps: int) -> None:
    """n must lie in 1..T (n = T is the plain baseline)."""
    if not 1 <= cache_step <= num_inference_steps:
        raise InvalidInputError(
            f"cache step {cache_step} is outside 1..{num_inference_steps} (the number of steps); "
            f"use 1 <= n <= T, with n = T for the plain baseline", field="cache_step"
        )


def planning_evaluations(cache_step: int, num_inference_steps: int, num_evaluations: int) -> int:
    """How many of the loop's UNet evaluations run the planning graph.

    Evaluations 1..n plan and the rest are fidelity. ``n = T`` means the plain baseline, every
    evaluation planning, also for PNDM, whose PLMS warm-up evaluates the UNet T+1 times.
    """
    check_cache_step(cache_step, num_inference_steps)
    return num_evaluations if cache_step == num_inference_steps else cache_step
