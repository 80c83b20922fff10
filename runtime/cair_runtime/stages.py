"""Which UNet evaluations are planning, fidelity or shallow, and which are guided: the one scheduling rule."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from cair_runtime.checks import is_integer
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


# --- the whole schedule: cache step n, guidance stop m, deep interval k ------------------------

SKIP_MODES = ("uniform", "non-uniform")  # DeepCache's two ways of placing the full steps
NON_UNIFORM_POW = 1.4  # DeepCache's exponent for its non-uniform schedule
NON_UNIFORM_CENTER = 0.3  # its centre, 15 of 50 steps, as a fraction of the steps it schedules


@dataclass(frozen=True)
class Evaluation:
    """One UNet evaluation of the loop: which graph, and whether it runs guided."""

    kind: str  # "planning" | "fidelity" (full UNet, emits the deep feature) | "shallow" (blocks outside the branch)
    guided: bool  # batch 2B with CFG (planning, fidelity before the guidance stop), else batch B


def check_schedule(cache_step: int, guidance_stop: Any, deep_interval: Any, skip_mode: Any,
                   num_inference_steps: int) -> None:
    """n in 1..T, m in n..T, k >= 1, a known skip mode; each refused with its field."""
    check_cache_step(cache_step, num_inference_steps)
    if not is_integer(guidance_stop) or not cache_step <= guidance_stop <= num_inference_steps:
        raise InvalidInputError(f"guidance stop {guidance_stop!r} is outside {cache_step}..{num_inference_steps}; "
                                "use n <= m <= T (m = n stops guidance at the cache step)", field="guidance_stop")
    if not is_integer(deep_interval) or deep_interval < 1:
        raise InvalidInputError(f"deep interval {deep_interval!r} must be an integer >= 1 (1: every step full)",
                                field="deep_interval")
    if skip_mode not in SKIP_MODES:
        raise InvalidInputError(f"skip mode {skip_mode!r} is unknown; expected one of {', '.join(SKIP_MODES)}",
                                field="skip_mode")


def sample_from_quad_center(total_numbers: int, n_samples: int, center: int, pow: float = 1.2):
    """Port of DeepCache's ``sample_from_quad_center`` (``sd/pipeline_stable_diffusion.py``), as written.

    ``(-center) ** (1 / pow)`` is complex in Python; numpy keeps the real part when casting, as
    DeepCache's own run does.
    """
    while pow > 1:
        x_values = np.linspace((-center) ** (1 / pow), (total_numbers - center) ** (1 / pow), n_samples + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
            indices = [0] + [x + center for x in np.unique(np.int32(x_values ** pow))[1:-1]]
        if len(indices) == n_samples:
            break
        pow -= 0.02
    if pow <= 1:
        raise ValueError("Cannot find suitable pow. Please adjust n_samples or decrease center.")
    return indices, pow


def full_evaluations(count: int, deep_interval: int, skip_mode: str) -> frozenset[int]:
    """Which of ``count`` deep-cached evaluations (0-based) run the full UNet; the rest are shallow.

    Uniform: every ``k``-th from the first (DeepCache's ``range(0, steps, interval)``). Non-uniform:
    DeepCache's ``sample_from_quad_center`` with ``ceil(count / k)`` full steps, denser around
    its centre (``NON_UNIFORM_CENTER`` of the steps).
    """
    if deep_interval == 1 or count == 0:
        return frozenset(range(count))
    if skip_mode == "uniform":
        return frozenset(range(0, count, deep_interval))
    try:
        indices, _ = sample_from_quad_center(count, -(-count // deep_interval), round(NON_UNIFORM_CENTER * count),
                                             NON_UNIFORM_POW)
    except ValueError:
        raise InvalidInputError(f"the non-uniform schedule finds no {-(-count // deep_interval)} full steps among "
                                f"{count}; use --skip-mode uniform or another interval", field="deep_interval") from None
    return frozenset(int(i) for i in indices)


def evaluation_plan(planning: int, guided: int, num_evaluations: int, deep_interval: int = 1,
                    skip_mode: str = "uniform") -> tuple[Evaluation, ...]:
    """The loop's evaluations: ``planning`` planning ones, guided up to ``guided``, deep caching after planning.

    ``planning`` and ``guided`` count evaluations (``planning_evaluations`` of n and of m); every
    evaluation after the planning ones is full or shallow per ``full_evaluations``.
    """
    full = full_evaluations(num_evaluations - planning, deep_interval, skip_mode)
    return tuple(Evaluation("planning" if index < planning else
                            "fidelity" if index - planning in full else "shallow", index < guided)
                 for index in range(num_evaluations))


def calibrated_schedule(schedule: dict[str, Any], steps_run: int) -> tuple[int, int, int, str]:
    """A calibrated schedule ``(n, m, k, mode)`` for a run of ``steps_run`` steps.

    The schedule was chosen at ``schedule["steps"]`` = T; another number of steps scales n and m
    to the same fraction of the run (nearest step, n >= 1, n <= m <= steps_run; n = T stays the
    whole run). k and the skip mode carry over as they are.
    """
    steps = int(schedule["steps"])
    n, m = int(schedule["cache_step"]), int(schedule["guidance_stop"])
    if steps_run != steps:
        n = steps_run if n == steps else max(1, min(steps_run, round(n * steps_run / steps)))
        m = max(n, min(steps_run, round(m * steps_run / steps)))
    return n, m, int(schedule["deep_interval"]), str(schedule["skip_mode"])
