"""numpy ports of diffusers' schedulers, and the factory that builds one from a scheduler config.

Every scheduler has the interface the denoising loop calls::

    scheduler.set_timesteps(num_inference_steps)      # also resets per-loop state
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:                      # one model evaluation per entry
        model_input = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(model(model_input, t), t, latents, rng=rng)

Image to image starts mid-schedule instead (diffusers' img2img pipelines)::

    scheduler.set_timesteps(num_inference_steps)
    begin = img2img_start(num_inference_steps, strength) * scheduler.order
    scheduler.set_begin_index(begin)
    latents = scheduler.add_noise(image_latents, noise, scheduler.timesteps[begin])   # no init_noise_sigma
    for t in scheduler.timesteps[begin:]: ...

Flow-matching models (Sana, SD3, Flux) take the flow-matching samplers (``flow-euler``, and
``dpm++2m`` where the model's config has flow sigmas); ``make_scheduler`` refuses to pair a
flow-matching model with a noise-prediction sampler or the other way round.
"""

import inspect
from collections.abc import Mapping
from typing import Any

from cair_runtime.errors import InvalidInputError
from cair_runtime.schedulers._common import BaseScheduler, DiscreteScheduler
from cair_runtime.schedulers.ddim import DDIMScheduler
from cair_runtime.schedulers.dpmsolver_multistep import DPMSolverMultistepScheduler
from cair_runtime.schedulers.euler import EulerDiscreteScheduler
from cair_runtime.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from cair_runtime.schedulers.flow_match_euler import FlowMatchEulerDiscreteScheduler
from cair_runtime.schedulers.pndm import PNDMScheduler
from cair_runtime.schedulers.unipc import UniPCMultistepScheduler


# What the denoising loop calls (set_timesteps, init_noise_sigma, timesteps, scale_model_input, step):
# every port is a BaseScheduler (the noise-prediction ones a DiscreteScheduler).
Scheduler = BaseScheduler


def img2img_start(num_inference_steps: int, strength: float) -> int:
    """The first of T steps that image to image runs (before multiplying by ``order``): port of diffusers'
    ``StableDiffusionImg2ImgPipeline.get_timesteps``; it runs the last ``min(int(T * strength), T)`` steps."""
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    return max(num_inference_steps - init_timestep, 0)


# user-facing name -> (port, options forced on top of the model's config)
_SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
    "dpm++2m": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpm++2m-karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "pndm": (PNDMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "flow-euler": (FlowMatchEulerDiscreteScheduler, {}),
}
# the names for noise-prediction models (the UNets); scheduler_names(config) gives those of any model
SCHEDULER_NAMES = tuple(name for name, (cls, _) in _SCHEDULERS.items() if not cls.flow_matching)
_CLASSES = {cls.__name__: cls for cls, _ in _SCHEDULERS.values()}


def make_scheduler(name: str | None, config: Mapping[str, Any]) -> Scheduler:
    """Build the scheduler ``name`` from a diffusers scheduler config (``scheduler_config.json``).

    ``name=None`` (or that class's name) builds the model's own scheduler, the class in ``config["_class_name"]``. A given
    name takes the options of the config that its class knows, as diffusers'
    ``XScheduler.from_config(config)`` does (betas, prediction type, timestep spacing, ...); options
    missing from the config, or listed in its ``_use_default_values``, take the class's defaults.
    Raises InvalidInputError for an unknown name or class, for options the port does not support,
    and for a named scheduler of the other kind than the model's (flow matching or noise prediction).
    """
    scheduler = _make(name, config)
    if name is not None and name != config.get("_class_name") and scheduler.flow_matching != _is_flow_model(config):
        kinds = ("a flow-matching", "a noise-prediction")
        model_kind, other_kind = kinds if _is_flow_model(config) else kinds[::-1]
        raise InvalidInputError(f"scheduler {name!r} is {other_kind} sampler and this model "
                                f"({config.get('_class_name')} config) is {model_kind} model; "
                                f"choose one of {', '.join(scheduler_names(config))}")
    return scheduler


def scheduler_names(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The scheduler names ``make_scheduler`` builds for a model's scheduler config."""
    names = []
    for name in _SCHEDULERS:
        try:
            scheduler = _make(name, config)
        except InvalidInputError:
            continue
        if scheduler.flow_matching == _is_flow_model(config):
            names.append(name)
    return tuple(names)


def _is_flow_model(config: Mapping[str, Any]) -> bool:
    # a flow-matching model's config: a FlowMatch* class, or flow sigmas or flow prediction (Sana's DPM-Solver)
    return (str(config.get("_class_name", "")).startswith("FlowMatch") or config.get("use_flow_sigmas") is True
            or config.get("prediction_type") == "flow_prediction")


def _make(name: str | None, config: Mapping[str, Any]) -> Scheduler:
    # make_scheduler without the check that the scheduler suits the model
    if name is None or name == config.get("_class_name"):  # the model's own (as a PNG's parameters name it)
        class_name = config.get("_class_name")
        if not isinstance(class_name, str) or class_name not in _CLASSES:
            names = scheduler_names(config) or tuple(_SCHEDULERS)
            raise InvalidInputError(
                f"the model's scheduler class {class_name!r} has no port; expected one of "
                f"{', '.join(_CLASSES)}, or choose a scheduler by name: {', '.join(names)}"
            )
        cls, forced = _CLASSES[class_name], {}
    elif name in _SCHEDULERS:
        cls, forced = _SCHEDULERS[name]
    else:
        raise InvalidInputError(f"unknown scheduler {name!r}; expected one of {', '.join(_SCHEDULERS)}")

    used_defaults = set(config.get("_use_default_values", ()))
    options = {k: v for k, v in config.items() if k not in used_defaults and not k.startswith("_")}
    options.update(forced)

    known = _option_names(cls)
    problems = [
        f"{key}={options[key]!r} (supported: {value!r})"
        for key, value in cls.unported_options.items()
        if key in options and options[key] != value
    ]
    if problems:
        raise InvalidInputError(
            f"{cls.__name__} options not supported by the runtime's port: {'; '.join(problems)}; "
            "choose another scheduler by name or export with a supported scheduler config"
        )
    return cls(**{k: v for k, v in options.items() if k in known})


def _option_names(cls: type) -> set[str]:
    """The options a port takes: its own ``__init__``'s, and the shared ones it passes on to DiscreteScheduler."""
    parameters = inspect.signature(cls.__init__).parameters
    names = {name for name, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        names |= set(inspect.signature(DiscreteScheduler.__init__).parameters)
    return names - {"self"}
