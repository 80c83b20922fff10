"""Torch reference CAIR: T-GATE's cross-attention caching as attention processors, and its loop.

This is the oracle every exported graph and the runtime are checked against, and a usable
PyTorch implementation in its own right (``CrossAttentionCache`` works on any diffusers
``UNet2DConditionModel`` and on PixArt's transformer).

Semantics (those of T-GATE's ``tgate_processor``, whose cross-attention caching CAIR follows): steps 1..n run the full UNet with
classifier-free guidance at batch 2B (unconditional half first). At step n every ``attn2`` output
(after ``to_out``, before the residual add) is kept, merged as the mean of the two halves. Steps
n+1..T run at batch B without guidance; each ``attn2`` returns its kept tensor and SDXL's added
conditions take their unconditional values. ``fidelity_guidance="cfg"`` keeps guidance and
batch 2B after step n, with separate caches for the two halves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from cair_export.core.deep_feature import deep_branch, recorded_deep_feature, shallow_unet
from cair_export.core.denoiser import predict_noise
from cair_export.core.models.families import is_transformer, sana_instruction
from cair_runtime.errors import InvalidInputError
from cair_runtime.schedule import PLANNING_KINDS, Schedule, default_guidance_stop, evaluation_plan

FIDELITY_GUIDANCE = ("none", "cfg")


@dataclass(frozen=True)
class CrossAttentionSite:
    """One cross-attention module whose output CAIR caches."""

    name: str  # graph tensor name, e.g. "cache_000"
    module: str  # module path, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    channels: int  # width of the module's output
    level: int  # spatial level: tokens = cdiv(latent_height, 2**level) * cdiv(latent_width, 2**level)


def _level(path: str, deepest: int) -> int:
    """Down block i works at level i, the mid block at the deepest, up block j at deepest - j."""
    block, index = re.match(r"(down_blocks|mid_block|up_blocks)\.?(\d*)", path).groups()
    if block == "down_blocks":
        return int(index)
    return deepest if block == "mid_block" else deepest - int(index)


def cross_attention_sites(unet: torch.nn.Module) -> list[CrossAttentionSite]:
    """Every ``attn2`` module of a UNet (down, mid, up) or a diffusion transformer (block order), in execution order.

    A transformer's blocks all work on its patch grid: tokens = latent pixels / patch_size**2, the level
    ``log2(patch_size)`` (patches tile the latent exactly, so the ceiling division is exact).
    """
    if is_transformer(unet):
        paths = [path for path, _ in unet.named_modules() if path.endswith(".attn2")]
        level = int(unet.config.patch_size).bit_length() - 1
        return [CrossAttentionSite(f"cache_{i:03d}", path, unet.get_submodule(path).to_out[0].out_features, level)
                for i, path in enumerate(paths)]
    deepest = len(unet.config.block_out_channels) - 1
    stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    paths = sorted((path for path, _ in unet.named_modules() if path.endswith(".attn2")),
                   key=lambda path: stage[path.split(".")[0]])  # stable: module order within a stage
    return [CrossAttentionSite(f"cache_{i:03d}", path, unet.get_submodule(path).to_out[0].out_features,
                               _level(path, deepest)) for i, path in enumerate(paths)]


@contextlib.contextmanager
def installed_processors(unet: torch.nn.Module, sites: Sequence[CrossAttentionSite],
                         make: Callable[[int, Any], Any]) -> Iterator[None]:
    """Give each site's module the processor ``make(index, its own processor)``; restore the originals on exit."""
    modules = [unet.get_submodule(site.module) for site in sites]
    originals = [module.processor for module in modules]
    try:
        for index, (module, original) in enumerate(zip(modules, originals)):
            module.set_processor(make(index, original))
        yield
    finally:
        for module, original in zip(modules, originals):
            module.set_processor(original)


