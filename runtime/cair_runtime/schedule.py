"""A generation's schedule as one value, and the rule that turns it into the loop's UNet evaluations.

A schedule says which of a generation's UNet evaluations plan (the full UNet with guidance, caching
its cross-attention at step n), which stay guided (up to the guidance stop m), and which run
shallow (DeepCache's cut, every step between the full ones of interval k). ``Schedule.resolve``
turns what a caller asked for (any field left unset takes the engine folder's default: its
calibrated schedule, else the export's hint) into a complete, checked ``Schedule``, once per
request; the CLI, the HTTP API, the Python API, the runtime loop, the torch reference, the MAC
count, the measuring lab and the manifest's calibrated default all use this one type.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from cair_runtime.checks import is_finite_number, is_integer
from cair_runtime.errors import InvalidInputError

# The manifest imports this module (its calibrated schedule is a Schedule), so the engine folder's
# manifest is taken as it comes here (``cair_runtime.manifest.Manifest``), not imported.
Manifest = Any


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

    # "planning" (full UNet, text, caches and deep feature out) | "shallow_planning" (its blocks outside the
    # branch, text read, on the kept deep feature) | "fidelity" (full UNet on the caches, emits the deep
    # feature) | "shallow" (blocks outside the branch, on the caches and the kept deep feature)
    kind: str
    guided: bool  # batch 2B with CFG (planning, fidelity before the guidance stop), else batch B


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
                    skip_mode: str = "uniform", planning_interval: int = 1) -> tuple[Evaluation, ...]:
    """The loop's evaluations: ``planning`` planning ones, guided up to ``guided``, deep caching in both phases.

    ``planning`` and ``guided`` count evaluations (``planning_evaluations`` of n and of m). Among
    the planning ones a full planning evaluation every ``planning_interval``-th and guided shallow
    ones between (DeepCache's own steps, text read); after them a full fidelity evaluation every
    ``deep_interval``-th and shallow ones between; each phase placed per ``full_evaluations``.
    """
    planned = full_evaluations(planning, planning_interval, skip_mode)
    full = full_evaluations(num_evaluations - planning, deep_interval, skip_mode)

    def kind(index: int) -> str:
        if index < planning:
            return "planning" if index in planned else "shallow_planning"
        return "fidelity" if index - planning in full else "shallow"

    return tuple(Evaluation(kind(index), index < guided) for index in range(num_evaluations))


PLANNING_KINDS = ("planning", "shallow_planning")  # the evaluations of steps 1..n: guided, text read


# --- the schedule value ----------------------------------------------------------------------------

DEFAULT_STEPS = 25  # T when a request names none, as diffusers' pipelines


def default_guidance_stop(cache_step: int, calibrated: int | None = None) -> int:
    """The guidance stop m a request leaves unset: the folder's calibrated stop, never before n;
    else n itself (CAIR: guidance stops where the caches are taken, on any export)."""
    return cache_step if calibrated is None else max(cache_step, calibrated)


def steps_run(steps: int, strength: Any = None) -> int:
    """The denoising steps a generation runs: T, or image to image's last ``min(int(T * strength), T)``."""
    from cair_runtime.schedulers import img2img_start

    if strength is None:
        return int(steps)
    if not is_finite_number(strength) or not 0 < strength <= 1:
        raise InvalidInputError(f"strength {strength!r} must be a number in (0, 1]: how much of the schedule "
                                "image to image runs (1 = all of it, from pure noise)", field="strength")
    run = int(steps) - img2img_start(int(steps), float(strength))
    if run < 1:
        raise InvalidInputError(f"strength {strength} of {steps} steps runs no step (int({steps} * {strength}) = 0); "
                                "raise the strength or the steps", field="strength")
    return run


@dataclass(frozen=True)
class Schedule:
    """One generation's schedule, complete and checked: built by ``resolve`` (or by hand), then passed down whole.

    n, m and k count the steps that run (``steps_run``: T, or image to image's last
    ``min(int(T * strength), T)``). Constructing one checks what needs no engine (each field's
    range); ``resolve`` adds the defaults and what the engine folder and backend can run.
    """

    steps: int  # T: the scheduler's denoising steps
    cache_step: int  # n: steps 1..n plan (full UNet, CFG) and cache the cross-attention at n; n = T is the baseline
    guidance_stop: int  # m in n..T: guided (batch 2B) up to step m; m > n needs per-half caches (fidelity CFG)
    deep_interval: int = 1  # k: after n, a full fidelity step every k-th and shallow steps between (1: all full)
    skip_mode: str = "uniform"  # where the full steps fall (both phases): "uniform" or DeepCache's "non-uniform"
    strength: float | None = None  # image to image: how much of the schedule runs, (0, 1]; None: text to image
    planning_interval: int = 1  # k_p: in steps 1..n, a full planning step every k_p-th, guided shallow ones between

    def __post_init__(self) -> None:
        if not is_integer(self.steps) or self.steps < 1:
            raise InvalidInputError(f"steps {self.steps!r} must be a positive integer", field="steps")
        run = self.steps_run  # checks the strength
        n, m, k = self.cache_step, self.guidance_stop, self.deep_interval
        if not is_integer(n):
            raise InvalidInputError(f"cache step {n!r} must be an integer in 1..{run}", field="cache_step")
        if self.strength is not None and not 1 <= n <= run:
            raise InvalidInputError(f"cache step {n} is outside 1..{run}, the steps that strength {self.strength} "
                                    f"runs of {self.steps}; use 1 <= n <= {run}, with n = {run} for the plain "
                                    "baseline", field="cache_step")
        check_cache_step(n, run)
        if not is_integer(m) or not n <= m <= run:
            raise InvalidInputError(f"guidance stop {m!r} is outside {n}..{run}; use n <= m <= T (m = n stops "
                                    "guidance at the cache step)", field="guidance_stop")
        if not is_integer(k) or k < 1:
            raise InvalidInputError(f"deep interval {k!r} must be an integer >= 1 (1: every step full)",
                                    field="deep_interval")
        if not is_integer(self.planning_interval) or self.planning_interval < 1:
            raise InvalidInputError(f"planning interval {self.planning_interval!r} must be an integer >= 1 (1: every "
                                    "planning step full)", field="planning_interval")
        if self.skip_mode not in SKIP_MODES:
            raise InvalidInputError(f"skip mode {self.skip_mode!r} is unknown; expected one of {', '.join(SKIP_MODES)}",
                                    field="skip_mode")
        for name in ("steps", "cache_step", "guidance_stop", "deep_interval", "planning_interval"):  # numpy integers become ints
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.strength is not None:
            object.__setattr__(self, "strength", float(self.strength))

    @property
    def steps_run(self) -> int:
        """The denoising steps that run: T, or image to image's last ``min(int(T * strength), T)``."""
        return steps_run(self.steps, self.strength)

    def plan(self, num_evaluations: int) -> tuple[Evaluation, ...]:
        """The loop's UNet evaluations (``num_evaluations``: the scheduler's timesteps that run)."""
        run = self.steps_run
        return evaluation_plan(planning_evaluations(self.cache_step, run, num_evaluations),
                               planning_evaluations(self.guidance_stop, run, num_evaluations),
                               num_evaluations, self.deep_interval, self.skip_mode, self.planning_interval)

    def parameters(self) -> dict[str, Any]:
        """The fields by name (``strength`` only for image to image): what a PNG, a JSON line or a
        manifest records, and what ``resolve`` takes back to give this schedule again."""
        fields = dataclasses.asdict(self)
        if self.strength is None:
            del fields["strength"]
        return fields

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Schedule:
        """The schedule a record names (a manifest's calibrated ``schedule``, a PNG's parameters): its
        fields by name, other keys ignored, a missing optional field at its default."""
        defaults = {field.name: field.default for field in dataclasses.fields(cls)
                    if field.default is not dataclasses.MISSING}
        return cls(**{name: record.get(name, defaults.get(name)) for name in SCHEDULE_FIELDS})

    def label(self) -> str:
        """``T=25 n=5 m=5 k=1`` (and the skip mode and strength where they matter), for messages and reports."""
        text = f"T={self.steps} n={self.cache_step} m={self.guidance_stop} k={self.deep_interval}"
        text += f" k_p={self.planning_interval}" if self.planning_interval > 1 else ""
        text += f" ({self.skip_mode})" if max(self.deep_interval, self.planning_interval) > 1 else ""
        return text + (f" strength={self.strength:g}" if self.strength is not None else "")

    def check_runs_on(self, manifest: Manifest, backend: Any = None) -> None:
        """Refuse what this engine folder (and ``backend``, if given: its ``schedules`` and ``kinds``) cannot run."""
        train_steps = int(manifest.scheduler_config.get("num_train_timesteps", 1000))
        if self.steps > train_steps:
            raise InvalidInputError(f"steps {self.steps} must be an integer in 1..{train_steps} (the model's "
                                    "training timesteps)", field="steps")
        n, m, k = self.cache_step, self.guidance_stop, self.deep_interval
        cfg = manifest.fidelity_guidance == "cfg"
        if m > n and not cfg:
            raise InvalidInputError(f"guidance stop {m} > cache step {n} needs per-half caches; this engine merges "
                                    "them at n: re-export with the default --fidelity-guidance cfg",
                                    field="guidance_stop")
        if k > 1 and "shallow" not in manifest.graphs:
            raise InvalidInputError(f"deep interval {k} needs the shallow graph, which this folder lacks; re-export "
                                    "with the default --deep-branch 0 (or use --deep-interval 1)",
                                    field="deep_interval")
        planning_shallow = self.planning_interval > 1
        if planning_shallow and "shallow_planning" not in manifest.graphs:
            raise InvalidInputError(f"planning interval {self.planning_interval} needs the guided shallow graph, which "
                                    "this folder lacks; re-export it with the default --deep-branch 0 (or "
                                    "use --planning-interval 1)",
                                    field="planning_interval")
        if backend is None:
            return
        if planning_shallow and "shallow_planning" not in backend.kinds:
            raise InvalidInputError(f"planning interval {self.planning_interval} needs the guided shallow graph, which "
                                    "this backend does not run; use the onnxruntime backend or --planning-interval 1",
                                    field="planning_interval")
        if (k > 1 or (cfg and m < self.steps_run)) and not backend.schedules:
            raise InvalidInputError("this backend runs planning and fidelity only (no guidance stop before T, no "
                                    "shallow steps); use the onnxruntime or aoti backend", field="deep_interval")
        if k > 1 and "shallow" not in backend.kinds:
            raise InvalidInputError(f"deep interval {k} needs the shallow graph, which this folder's engines were "
                                    "built without; rebuild them (`cair-export build ENGINE_DIR`) or use "
                                    "--deep-interval 1", field="deep_interval")

    @classmethod
    def resolve(cls, request: Schedule | Mapping[str, Any], manifest: Manifest, backend: Any = None) -> Schedule:
        """The schedule a request runs on this engine folder: the request's fields (by name; None or
        missing takes the default), the rest from the folder (``defaults``), checked once.

        A ``Schedule`` is taken as it is and only checked against the folder and backend.
        """
        if not isinstance(request, Schedule):
            unknown = sorted(set(request) - set(SCHEDULE_FIELDS))
            if unknown:
                raise TypeError(f"unknown schedule field(s) {', '.join(unknown)}; known: {', '.join(SCHEDULE_FIELDS)}")
            asked = {name: value for name, value in request.items() if value is not None}
            steps = asked.get("steps", DEFAULT_STEPS)
            if not is_integer(steps) or steps < 1:
                train_steps = int(manifest.scheduler_config.get("num_train_timesteps", 1000))
                raise InvalidInputError(f"steps {steps!r} must be an integer in 1..{train_steps} (the model's "
                                        "training timesteps)", field="steps")
            strength = asked.get("strength")
            default = cls.defaults(manifest, backend, steps_run(steps, strength))
            n = asked.get("cache_step", default.cache_step)
            if "guidance_stop" not in asked and is_integer(n):
                fixed = manifest.schedule is not None or _guided_to_end(manifest, backend)
                asked["guidance_stop"] = default_guidance_stop(n, default.guidance_stop if fixed else None)
            request = cls(**{**dataclasses.asdict(default), **asked, "steps": steps, "strength": strength})
        request.check_runs_on(manifest, backend)
        return request

    @classmethod
    def defaults(cls, manifest: Manifest, backend: Any, run: int) -> Schedule:
        """What a run of ``run`` steps leaves unset takes (as a schedule of T = ``run``): the folder's
        calibrated schedule (``manifest.schedule``, n and m scaled to the same fraction of the run),
        else n = the export's hint, m = n and k = 1.

        A backend that runs planning and fidelity only (no ``schedules``) keeps the calibrated n and
        drops k, as do engines built without the shallow graph for k; on per-half caches it cannot
        stop guidance before T (no merge of the halves), so m = T there.
        """
        calibrated = manifest.schedule
        if calibrated is None or (backend is not None and not backend.schedules):
            n = min(int(manifest.model.get("cache_step_hint", 5)), run) if calibrated is None else \
                _scaled(calibrated, run)[0]
            return cls(run, n, run if _guided_to_end(manifest, backend) else n)
        n, m = _scaled(calibrated, run)

        def runs(kind: str) -> bool:
            return kind in manifest.graphs and (backend is None or kind in backend.kinds)

        return cls(run, n, m, int(calibrated["deep_interval"]) if runs("shallow") else 1, str(calibrated["skip_mode"]),
                   planning_interval=int(calibrated.get("planning_interval", 1)) if runs("shallow_planning") else 1)


def _guided_to_end(manifest: Manifest, backend: Any) -> bool:
    """Per-half caches on a backend that cannot merge them: fidelity runs guided to T."""
    return manifest.fidelity_guidance == "cfg" and backend is not None and not backend.schedules


SCHEDULE_FIELDS = tuple(field.name for field in dataclasses.fields(Schedule))


def _scaled(calibrated: Mapping[str, Any], run: int) -> tuple[int, int]:
    """A calibrated schedule's n and m for a run of ``run`` steps: the same fraction of the run
    (nearest step, n >= 1, n <= m <= run); n = T stays the whole run."""
    steps, n, m = int(calibrated["steps"]), int(calibrated["cache_step"]), int(calibrated["guidance_stop"])
    if run != steps:
        n = run if n == steps else max(1, min(run, round(n * run / steps)))
        m = max(n, min(run, round(m * run / steps)))
    return n, m


def schedule_request(schedule: Schedule | None, steps: Any, strength: Any,
                     fields: Mapping[str, Any]) -> Schedule | dict[str, Any]:
    """What a Python call asked for: its ``Schedule`` as it is, or the schedule's fields given as keywords
    (diffusers' ``num_inference_steps`` is T; ``strength`` is image to image's, None for text to image)."""
    if schedule is None:
        return {"steps": steps, "strength": strength, **fields}
    if fields:
        raise TypeError(f"give a schedule or its fields ({', '.join(fields)}), not both")
    return schedule
