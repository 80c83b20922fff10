"""Load an engine folder and denoise: the CAIR loop, unrolled, with the switch at step n, the guidance
stop m and the shallow steps (deep interval k) in sight."""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cair_runtime.backends import BackendContext, make_backend
from cair_runtime.backends.pool import ContextPool, check_concurrency
from cair_runtime.checks import check_finite_result, check_guidance_scale, is_finite_number
from cair_runtime.control import ControlRequest, controlnet_keep, residual_scales
from cair_runtime.errors import EngineClosedError, InvalidInputError, ShapeError
from cair_runtime.lora import BASE, AdapterSwitch, LoraSet, check_lora_list, file_sha256, resolve_loras
from cair_runtime.manifest import Manifest, load_manifest, size_problem
from cair_runtime.positions import position_embedding
from cair_runtime.noise import Generators, image_generators, image_seeds, standard_normal
from cair_runtime.schedulers import Scheduler, img2img_start, make_scheduler
from cair_runtime.schedule import DEFAULT_STEPS, PLANNING_KINDS, Schedule, schedule_request


MAX_IMAGES_PER_CALL = 64  # a cap, so a typo cannot queue hours of work; make several calls for more


def check_image_count(count: int) -> None:
    if not 1 <= count <= MAX_IMAGES_PER_CALL:
        raise InvalidInputError(f"{count} images in one call; the limit is 1..{MAX_IMAGES_PER_CALL} (make several calls)")


@dataclass
class StageTimings:
    """Wall time of each stage of one ``denoise`` call, in seconds."""

    planning_s: float = 0.0  # steps 1..n: planning graph, CFG, host scheduler math
    switch_s: float = 0.0  # handing the caches to the fidelity graph
    fidelity_s: float = 0.0  # steps n+1..T (full and shallow)
    planning_steps: int = 0  # of which planning_shallow_steps ran the guided shallow graph
    fidelity_steps: int = 0  # of which shallow_steps ran the shallow graph
    shallow_steps: int = 0
    shallow_s: float = 0.0  # the shallow steps' part of fidelity_s
    planning_shallow_steps: int = 0

    @property
    def total_s(self) -> float:
        return self.planning_s + self.switch_s + self.fidelity_s

    def add(self, other: StageTimings) -> None:
        for name in ("planning_s", "switch_s", "fidelity_s", "planning_steps", "fidelity_steps", "shallow_steps",
                     "shallow_s", "planning_shallow_steps"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, float]:
        return {"planning_s": self.planning_s, "switch_s": self.switch_s, "fidelity_s": self.fidelity_s,
                "total_s": self.total_s, "planning_steps": self.planning_steps,
                "fidelity_steps": self.fidelity_steps, "shallow_steps": self.shallow_steps, "shallow_s": self.shallow_s,
                "planning_shallow_steps": self.planning_shallow_steps}


@dataclass
class DenoiseResult:
    latents: np.ndarray  # (B, C, h, w) final latents, float32
    timings: StageTimings


def _float_array(name: str, value: Any, ndim: int) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind != "f":
        raise ShapeError(f"{name} has dtype {array.dtype}; the graphs take floating point (float32)")
    if array.ndim != ndim:
        raise ShapeError(f"{name} has shape {array.shape}; expected {ndim} dimensions")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise InvalidInputError(f"{name} contain NaN or infinity ({int((~np.isfinite(array)).sum())} values); "
                                "the result would be NaN or black")
    return array