class _CachingProcessor(torch.nn.Module):
    """Wraps a module's own attention processor; records or replays its output.

    A module, so that a processor with weights of its own (IP-Adapter's ``to_k_ip``/``to_v_ip``) stays
    registered under the attention module while wrapped (diffusers drops a module processor replaced
    by a plain one). ``__call__`` is defined directly, as diffusers' module processors do.
    """

    def __init__(self, inner: Any, cache: CrossAttentionCache, index: int):
        super().__init__()
        self.inner, self.cache, self.index = inner, cache, index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        cache = self.cache
        if cache.mode == "replay":  # fidelity stage: no Q/K/V/out projections, no text
            return cache.values[self.index]
        output = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        if cache.mode == "record":
            cache.values[self.index] = cache.merge(output)
        return output


class CrossAttentionCache:
    """Installs a caching processor on every ``attn2`` of a UNet (a context manager).

    ``mode`` is "compute" (plain cross-attention), "record" (compute and keep each output, merged
    per ``fidelity_guidance``) or "replay" (return the kept outputs without computing).
    ``controlnets``: their ``attn2`` modules are cached too, after the UNet's, named
    ``control{j}_cache_{i:03d}``, module paths ``controlnets.{j}.<path in net j>`` (as in ``CairGraph``).
    """

    def __init__(self, unet: torch.nn.Module, fidelity_guidance: str = "none",
                 controlnets: Sequence[torch.nn.Module] = ()):
        if fidelity_guidance not in FIDELITY_GUIDANCE:
            raise InvalidInputError(
                f"fidelity guidance {fidelity_guidance!r} is unknown; expected one of {', '.join(FIDELITY_GUIDANCE)}"
            )
        self.unet = unet
        self.fidelity_guidance = fidelity_guidance
        self.sites = cross_attention_sites(unet)
        if not self.sites:
            raise InvalidInputError("the UNet has no cross-attention (attn2) modules; CAIR has nothing to cache")
        self.owners: list[torch.nn.Module] = [unet] * len(self.sites)  # the module each site's path is relative to
        for j, net in enumerate(controlnets):
            own = [dataclasses.replace(site, name=f"control{j}_cache_{i:03d}", module=f"controlnets.{j}.{site.module}")
                   for i, site in enumerate(cross_attention_sites(net))]
            self.sites += own
            self.owners += [net] * len(own)
        self.values: list[torch.Tensor | None] = [None] * len(self.sites)
        self.mode = "compute"
        self._installed: contextlib.AbstractContextManager | None = None

    @staticmethod
    def _local(site: CrossAttentionSite) -> CrossAttentionSite:
        """The site with its module path relative to its owner (a ControlNet's without ``controlnets.{j}.``)."""
        return dataclasses.replace(site, module=re.sub(r"^controlnets\.\d+\.", "", site.module))

    def modules(self) -> list[torch.nn.Module]:
        """Each site's attention module, in site order."""
        return [owner.get_submodule(self._local(site).module) for owner, site in zip(self.owners, self.sites)]

    def merge(self, output: torch.Tensor) -> torch.Tensor:
        """(2B, tokens, C) -> (B, tokens, C): mean of the unconditional and conditional halves."""
        if self.fidelity_guidance == "cfg":
            return output
        return mean_of_halves(output)

    def __enter__(self) -> CrossAttentionCache:
        stack = contextlib.ExitStack()
        for owner in dict.fromkeys(self.owners):  # each model once, its sites with their global indices
            indices = [i for i, site_owner in enumerate(self.owners) if site_owner is owner]
            stack.enter_context(installed_processors(
                owner, [self._local(self.sites[i]) for i in indices],
                lambda index, inner, indices=indices: _CachingProcessor(inner, self, indices[index])))
        self._installed = stack
        self._installed.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._installed is not None:
            self._installed.__exit__(*exc_info)
        self._installed = None
        self.values = [None] * len(self.sites)
        self.mode = "compute"


