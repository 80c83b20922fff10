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
"""

import inspect
from collections.abc import Mapping
from typing import Any

from cair_runtime.errors import InvalidInputError
from cair_runtime.schedulers._common import DiscreteScheduler
from cair_runtime.schedulers.ddim import DDIMScheduler
from cair_runtime.schedulers.dpmsolver_multistep import DPMSolverMultistepScheduler
from cair_runtime.schedulers.euler import EulerDiscreteScheduler
from cair_runtime.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from cair_runtime.schedulers.pndm import PNDMScheduler
from cair_runtime.schedulers.unipc import UniPCMultistepScheduler


# What the denoising loop calls (set_timesteps, init_noise_sigma, timesteps, scale_model_input, step):
# every port is a DiscreteScheduler.
Scheduler = DiscreteScheduler


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
}
SCHEDULER_NAMES = tuple(_SCHEDULERS)
_CLASSES = {cls.__name__: cls for cls, _ in _SCHEDULERS.values()}


def make_scheduler(name: str | None, config: Mapping[str, Any]) -> Scheduler:
    """Build the scheduler ``name`` from a diffusers scheduler config (``scheduler_config.json``).

    ``name=None`` (or that class's name) builds the model's own scheduler, the class in ``config["_class_name"]``. A given
    name takes the options of the config that its class knows, as diffusers'
    ``XScheduler.from_config(config)`` does (betas, prediction type, timestep spacing, ...); options
    missing from the config, or listed in its ``_use_default_values``, take the class's defaults.
    Raises InvalidInputError for an unknown name or class, and for options the port does not support.
    """
    if name is None or name == config.get("_class_name"):  # the model's own (as a PNG's parameters name it)
        class_name = config.get("_class_name")
        if not isinstance(class_name, str) or class_name not in _CLASSES:
            raise InvalidInputError(
                f"the model's scheduler class {class_name!r} has no port; expected one of "
                f"{', '.join(_CLASSES)}, or choose a scheduler by name: {', '.join(SCHEDULER_NAMES)}"
            )
        cls, forced = _CLASSES[class_name], {}
    elif name in _SCHEDULERS:
        cls, forced = _SCHEDULERS[name]
    else:
        raise InvalidInputError(f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULER_NAMES)}")

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