class CairEngine:
    """An engine folder ready to run: manifest, backend, and the CAIR denoising loop.

    Thread-safe: any number of threads may call ``denoise`` on one engine. The backend's sessions
    and weights are shared; each call runs in a context of its own (bindings, caches, output
    buffers) from a pool of at most ``max_concurrency`` (default: the backend's, sized for its
    device), created lazily and reused; a call waits while all are busy. ``close()`` (or ``with``)
    waits for running calls, then releases everything.

    ``loras``: LoRA adapters ``[(path.safetensors, scale), ...]`` applied by default; a call may
    name others (``loras=[]``: the base weights). The fused weights are computed in numpy and
    swapped into the sessions between calls (``AdapterSwitch``): calls on the same adapters run
    concurrently, a call that needs other adapters waits for those in flight.
    """

    def __init__(self, folder: str | Path, backend: str = "onnxruntime", *, max_concurrency: int | None = None,
                 verify: str = "fast", loras: Sequence[Any] | None = None, **backend_options: Any):
        self.folder = Path(folder)
        self.manifest: Manifest = load_manifest(self.folder, verify)  # "fast": no hashing while files are unchanged
        if max_concurrency is not None:
            check_concurrency(max_concurrency)
        checked_loras = check_lora_list(loras)
        self.backend_name = backend
        self.backend = make_backend(backend, self.folder, self.manifest, max_concurrency=max_concurrency,
                                    **backend_options)
        self.pool = ContextPool(self.backend.new_context, self.backend.max_concurrency)
        self.adapters = AdapterSwitch()
        self.adapters.register(self._swap_unet_weights)
        self._unet_overridden = False
        self._resolved = BASE  # the last adapter set resolved (computing fused weights is the slow part)
        try:
            self.default_loras = self.resolve_loras(checked_loras)
        except BaseException:
            self.close()
            raise
        planning = {spec.name: spec for spec in self.manifest.graphs["planning"].inputs}
        self.in_channels = planning["sample"].shape[1]
        self.context_dim = planning["encoder_hidden_states"].shape[2]
        self.pooled_dim = planning["text_embeds"].shape[1] if "text_embeds" in planning else None
        self.vae_scale_factor = self.manifest.vae_scale_factor

    def resolve_loras(self, loras: Sequence[Any] | LoraSet | None) -> LoraSet:
        """Adapters checked against this engine, their fused weights computed (not yet applied).

        None is the engine's default set; ``[]`` the base weights. Refuses a backend that cannot
        swap weights, files that are not safetensors, keys or ranks that do not fit the model, and
        non-finite scales, with ``InvalidInputError(field="loras")``.
        """
        if loras is None:
            return getattr(self, "default_loras", BASE)
        if isinstance(loras, LoraSet):
            return loras
        checked = check_lora_list(loras)
        if not checked:
            return BASE
        if not hasattr(self.backend, "set_weights"):
            raise InvalidInputError(f"the {self.backend_name} backend cannot swap LoRA weights at run time; use "
                                    "--backend onnxruntime, or fuse the adapter with `cair-export export --lora`",
                                    field="loras")
        key = tuple((file_sha256(path), scale) for path, scale in checked)
        resolved = self._resolved
        if resolved.key != key:
            resolved = resolve_loras(self.folder, self.manifest.lora, str(self.manifest.model.get("dtype", "float32")),
                                     checked)
            self._resolved = resolved
        return resolved

    def _swap_unet_weights(self, overrides: dict[str, dict[str, np.ndarray]]) -> None:
        """``AdapterSwitch``'s hook: new sessions with these weights, fresh contexts (no call is in flight)."""
        overridden = any(kind in overrides for kind in self.manifest.unet_graphs)
        if not overridden and self._unet_overridden is False:
            return  # only text encoder weights change
        self.pool.discard_idle()
        self._unet_overridden = None  # unknown until the sessions are rebuilt
        self.backend.set_weights(overrides)
        self._unet_overridden = overridden

    def close(self) -> None:
        """Wait for running calls, then release the contexts and the backend; later calls raise
        ``EngineClosedError``. Closing twice is fine."""
        self.pool.close()
        self.backend.close()

    def check_open(self) -> None:
        if self.pool.closed:
            raise EngineClosedError(f"the engine of {self.folder} was closed; create a new one to run it again")

    @property
    def text_lengths(self) -> tuple[int, int]:
        """The shortest and longest prompt embeddings (tokens) the backend's graphs take: one text-encoder
        window to the export's ``--max-prompt-chunks`` of them (AOTInductor packages: one window)."""
        dim = self.manifest.dim("text_len")
        return getattr(self.backend, "text_len_range", None) or (dim.min, dim.max)

    def context_nbytes(self, batch: int, latent_height: int, latent_width: int) -> int:
        """Bytes one context holds for a call of this size: caches, noise_pred and per-call inputs."""
        dims = {"batch": batch, "latent_height": latent_height, "latent_width": latent_width,
                "text_len": self.manifest.dim("text_len").opt}
        caches = {cache.name for cache in self.manifest.caches}  # one buffer for every graph
        deep = self.manifest.deep_branch["name"] if self.manifest.deep_branch else None
        writer = {"shallow": "fidelity", "shallow_planning": "planning"}  # a shallow graph reads its writer's buffer

        def key(kind: str, name: str) -> Any:
            if name in caches:
                return name
            return (writer.get(kind, kind), name) if name == deep else (kind, name)

        specs = {key(kind, spec.name): spec for kind, graph in self.manifest.schedule_graphs.items()
                 for spec in (*graph.inputs, *graph.outputs) if spec.name not in ("sample", "timestep")}
        return sum(int(np.prod(spec.resolve(dims))) * np.dtype(spec.dtype).itemsize for spec in specs.values())

    def __enter__(self) -> CairEngine:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @property
    def added_conditions(self) -> bool:
        """True for SDXL-style UNets that take ``text_embeds`` and ``time_ids``."""
        return self.pooled_dim is not None

    def check_dims(self, dims: dict[str, int]) -> None:
        """Every dim within the manifest's min..max, reported together."""
        problems = []
        for name, value in dims.items():
            dim = self.manifest.dim(name)
            if not dim.min <= value <= dim.max:
                scale = self.vae_scale_factor if name.startswith("latent_") else 1
                unit = f" ({value * scale} px; allowed {dim.min * scale}..{dim.max * scale} px)" if scale > 1 else ""
                problems.append(f"{name} {value} is outside {dim.min}..{dim.max}{unit}")
        if problems:
            raise ShapeError(f"the engine in {self.folder} does not accept this input: {'; '.join(problems)}; "
                             "re-export with a matching --height/--width/--max-batch")

    def resolve_schedule(self, request: Schedule | Mapping[str, Any]) -> Schedule:
        """A request's schedule on this engine (``Schedule.resolve`` with this folder and backend):
        the fields it leaves unset from the folder's calibrated schedule, else its defaults; checked once."""
        return Schedule.resolve(request, self.manifest, self.backend)

    def make_scheduler(self, name: str | None, schedule: Schedule) -> Scheduler:
        """A call's numpy scheduler, built once with its timesteps set; an unknown name, too few
        steps for it (PNDM) or a timestep beyond the model's training timesteps fail here, before any work."""
        train_steps = int(self.manifest.scheduler_config.get("num_train_timesteps", 1000))
        try:
            scheduler = make_scheduler(name, self.manifest.scheduler_config)
        except InvalidInputError as error:
            raise InvalidInputError(str(error), field="scheduler") from None
        try:
            scheduler.set_timesteps(schedule.steps)
        except InvalidInputError as error:
            raise InvalidInputError(str(error), field="steps") from None
        # e.g. DDIM's "leading" spacing with steps_offset 1 at T = 1000; flow matching's are sigma * 1000, up to 1000
        if not scheduler.flow_matching and np.max(scheduler.timesteps) >= train_steps:
            raise InvalidInputError(f"{schedule.steps} steps put a timestep at {int(np.max(scheduler.timesteps))}, "
                                    f"beyond the model's {train_steps} training timesteps; use fewer steps",
                                    field="steps")
        return scheduler

    def latent_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Pixel size -> latent size, defaulting to the size the engine was tuned for."""
        factor, patch = self.vae_scale_factor, self.manifest.patch_size
        sizes = []
        for label, value, dim in (("height", height, "latent_height"), ("width", width, "latent_width")):
            if value is None:
                sizes.append(self.manifest.dim(dim).opt)
                continue
            problem = size_problem(label, value, factor, patch)
            if problem:
                raise InvalidInputError(problem, field=label)
            sizes.append(value // factor)
        return sizes[0], sizes[1]

    def denoise(
        self,
        prompt_embeds: np.ndarray,
        negative_prompt_embeds: np.ndarray | None = None,
        *,
        latents: np.ndarray | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = 7.5,
        scheduler: str | None = None,
        seed: int | Sequence[int] = 0,
        text_embeds: np.ndarray | None = None,
        negative_text_embeds: np.ndarray | None = None,
        callback: Callable[[int, int], None] | None = None,
        loras: Sequence[Any] | LoraSet | None = None,
        image_latents: np.ndarray | None = None,
        strength: float = 0.8,
        generators: Sequence[np.random.Generator] | None = None,
        cache_observer: Callable[[int, int, dict[str, np.ndarray]], None] | None = None,
        control_images: Sequence[np.ndarray] | None = None,
        control: ControlRequest | None = None,
        ip_image_embeds: np.ndarray | None = None,
        ip_adapter_scale: float = 1.0,
        attention_mask: np.ndarray | None = None,
        negative_attention_mask: np.ndarray | None = None,
        schedule: Schedule | None = None,
        **schedule_fields: Any,
    ) -> DenoiseResult:
        """Denoise from prompt embeddings (B, text_len, D); returns final latents and stage timings.

        The schedule: ``schedule`` (a ``Schedule``), or its fields as keywords (``cache_step``,
        ``guidance_stop``, ``deep_interval``, ``skip_mode``; ``num_inference_steps`` is its T and,
        with ``image_latents``, ``strength`` its strength); what is left unset takes the folder's
        calibrated schedule, else its defaults (``Schedule.resolve``). n = T is the plain baseline.
        m (n..T) keeps guidance after n on an engine exported with fidelity CFG; k > 1 runs a full
        fidelity step every k-th step after n and shallow steps between (an engine exported with a
        deep branch). Batches above the engine's max batch run in chunks. ``loras`` as for the
        constructor (None: the engine's default adapters).

        Image k draws everything random from its own ``np.random.default_rng(seed_k)``
        (``image_seeds``): its initial noise (``standard_normal``, float32) and then its ancestral
        noise, so no image depends on the others in the batch. ``latents`` is the initial noise
        (B, C, h, w) before ``init_noise_sigma`` scaling (as diffusers' pipelines take it); with it,
        the seeds drive only ancestral noise. Negative embeddings default to zeros.

        Image to image: ``image_latents`` (B, C, h, w) are the init images' latents, already scaled
        by the VAE's scaling factor; the loop runs the last ``min(int(T * strength), T)`` of T
        steps (diffusers' ``get_timesteps``) from them noised to its first timestep with the
        scheduler's ``add_noise``; ``latents``, if given, is that noise, else image k draws it.
        n, m and k count the steps that run. ``generators``: image k's generator as the caller left
        it (text to image draws the VAE's latent sample from it first), instead of ``seed``.

        ``cache_observer(step, first_image=..., caches=...)``, for measuring (``cair-export calibrate``), is
        called after every planning step with host copies of the cross-attention outputs planning
        wrote, by cache name, for the chunk of images starting at ``first_image``: (B', tokens, C),
        the mean of the two halves, or (2B', tokens, C) per half (unconditional first) on an engine
        exported with fidelity CFG. Only backends whose contexts have ``read_caches`` (onnxruntime).

        ControlNet (an engine exported with ``--controlnet``): ``control_images``, one per net, each
        (B, C, H, W) float32 in [0, 1] at the output size in pixels (the preprocessed control map:
        canny edges, depth and the like are the caller's), and ``control``, a
        ``cair_runtime.control.ControlRequest`` (default: scale 1 on every step, no guess mode).

        IP-Adapter (an engine exported with ``--ip-adapter``): ``ip_image_embeds`` (B, D), each image's
        CLIP image embedding (the folder's ``image_encoder`` graph), scaled by ``ip_adapter_scale``; the
        unconditional half gets zeros, as in diffusers. Only planning steps read them: after n the
        cached cross-attention already holds the image term. Without them the engine runs as the plain model.

        Diffusion transformers (PixArt): ``attention_mask`` and ``negative_attention_mask`` (B, text_len),
        1 for the tokens of each text (its end token included) and 0 for padding, as the T5 tokenizer makes
        them; default: every position read. Only planning steps read them. The position embedding of the
        patch grid is computed here (``cair_runtime.positions``).
        """
        self.check_open()
        img2img = image_latents is not None
        schedule = self.resolve_schedule(schedule_request(
            schedule, num_inference_steps, strength if img2img else None, schedule_fields))
        if (schedule.strength is not None) != img2img:
            raise InvalidInputError("a schedule with a strength is for image to image (image latents), and image to "
                                    "image needs one", field="strength")
        check_guidance_scale(guidance_scale)
        return self.denoise_resolved(
            prompt_embeds, negative_prompt_embeds, schedule, self.make_scheduler(scheduler, schedule), guidance_scale,
            latents=latents, height=height, width=width, seed=seed, text_embeds=text_embeds,
            negative_text_embeds=negative_text_embeds, callback=callback, lora_set=self.resolve_loras(loras),
            image_latents=image_latents, generators=generators, cache_observer=cache_observer,
            control_images=control_images, control=control, ip_image_embeds=ip_image_embeds,
            ip_adapter_scale=ip_adapter_scale, attention_mask=attention_mask,
            negative_attention_mask=negative_attention_mask)

    def denoise_resolved(self, prompt_embeds: np.ndarray, negative_prompt_embeds: np.ndarray | None,
                         schedule: Schedule, scheduler: Scheduler, guidance_scale: float, *,
                         latents: np.ndarray | None = None, height: int | None = None, width: int | None = None,
                         seed: int | Sequence[int] = 0, text_embeds: np.ndarray | None = None,
                         negative_text_embeds: np.ndarray | None = None,
                         callback: Callable[[int, int], None] | None = None, lora_set: LoraSet = BASE,
                         image_latents: np.ndarray | None = None,
                         generators: Sequence[np.random.Generator] | None = None,
                         cache_observer: Callable[..., None] | None = None,
                         control_images: Sequence[np.ndarray] | None = None,
                         control: ControlRequest | None = None, ip_image_embeds: np.ndarray | None = None,
                         ip_adapter_scale: float = 1.0, attention_mask: np.ndarray | None = None,
                         negative_attention_mask: np.ndarray | None = None) -> DenoiseResult:
        """``denoise`` once the call's settings are resolved and checked (``resolve_schedule``,
        ``make_scheduler``, ``resolve_loras``): the arrays are checked, nothing else again."""
        img2img = image_latents is not None
        prompt_embeds = _float_array("prompt embeddings", prompt_embeds, 3)
        batch = prompt_embeds.shape[0]
        check_image_count(batch)
        shortest, longest = self.text_lengths
        if prompt_embeds.shape[2] != self.context_dim or not shortest <= prompt_embeds.shape[1] <= longest:
            span = str(shortest) if shortest == longest else f"{shortest} to {longest}"
            raise ShapeError(f"prompt embeddings have shape {prompt_embeds.shape}; the engine takes (batch, text_len, "
                             f"{self.context_dim}) with text_len {span}")
        if negative_prompt_embeds is None:
            negative_prompt_embeds = np.zeros_like(prompt_embeds)
        negative_prompt_embeds = _float_array("negative prompt embeddings", negative_prompt_embeds, 3)
        if negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ShapeError(f"negative prompt embeddings have shape {negative_prompt_embeds.shape}; expected "
                             f"{prompt_embeds.shape}, the prompt embeddings' (pad the shorter text to the other's "
                             "length)")

        if generators is None:
            generators = image_generators(image_seeds(seed, batch))
        elif len(generators) != batch:
            raise InvalidInputError(f"{len(generators)} generators for a batch of {batch}; give one per image")
        if img2img:
            image_latents = _float_array("image latents", image_latents, 4)
            if image_latents.shape[:2] != (batch, self.in_channels):
                raise ShapeError(f"image latents have shape {image_latents.shape}; expected ({batch}, "
                                 f"{self.in_channels}, latent_height, latent_width) to match the prompt batch")
            height = height or image_latents.shape[2] * self.vae_scale_factor
            width = width or image_latents.shape[3] * self.vae_scale_factor
        if latents is None:
            latent_height, latent_width = self.latent_size(height, width)
            latents = standard_normal(generators, (batch, self.in_channels, latent_height, latent_width))
        latents = _float_array("latents", latents, 4)
        if latents.shape[0] != batch or latents.shape[1] != self.in_channels:
            raise ShapeError(f"latents have shape {latents.shape}; expected ({batch}, {self.in_channels}, "
                             "latent_height, latent_width) to match the prompt batch")
        for label, pixels, size in (("height", height, latents.shape[2]), ("width", width, latents.shape[3])):
            if pixels is not None and pixels != size * self.vae_scale_factor:
                raise ShapeError(f"latents of {label} {size} make {size * self.vae_scale_factor} px, not the "
                                 f"{label} {pixels} asked for; drop --{label} or pass matching latents")
        self.check_dims({"latent_height": latents.shape[2], "latent_width": latents.shape[3]})
        if img2img and image_latents.shape != latents.shape:
            raise ShapeError(f"image latents have shape {image_latents.shape}, the noise {latents.shape}; "
                             "they must match")

        added = None
        if self.added_conditions:
            if text_embeds is None:
                raise InvalidInputError("this SDXL-style engine needs pooled text_embeds (B, "
                                        f"{self.pooled_dim}) besides the prompt embeddings")
            text_embeds = _float_array("text_embeds", text_embeds, 2)
            if negative_text_embeds is None:
                negative_text_embeds = np.zeros_like(text_embeds)
            negative_text_embeds = _float_array("negative text_embeds", negative_text_embeds, 2)
            for label, array in (("text_embeds", text_embeds), ("negative text_embeds", negative_text_embeds)):
                if array.shape != (batch, self.pooled_dim):
                    raise ShapeError(f"{label} have shape {array.shape}; expected ({batch}, {self.pooled_dim})")
            # diffusers' _get_add_time_ids: original size, crop top-left (0, 0), target size.
            pixels = (latents.shape[2] * self.vae_scale_factor, latents.shape[3] * self.vae_scale_factor)
            time_ids = np.tile(np.array([*pixels, 0, 0, *pixels], dtype=np.float32), (batch, 1))
            added = (text_embeds, negative_text_embeds, time_ids)

        control_images, control = self._check_control(control_images, control, latents.shape)
        image_prompt = self._check_image_prompt(ip_image_embeds, ip_adapter_scale, batch)
        text_masks = self._check_text_masks(attention_mask, negative_attention_mask, prompt_embeds.shape[:2])
        patch = self.manifest.patch_size
        if latents.shape[2] % patch or latents.shape[3] % patch:
            raise ShapeError(f"latents have shape {latents.shape}; this transformer takes latent sides in whole "
                             f"patches of {patch}")

        max_batch = self.manifest.dim("batch").max
        timings = StageTimings()
        chunks = []
        # The adapters' weights in place (a swap waits for calls on other adapters), then this call's
        # bindings and buffers (waits if all are busy).
        with self.adapters.using(lora_set), self.pool.acquire() as context:
            for start in range(0, batch, max_batch):
                part = slice(start, start + max_batch)
                result = self._denoise_batch(
                    context, prompt_embeds[part], negative_prompt_embeds[part], latents[part],
                    None if added is None else tuple(a[part] for a in added), schedule,
                    copy.deepcopy(scheduler),  # each chunk's loop starts from the prepared state
                    guidance_scale, generators[part], callback,
                    None if image_latents is None else image_latents[part],
                    None if cache_observer is None else functools.partial(cache_observer, first_image=start),
                    [image[part] for image in control_images], control,
                    None if image_prompt is None else (image_prompt[0][part], image_prompt[1]),
                    None if text_masks is None else tuple(mask[part] for mask in text_masks))
                chunks.append(result.latents)
                timings.add(result.timings)
        latents = np.concatenate(chunks)
        check_finite_result(latents, "denoised latents")
        return DenoiseResult(latents, timings)

    @property
    def controlnets(self) -> int:
        """ControlNets fused into the graphs (``cair-export export --controlnet``): one control image each."""
        return self.manifest.controlnets

    def check_control_count(self, given: int, control: ControlRequest | None = None) -> None:
        """Refuse control images on an engine without ControlNets, and a count that is not one per net."""
        count = self.controlnets
        if not count:
            if given or control is not None:
                raise InvalidInputError("this engine was exported without a ControlNet; re-export with --controlnet "
                                        "to use control images", field="control_image")
        elif given != count:
            raise InvalidInputError(f"{given} control images for the engine's {count} ControlNet(s); give one "
                                    "each (--control-image, repeated)", field="control_image")

    def _check_control(self, images: Sequence[np.ndarray] | None, control: ControlRequest | None,
                       latent_shape: tuple[int, ...]) -> tuple[list[np.ndarray], ControlRequest | None]:
        """One control image per fused ControlNet, (B, C, H, W) float32 at the output's pixel size."""
        images = [] if images is None else list(images)
        self.check_control_count(len(images), control)
        count = self.controlnets
        if not count:
            return [], None
        control = control or ControlRequest.make(count)
        if len(control.scales) != count:
            raise InvalidInputError(f"a control request for {len(control.scales)} ControlNets; the engine has {count}",
                                    field="control_scale")
        batch, _, height, width = latent_shape
        checked = []
        for j, image in enumerate(images):
            image = _float_array(f"control image {j}", image, 4)
            channels = self.manifest.graphs["planning"].input(f"control_image_{j}").shape[1]
            expected = (batch, channels, height * self.vae_scale_factor, width * self.vae_scale_factor)
            if image.shape != expected:
                raise ShapeError(f"control image {j} has shape {image.shape}; expected {expected} (one per image, "
                                 "at the output size in pixels, values in [0, 1])")
            checked.append(image)
        return checked, control

    @property
    def ip_adapter(self) -> bool:
        """True for an engine exported with an IP-Adapter: planning takes an image prompt's embedding."""
        return self.manifest.ip_adapter

    def _check_image_prompt(self, embeds: np.ndarray | None, scale: float, batch: int
                            ) -> tuple[np.ndarray, np.ndarray] | None:
        """(B, D) embeddings and the scale as planning takes them; an IP engine without an image prompt runs
        with zeros at scale 0, which adds exactly nothing. None for an engine without an IP-Adapter."""
        if not self.ip_adapter:
            if embeds is not None:
                raise InvalidInputError("this engine was exported without an IP-Adapter; re-export with "
                                        "--ip-adapter to use an image prompt", field="ip_adapter_image")
            return None
        if not is_finite_number(scale):
            raise InvalidInputError(f"IP-Adapter scale {scale!r} must be a finite number", field="ip_adapter_scale")
        dim = self.manifest.graphs["planning"].input("ip_image_embeds").shape[1]
        if embeds is None:
            return np.zeros((batch, dim), np.float32), np.zeros(1, np.float32)
        embeds = _float_array("IP-Adapter image embeddings", embeds, 2)
        if embeds.shape != (batch, dim):
            raise ShapeError(f"IP-Adapter image embeddings have shape {embeds.shape}; expected ({batch}, {dim}), one "
                             "per image")
        return embeds, np.array([scale], np.float32)

    @property
    def reads_text_mask(self) -> bool:
        """True for diffusion transformers whose planning graph reads the text's padding mask (PixArt)."""
        return any(spec.name == "encoder_attention_mask" for spec in self.manifest.graphs["planning"].inputs)

    def _check_text_masks(self, mask: np.ndarray | None, negative: np.ndarray | None,
                          shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
        """The prompts' and negative prompts' masks as float32 (B, text_len) of 0 and 1; ones where not given."""
        if not self.reads_text_mask:
            if mask is not None or negative is not None:
                raise InvalidInputError("this engine's model reads no text attention mask (a UNet); drop it",
                                        field="attention_mask")
            return None
        masks = []
        for label, value in (("attention mask", mask), ("negative attention mask", negative)):
            value = np.ones(shape, np.float32) if value is None else np.asarray(value)
            if value.shape != shape or not np.isin(value, (0, 1)).all():
                raise ShapeError(f"{label} has shape {value.shape}; expected {shape} of 0 (padding) and 1 (tokens)")
            masks.append(value.astype(np.float32))
        return masks[0], masks[1]

    def _position_embedding(self, latent_height: int, latent_width: int) -> np.ndarray | None:
        """A transformer's position embedding for this latent size (None for UNets)."""
        record = self.manifest.model.get("position_embedding")
        if record is None:
            return None
        patch = record["patch_size"]
        return position_embedding(record["width"], latent_height // patch, latent_width // patch, record["base_size"],
                                  record["interpolation_scale"])

    def _denoise_batch(self, context: BackendContext, prompt_embeds, negative_prompt_embeds, latents, added,
                       schedule: Schedule, scheduler: Scheduler, guidance_scale, generators: Generators, callback,
                       image_latents: np.ndarray | None = None, observer=None, control_images=(),
                       control: ControlRequest | None = None, image_prompt=None, text_masks=None) -> DenoiseResult:
        batch = latents.shape[0]
        cfg_fidelity = self.manifest.fidelity_guidance == "cfg"
        timesteps = scheduler.timesteps
        if image_latents is None:
            latents = latents * np.float32(scheduler.init_noise_sigma)  # (B, C, h, w): pure noise
        else:
            # Image to image (diffusers' get_timesteps + prepare_latents): start at the schedule's
            # t_start-th step, from the image latents noised to that step; no init_noise_sigma.
            begin = img2img_start(schedule.steps, schedule.strength) * scheduler.order
            scheduler.set_begin_index(begin)
            timesteps = timesteps[begin:]
            latents = scheduler.add_noise(image_latents, latents, timesteps[0])
        total = len(timesteps)
        # Evaluations 1..n planning (a full one every k_p-th, guided shallow ones between), guided up
        # to m, then a full fidelity one every k-th and shallow between; n, m and k count the steps that run.
        plan = schedule.plan(total)
        planning_steps = sum(evaluation.kind in PLANNING_KINDS for evaluation in plan)
        later = [kind for kind in ("fidelity", "shallow") if kind in self.manifest.graphs]

        dims = {"batch": batch, "latent_height": latents.shape[2], "latent_width": latents.shape[3]}
        self.check_dims({"batch": batch})
        context.prepare({**dims, "text_len": prompt_embeds.shape[1]})
        # Uploaded once per generation: (2B, L, D), unconditional half first.
        planning_inputs = {"encoder_hidden_states": np.concatenate([negative_prompt_embeds, prompt_embeds])}
        if image_prompt is not None:  # IP-Adapter: zeros for the unconditional half, as diffusers
            embeds, scale = image_prompt
            planning_inputs.update(ip_image_embeds=np.concatenate([np.zeros_like(embeds), embeds]),
                                   ip_adapter_scale=scale)
        if text_masks is not None:  # a transformer's text padding, unconditional half first
            mask, negative_mask = text_masks
            planning_inputs["encoder_attention_mask"] = np.concatenate([negative_mask, mask])
        position = self._position_embedding(latents.shape[2], latents.shape[3])
        if position is not None:  # the same for every step of every graph at this size
            for kind in ("planning", *later):
                context.set_inputs(kind, {"pos_embed": position})
        guided_inputs, unguided_inputs = {}, {}
        if added is not None:
            text_embeds, negative_text_embeds, time_ids = added
            planning_inputs.update(text_embeds=np.concatenate([negative_text_embeds, text_embeds]),
                                   time_ids=np.concatenate([time_ids, time_ids]))
            guided_inputs = {"text_embeds": planning_inputs["text_embeds"], "time_ids": planning_inputs["time_ids"]}
            # Unguided fidelity runs unconditionally: the negative (unconditional) added conditions.
            unguided_inputs = {"text_embeds": negative_text_embeds, "time_ids": time_ids}
        context.set_inputs("planning", planning_inputs)
        if schedule.planning_interval > 1:  # guided shallow steps read the same text and conditions (what they take)
            takes = {spec.name for spec in self.manifest.graphs["shallow_planning"].inputs}
            context.set_inputs("shallow_planning", {k: v for k, v in planning_inputs.items() if k in takes})
        if control_images:  # the control images, at each graph's batch; their factors change per step below
            planning_inputs = {f"control_image_{j}": np.concatenate([image, image])
                               for j, image in enumerate(control_images)}
            context.set_inputs("planning", planning_inputs)
            guided_inputs = {**guided_inputs, **planning_inputs}
            unguided_inputs = {**unguided_inputs, **{f"control_image_{j}": image
                                                     for j, image in enumerate(control_images)}}
            residuals = self.manifest.graphs["planning"].input("control_scales").shape[2]
            keep = controlnet_keep(total, control.starts, control.ends)
        if added is not None or control_images:
            for kind in later:
                context.set_inputs(kind, guided_inputs if cfg_fidelity else unguided_inputs)

        timings = StageTimings()
        for i, t in enumerate(timesteps):
            step, evaluation = i + 1, plan[i]
            started = time.perf_counter()
            timestep = np.array([t], dtype=np.float32)
            scaled = scheduler.scale_model_input(latents, t)
            if control_images:
                rows = 2 * batch if evaluation.guided else batch
                context.set_inputs(evaluation.kind, {"control_scales": residual_scales(
                    keep[i], control, residuals, rows, evaluation.guided)})
            if evaluation.guided:
                # Semantics planning: the full UNet with CFG at batch 2B; at step n its cache outputs
                # are left in the device buffers fidelity reads (merged, or a cache per half with
                # fidelity CFG: then fidelity and shallow steps stay guided up to m). A guided shallow
                # step writes the caches of the modules it runs into the same buffers, so at n each
                # cache holds its module's last output: from step n, or from the last full step.
                noise = context.run(evaluation.kind, np.concatenate([scaled, scaled]), timestep)
                noise_uncond, noise_text = np.split(noise, 2)
                noise_pred = noise_uncond + np.float32(guidance_scale) * (noise_text - noise_uncond)
            else:
                # Fidelity improving: batch B, no guidance, no text; cross-attention from the cache;
                # a shallow step reuses the deep feature of the last full one.
                noise_pred = context.run(evaluation.kind, scaled, timestep)
            latents = scheduler.step(noise_pred, t, latents, rng=generators).astype(np.float32, copy=False)
            elapsed = time.perf_counter() - started
            if step <= planning_steps:
                timings.planning_s += elapsed
                timings.planning_steps += 1
                timings.planning_shallow_steps += evaluation.kind == "shallow_planning"
            else:
                timings.fidelity_s += elapsed
                timings.fidelity_steps += 1
                if evaluation.kind == "shallow":
                    timings.shallow_steps += 1
                    timings.shallow_s += elapsed
            if observer is not None and evaluation.kind == "planning":
                observer(step, caches=context.read_caches())
            started = time.perf_counter()
            if step == planning_steps and step < total:
                # The switch: the cache buffers planning just wrote become fidelity's inputs.
                context.switch_to_fidelity()
            if cfg_fidelity and step < total and evaluation.guided and not plan[step].guided:
                # The guidance stop m: the per-half caches and deep feature become their means, on the device.
                context.merge_halves()
                if added is not None or control_images:
                    for kind in later:
                        context.set_inputs(kind, unguided_inputs)
            timings.switch_s += time.perf_counter() - started
            if callback is not None:
                callback(step, total)
        return DenoiseResult(latents, timings)