def mean_of_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(2B, ...) -> (B, ...): the mean of the unconditional and conditional halves."""
    uncond, cond = tensor.chunk(2)
    return (uncond + cond) / 2


@torch.no_grad()
def cair_denoise(
    unet: torch.nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    *,
    num_inference_steps: int,
    cache_step: int | None,
    guidance_scale: float,
    added_cond: dict[str, torch.Tensor] | None = None,
    negative_added_cond: dict[str, torch.Tensor] | None = None,
    fidelity_guidance: str = "none",
    guidance_stop: int | None = None,
    deep_interval: int = 1,
    planning_interval: int = 1,
    deep_branch_id: int | None = None,
    skip_mode: str = "uniform",
    generator: torch.Generator | None = None,
    on_step: Callable[[int], None] | None = None,
    start_index: int | None = None,
    controlnets: Sequence[torch.nn.Module] = (),
    control_images: Sequence[torch.Tensor] = (),
    control: Any = None,
    ip_image_embeds: torch.Tensor | None = None,
    ip_adapter_scale: float = 1.0,
) -> torch.Tensor:
    """Sample with CAIR (and DeepCache's deep-feature caching) over a diffusers scheduler; returns the final latents.

    ``latents`` is the initial noise (B, C, h, w) before ``init_noise_sigma`` scaling, as diffusers'
    pipelines take it. Embeddings are (B, L, D); ``added_cond`` holds SDXL's ``text_embeds`` and
    ``time_ids`` (B, ...). ``cache_step == num_inference_steps`` computes the plain diffusers loop;
    ``cache_step=None`` is that loop itself, with the UNet's own processors (no caching installed).
    ``on_step(i)`` is called before the i-th UNet evaluation (0-based), e.g. to label recordings.

    The schedule (``cair_runtime.schedule.Schedule.plan``): guidance continues after n up to the
    guidance stop m (``fidelity_guidance="cfg"``: per-half caches, which become their mean at m;
    default m = n); after n (from the first step when ``cache_step`` is
    None) a full evaluation every ``deep_interval``-th and shallow ones between (DeepCache's
    ``deep_branch_id``, uniform or non-uniform ``skip_mode``); before n a full planning evaluation
    every ``planning_interval``-th and guided shallow ones between, reading the text (DeepCache's own
    steps: ``cache_step = T`` with ``planning_interval = k`` is DeepCache's loop).

    Image to image: ``start_index`` (diffusers' ``get_timesteps``' ``t_start``) starts the loop at
    ``scheduler.timesteps[start_index * scheduler.order]`` with the scheduler's begin index set, as
    diffusers' img2img pipelines do; ``latents`` are then the image latents already noised to that
    timestep (``prepare_latents``; not scaled by ``init_noise_sigma``), and n, m and the deep
    schedule count the ``num_inference_steps - start_index`` steps that run (T above means those).

    ControlNet (``cair_export.core.controlnet``): ``controlnets`` with one control image each
    (B, C, H, W) in [0, 1] and a ``cair_runtime.control.ControlRequest`` (scales, start/end, guess mode; default: scale 1
    over every step). Every evaluation runs every net (at scale 0 outside its start/end, as diffusers
    does) and adds their summed residuals to the UNet's; the nets' ``attn2`` are cached at n like the
    UNet's. No deep or planning interval with ControlNets.

    IP-Adapter (``cair_export.core.ip_adapter``; the UNet carries it): ``ip_image_embeds`` (B, D), the
    CLIP image embeddings, the unconditional half zeros, scaled by ``ip_adapter_scale``. Steps that
    replay the caches run without the image projection: the cached outputs already hold the image term.
    """
    scheduler.set_timesteps(num_inference_steps)
    timesteps, steps_run = scheduler.timesteps, num_inference_steps
    if start_index is None:
        latents = latents * scheduler.init_noise_sigma
    else:
        begin = start_index * scheduler.order
        timesteps, steps_run = timesteps[begin:], num_inference_steps - start_index
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
    evaluations = len(timesteps)
    if cache_step is None:  # DeepCache alone: every evaluation guided, deep caching from the first
        Schedule(steps_run, steps_run, steps_run, deep_interval, skip_mode)  # checks k and the skip mode
        plan = evaluation_plan(0, evaluations, evaluations, deep_interval, skip_mode)
        caching: contextlib.AbstractContextManager = contextlib.nullcontext()
    else:
        cfg = fidelity_guidance == "cfg"
        if guidance_stop is None:
            guidance_stop = default_guidance_stop(cache_step)
        if guidance_stop > cache_step and not cfg:
            raise InvalidInputError(f"guidance stop {guidance_stop} > cache step {cache_step} needs per-half caches: "
                                    "pass fidelity_guidance='cfg'", field="guidance_stop")
        # The schedule of the steps that run (image to image: T is those).
        plan = Schedule(steps_run, cache_step, guidance_stop, deep_interval, skip_mode,
                        planning_interval=planning_interval).plan(evaluations)
        caching = CrossAttentionCache(unet, fidelity_guidance, controlnets)
    planning = sum(evaluation.kind == "planning" for evaluation in plan)
    keep = None
    if controlnets:
        from cair_export.core.controlnet import control_residuals
        from cair_runtime.control import ControlRequest, controlnet_keep

        if len(control_images) != len(controlnets):
            raise InvalidInputError(f"{len(control_images)} control images for {len(controlnets)} ControlNets; give "
                                    "one each", field="control_image")
        if deep_interval > 1 or planning_interval > 1:
            raise InvalidInputError("deep-feature caching (a deep or planning interval above 1) does not take "
                                    "ControlNets yet; use intervals of 1", field="deep_interval")
        control = control or ControlRequest.make(len(controlnets))
        keep = controlnet_keep(evaluations, control.starts, control.ends)
    branch = None
    if deep_interval > 1 or planning_interval > 1:
        if deep_branch_id is None:
            raise InvalidInputError("a deep or planning interval above 1 needs a deep branch (deep_branch_id)",
                                    field="deep_branch")
        branch = deep_branch(unet, deep_branch_id)
    recording = recorded_deep_feature(unet, branch) if branch is not None else contextlib.nullcontext([])
    # As diffusers' prepare_extra_step_kwargs: only stochastic schedulers take a generator.
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    encoder_hidden_states = torch.cat([negative_prompt_embeds, prompt_embeds])  # (2B, L, D): uncond first
    guided_cond = None
    if added_cond is not None:
        guided_cond = {key: torch.cat([negative_added_cond[key], added_cond[key]]) for key in added_cond}

    adapter: contextlib.AbstractContextManager = contextlib.nullcontext()
    if ip_image_embeds is not None:
        if branch is not None:
            raise InvalidInputError("deep-feature caching (a deep or planning interval above 1) does not take an "
                                    "IP-Adapter yet; use intervals of 1", field="deep_interval")
        from cair_export.core.ip_adapter import adapter_scale, image_conditions, image_projection_removed

        adapter = adapter_scale(unet, ip_adapter_scale)
    deep_feature = None  # (2B or B, C_b, ...): kept by the last full evaluation
    with caching as cache, recording as recorded, adapter:
        for i, t in enumerate(timesteps):
            if on_step is not None:
                on_step(i)
            evaluation = plan[i]
            context = encoder_hidden_states
            if cache is not None:
                if evaluation.kind in PLANNING_KINDS:
                    # Each planning evaluation records what it computes: at n every cache holds its
                    # module's last output (a guided shallow step runs only the modules outside the branch).
                    cache.mode = "record" if i + 1 == planning or planning_interval > 1 else "compute"
                else:  # fidelity and shallow: cached cross-attention, no text
                    cache.mode, context = "replay", None
                if fidelity_guidance == "cfg" and i > 0 and plan[i - 1].guided and not evaluation.guided:
                    # The guidance stop m: the per-half caches and deep feature become their means.
                    cache.values = [mean_of_halves(value) for value in cache.values]
                    deep_feature = None if deep_feature is None else mean_of_halves(deep_feature)
            if evaluation.guided:
                # Planning (and fidelity before the guidance stop): batch 2B, guided.
                latent_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                conditions = guided_cond
            else:
                # Fidelity after the guidance stop: batch B, no guidance, unconditional extras.
                latent_input = scheduler.scale_model_input(latents, t)
                conditions = negative_added_cond
            if evaluation.kind in ("shallow", "shallow_planning"):
                # DeepCache between full steps: only the blocks outside the branch, on the kept feature.
                noise = shallow_unet(unet, branch, latent_input, t, deep_feature, context, conditions)
            else:
                recorded.clear()
                residuals = {}
                if keep is not None:
                    down, mid = control_residuals(controlnets, control_images, control, keep[i], latent_input, t,
                                                  context, conditions, evaluation.guided)
                    residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
                projection: contextlib.AbstractContextManager = contextlib.nullcontext()
                if ip_image_embeds is not None:
                    if context is None:  # replaying: no image tokens needed
                        projection = image_projection_removed(unet)
                    else:
                        conditions = {**(conditions or {}), **image_conditions(ip_image_embeds, evaluation.guided)}
                with projection:
                    noise = predict_noise(unet, latent_input, t, context, conditions, **residuals)
                deep_feature = recorded[-1] if recorded else None
            if evaluation.guided:
                noise_uncond, noise_text = noise.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
            else:
                noise_pred = noise
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
    return latents


@torch.no_grad()
@torch.no_grad()
def chunked_prompt_embeds(pipe: Any, texts: list[str], chunks: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Long prompts as A1111's web UI and compel encode them, in torch with the pipeline's own tokenizers
    and text encoders: each text's tokens split into ``chunks`` windows of ``model_max_length - 2``, each
    window wrapped in the start and end tokens, padded, encoded on its own, the windows' hidden states
    concatenated along the text axis (SD: the last layer's; SDXL: the penultimate of both encoders,
    concatenated on the channels) -> (len(texts), chunks * L, D), and SDXL's pooled embedding from the
    first window (None for SD-1.x/2.x). One window is diffusers' ``encode_prompt``."""
    sdxl = hasattr(pipe, "text_encoder_2")
    encoders = [(pipe.tokenizer, pipe.text_encoder)] + ([(pipe.tokenizer_2, pipe.text_encoder_2)] if sdxl else [])
    embeds, pooled = [], None
    for index, (tokenizer, encoder) in enumerate(encoders):
        length = tokenizer.model_max_length
        window = length - 2
        rows = []
        for text in texts:
            body = tokenizer(text, add_special_tokens=False).input_ids[:chunks * window]
            for chunk in range(chunks):
                part = body[chunk * window:(chunk + 1) * window]
                ids = [tokenizer.bos_token_id, *part, tokenizer.eos_token_id]
                rows.append(ids + [tokenizer.pad_token_id] * (length - len(ids)))
        output = encoder(torch.tensor(rows, device=encoder.device), output_hidden_states=True)
        hidden = output.hidden_states[-2] if sdxl else output[0]
        embeds.append(hidden.reshape(len(texts), chunks * length, hidden.shape[-1]))
        if sdxl and index == 1:
            pooled = output[0][::chunks]  # CLIPTextModelWithProjection's text_embeds, each text's first window
    return torch.cat(embeds, dim=-1), pooled


def encode_prompts(pipe: Any, prompts: list[str], negative_prompts: list[str] | None, latents: torch.Tensor,
                   num_images_per_prompt: int = 1, prompt_chunks: int | None = None):
    """Guided conditions as the diffusers SD or SDXL pipeline computes them, for ``latents`` (N, C, h, w).

    Returns ``(prompt_embeds, negative_embeds, added_cond, negative_added_cond)``; the added
    conditions (SDXL's pooled ``text_embeds`` and ``time_ids``, from ``_get_add_time_ids`` with no
    crop) are None for SD-1.x/2.x. ``prompt_chunks``: encode long prompts in that many windows
    (``chunked_prompt_embeds``) instead of the pipeline's ``encode_prompt``.
    """
    if hasattr(pipe, "transformer"):  # PixArt, Sana: T5 / Gemma-2 states and their mask, the mask an added condition
        if prompt_chunks is not None:
            raise InvalidInputError("long prompts in chunks are for CLIP text encoders; a transformer's encoder reads "
                                    f"{pipe.tokenizer.model_max_length} tokens at once", field="prompt_chunks")
        # Sana: the instruction its __call__ puts before every prompt by default (encode_prompt has none).
        instruction = ({"complex_human_instruction": sana_instruction()}
                       if "complex_human_instruction" in inspect.signature(pipe.encode_prompt).parameters else {})
        embeds, mask, negative, negative_mask = pipe.encode_prompt(
            prompts, negative_prompt=negative_prompts or "", num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=True, device=latents.device, clean_caption=False,
            max_sequence_length=pipe.tokenizer.model_max_length, **instruction)
        return embeds, negative, {"encoder_attention_mask": mask}, {"encoder_attention_mask": negative_mask}
    sdxl = hasattr(pipe, "text_encoder_2")
    if prompt_chunks is None:
        encoded = pipe.encode_prompt(prompts, negative_prompt=negative_prompts,
                                     num_images_per_prompt=num_images_per_prompt, do_classifier_free_guidance=True,
                                     **({} if sdxl else {"device": latents.device}))
    else:
        embeds, pooled = chunked_prompt_embeds(pipe, prompts, prompt_chunks)
        if negative_prompts is None and sdxl and pipe.config.force_zeros_for_empty_prompt:
            negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            negative, negative_pooled = chunked_prompt_embeds(pipe, negative_prompts or [""] * len(prompts),
                                                              prompt_chunks)
        encoded = tuple(None if value is None else value.repeat_interleave(num_images_per_prompt, dim=0)
                        for value in (embeds, negative, pooled, negative_pooled))
        if not sdxl:
            encoded = encoded[:2]
    if not sdxl:
        return (*encoded, None, None)
    prompt_embeds, negative_embeds, pooled, negative_pooled = encoded
    height, width = latents.shape[2] * pipe.vae_scale_factor, latents.shape[3] * pipe.vae_scale_factor
    time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=prompt_embeds.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    time_ids = time_ids.repeat(len(prompt_embeds), 1)  # (N, 6): original size, crop, target size
    return (prompt_embeds, negative_embeds, {"text_embeds": pooled, "time_ids": time_ids},
            {"text_embeds": negative_pooled, "time_ids": time_ids})


@torch.no_grad()
def cair_text_to_image(
    pipe: Any,
    prompts: list[str],
    negative_prompts: list[str] | None,
    latents: torch.Tensor,
    *,
    num_inference_steps: int,
    cache_step: int,
    guidance_scale: float,
    num_images_per_prompt: int = 1,
    scheduler: Any = None,
    prompt_chunks: int | None = None,
) -> torch.Tensor:
    """Reference CAIR text-to-image over a diffusers SD, SDXL or PixArt-Sigma pipeline: images in [0, 1], (N, 3, H, W).

    Prompt encoding, SDXL time ids and VAE post-processing are the pipeline's own
    (``encode_prompt``, ``_get_add_time_ids``, ``vae.decode``); the loop is ``cair_denoise``.
    ``prompt_chunks``: long prompts in that many windows (``chunked_prompt_embeds``).
    """
    prompt_embeds, negative_embeds, added, negative_added = encode_prompts(
        pipe, prompts, negative_prompts, latents, num_images_per_prompt=num_images_per_prompt,
        prompt_chunks=prompt_chunks)
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet  # PixArt or Sana, or SD's UNet
    latents = cair_denoise(denoiser, scheduler or pipe.scheduler, latents, prompt_embeds, negative_embeds,
                           num_inference_steps=num_inference_steps, cache_step=cache_step,
                           guidance_scale=guidance_scale, added_cond=added, negative_added_cond=negative_added)
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return (images / 2 + 0.5).clamp(0, 1)
