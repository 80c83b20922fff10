"""Count multiply-accumulates of one planning, fidelity and shallow UNet evaluation, and of a generation.

DeepCache's own evaluations (guided every step, cross-attention computed) are counted beside them
(``count_deepcache_macs``), for comparing the peer's schedules with CAIR's.

The UNet runs on the meta device (shapes only, no weights) with hooks on every module. Two
conventions side by side: convolutions and linear layers only (what published tables count),
and the same plus the attention-score matmuls ``QK^T`` and ``AV``. The parts that run once per
image (text encoders, VAE decoder) are counted apart (``count_pipeline_macs``), for end-to-end
bounds (``generation_macs(..., per_image=...)``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from cair_export.core.deep_feature import DEEP_FEATURE, deep_branch, shallow_unet
from cair_export.core.graphs import CairGraph, cache_specs, graph_specs, text_mask
from cair_export.core.models import LoadedModel
from cair_export.core.models.families import TRANSFORMERS
from cair_export.core.denoiser import predict_noise
from cair_export.core.reference import CrossAttentionCache
from cair_runtime.errors import InvalidInputError
from cair_runtime.schedule import PLANNING_KINDS, Schedule, check_cache_step, default_guidance_stop, full_evaluations

CONVENTIONS = ("conv_linear", "with_attention")


@dataclass(frozen=True)
class GraphMacs:
    conv_linear: int  # Conv2d and Linear layers
    attention: int  # QK^T and AV of every attention module that runs

    @property
    def with_attention(self) -> int:
        return self.conv_linear + self.attention


@contextmanager
def _counting(root: torch.nn.Module, skip: frozenset[int] = frozenset()) -> Iterator[dict[str, int]]:
    """Hooks on every Conv2d, Linear and diffusers ``Attention`` under ``root``; yields the running totals.

    ``skip``: ids of attention modules whose scores are not computed (replayed caches).
    """
    from diffusers.models.attention_processor import Attention

    totals = {"conv_linear": 0, "attention": 0}

    def conv_hook(module, args, output):
        kernel = module.kernel_size[0] * module.kernel_size[1]
        totals["conv_linear"] += output.numel() * (module.in_channels // module.groups) * kernel

    def linear_hook(module, args, output):
        totals["conv_linear"] += output.numel() * module.in_features

    def attention_hook(module, args, kwargs, output):
        if id(module) in skip:
            return
        hidden_states = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        if hidden_states.ndim == 4:  # VAE attention takes (B, C, H, W)
            batch, queries = hidden_states.shape[0], hidden_states.shape[2] * hidden_states.shape[3]
        else:
            batch, queries = hidden_states.shape[0], hidden_states.shape[1]
        if isinstance(context, tuple):  # IP-Adapter: the text, then each adapter's image tokens
            text, images = context
            keys = text.shape[1] + sum(image.shape[-2] * (image.shape[1] if image.ndim == 4 else 1)
                                       for image in images)
        else:
            keys = context.shape[1] if context is not None else queries
        if type(module.processor).__name__ == "SanaLinearAttnProcessor2_0":
            # Sana's ReLU linear attention: V (padded with a row of ones) times K^T, then that times Q, per head:
            # 2 * batch * tokens * (head_dim + 1) * head_dim * heads, linear in the tokens.
            totals["attention"] += 2 * batch * queries * (module.inner_dim // module.heads + 1) * module.inner_dim
            return
        # QK^T and AV: each batch * queries * keys * inner_dim multiply-adds.
        totals["attention"] += 2 * batch * queries * keys * module.inner_dim

    handles = []
    for module in root.modules():
        if isinstance(module, torch.nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
        elif isinstance(module, Attention):
            handles.append(module.register_forward_hook(attention_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            yield totals
    finally:
        for handle in handles:
            handle.remove()


def _count(unet: torch.nn.Module, cache: CrossAttentionCache, inputs: dict[str, torch.Tensor],
           branch=None) -> GraphMacs:
    replayed = {id(unet.get_submodule(site.module)) for site in cache.sites} if cache.mode == "replay" else set()
    with _counting(unet, frozenset(replayed)) as totals:
        added = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs} or None
        if DEEP_FEATURE in inputs:  # the shallow graph: only the blocks outside the branch run
            # No encoder_hidden_states: CAIR's shallow graph replays its caches; DeepCache's computes them.
            shallow_unet(unet, branch, inputs["sample"], inputs["timestep"], inputs[DEEP_FEATURE],
                         inputs.get("encoder_hidden_states"), added)
        else:
            conditions = {**(added or {}), **text_mask(inputs)} or None
            predict_noise(unet, inputs["sample"], inputs["timestep"], inputs.get("encoder_hidden_states"), conditions)
    return GraphMacs(totals["conv_linear"], totals["attention"])


def count_graph_macs(model: LoadedModel, height: int, width: int, batch: int = 1,
                     fidelity_guidance: str = "none", deep_branch_id: int | None = None,
                     prompt_chunks: int = 1) -> dict[str, GraphMacs]:
    """MACs of one planning evaluation (batch 2B) and one fidelity evaluation (batch B or 2B); with a
    deep branch, of one shallow evaluation too (the fidelity batch) and one guided shallow evaluation
    (batch 2B, cross-attention computed: DeepCache's own shallow step). ``prompt_chunks``: the text
    is that many text-encoder windows long (long prompts; only the graphs that read it change)."""
    unet = model.unet
    device = next(unet.parameters()).device
    dims = {"batch": batch, "latent_height": height // model.vae_scale_factor,
            "latent_width": width // model.vae_scale_factor, "text_len": model.text_len * prompt_chunks}
    branch = None if deep_branch_id is None else deep_branch(unet, deep_branch_id)
    results = {}
    with CrossAttentionCache(unet, fidelity_guidance, model.controlnets) as cache:
        ios = graph_specs(model, cache_specs(cache.sites), fidelity_guidance, branch)
        for kind, io in ios.items():
            inputs = {spec.name: torch.zeros(spec.resolve(dims), device=device) for spec in io.inputs}
            if "ip_adapter_scale" in inputs:  # at scale 0 diffusers skips the image term: count it
                inputs["ip_adapter_scale"] = torch.ones_like(inputs["ip_adapter_scale"])
            if model.controlnets or model.ip_adapter is not None:
                # The graph itself: the fused nets (their attn2 replayed after n) or the image prompt (planning only)
                results[kind] = _count_graph(CairGraph(unet, cache, io, branch, model.controlnets), cache, inputs)
                continue
            if kind in ("fidelity", "shallow"):
                cache.mode = "replay"
                cache.values = [inputs.get(site.name) for site in cache.sites]
            else:
                cache.mode = "compute"
            results[kind] = _count(unet, cache, inputs, branch)
    return results


def _count_graph(graph: torch.nn.Module, cache: CrossAttentionCache, inputs: dict[str, torch.Tensor]) -> GraphMacs:
    """One evaluation of a ``CairGraph`` (it sets the cache's mode itself: planning computes, fidelity replays)."""
    replayed = frozenset(id(module) for module in cache.modules()) if graph.io.kind != "planning" else frozenset()
    with _counting(graph, replayed) as totals:
        graph(*(inputs[name] for name in graph.input_names))
    return GraphMacs(totals["conv_linear"], totals["attention"])


def manifest_model(manifest) -> LoadedModel:
    """The exported UNet's architecture on the meta device, from a manifest's ``model.unet_config``
    (no weights, no source folder needed): what ``count_graph_macs`` counts for an engine folder."""
    import diffusers

    info = manifest.model
    if "unet_config" not in info:
        raise ValueError("the manifest records no unet_config; re-export the folder to count its MACs")
    config = dict(info["unet_config"])
    name = info.get("denoiser", "UNet2DConditionModel")  # recorded for transformers; older folders hold UNets
    if name not in ("UNet2DConditionModel", *TRANSFORMERS):
        raise ValueError(f"the manifest's denoiser {name!r} is not one cair-export exports")
    denoiser = getattr(diffusers, name)
    with torch.device("meta"):
        unet = denoiser.from_config(config)
    return LoadedModel(info.get("name", "model"), str(info.get("source")), info.get("family", "sd15"), unet.eval(),
                       dict(manifest.scheduler_config), vae_scale_factor=manifest.vae_scale_factor,
                       text_len=manifest.dim("text_len").opt)


def count_deepcache_macs(model: LoadedModel, height: int, width: int, deep_branch_id: int,
                         batch: int = 1) -> dict[str, GraphMacs]:
    """MACs of DeepCache's two evaluations (Ma et al. 2024), both guided (batch 2B) with cross-attention computed.

    "full": the whole UNet, the planning graph's count. "shallow": the blocks outside the branch, as
    CAIR's shallow graph, plus the cross-attention of the transformer blocks among them, which
    DeepCache recomputes from the text where CAIR replays its caches.
    """
    unet = model.unet
    device = next(unet.parameters()).device
    dims = {"batch": batch, "latent_height": height // model.vae_scale_factor,
            "latent_width": width // model.vae_scale_factor, "text_len": model.text_len}
    branch = deep_branch(unet, deep_branch_id)
    with CrossAttentionCache(unet, "cfg") as cache:  # mode "compute": plain cross-attention
        ios = graph_specs(model, cache_specs(cache.sites), "cfg", branch)  # "cfg": shallow at 2B, as guided
        full = {spec.name: torch.zeros(spec.resolve(dims), device=device) for spec in ios["planning"].inputs}
        shallow = {spec.name: torch.zeros(spec.resolve(dims), device=device) for spec in ios["shallow"].inputs
                   if spec.name in ("sample", "timestep", DEEP_FEATURE, "text_embeds", "time_ids")}
        shallow["encoder_hidden_states"] = full["encoder_hidden_states"]
        return {"full": _count(unet, cache, full), "shallow": _count(unet, cache, shallow, branch)}


def deepcache_generation_macs(per_evaluation: dict[str, GraphMacs], steps: int, cache_interval: int,
                              skip_mode: str = "uniform") -> dict[str, dict[str, float]]:
    """Per convention: full, shallow, full_steps, baseline_total (T * full) and deepcache_total of DeepCache's schedule.

    Its helper runs the full UNet where ``step % cache_interval == 0`` (``range(0, T, k)``, as
    ``cair_runtime.schedule.full_evaluations``; ``skip_mode`` "non-uniform" places them as its
    non-uniform variant) and the shallow evaluation at the other steps, every one guided;
    ``per_evaluation`` from ``count_deepcache_macs``.
    """
    if isinstance(cache_interval, bool) or not isinstance(cache_interval, int) or cache_interval < 1:
        raise InvalidInputError(f"DeepCache's cache interval {cache_interval!r} must be an integer >= 1 (1: every step full)")
    full_steps = len(full_evaluations(steps, cache_interval, skip_mode))
    table = {}
    for convention in CONVENTIONS:
        full, shallow = (getattr(per_evaluation[kind], convention) for kind in ("full", "shallow"))
        total = full_steps * full + (steps - full_steps) * shallow
        table[convention] = {"full": full, "shallow": shallow, "full_steps": full_steps, "baseline_total": steps * full,
                             "deepcache_total": total, "speedup_bound": steps * full / total}
    return table


def count_pipeline_macs(model: LoadedModel, height: int, width: int, batch: int = 1,
                        prompt_chunks: int = 1) -> GraphMacs:
    """MACs of what runs once per generation: every text encoder over the prompts and negative prompts
    (2B sequences, each ``prompt_chunks`` windows) and the VAE decoder over B latents. Conv+linear as for the UNet; ``attention``
    holds the VAE's self-attention scores (the text encoders' CLIP attention is not hooked: its
    scores are 2 * 77 * 77 * width MACs per layer and sequence, about 12.8 / width of the layer's
    linear MACs with a 4x MLP: 1-2% at SD's widths 768-1280)."""
    if not model.has_pipeline:
        raise ValueError(f"{model.name} has no text encoders and VAE to count")
    device = next(model.unet.parameters()).device
    conv_linear = attention = 0
    for encoder in model.text_encoders:
        with _counting(encoder.model) as totals:
            encoder.model(torch.zeros(2 * batch * prompt_chunks, model.text_len, dtype=torch.long, device=device))
        conv_linear, attention = conv_linear + totals["conv_linear"], attention + totals["attention"]
    latent = torch.zeros(batch, model.vae.config.latent_channels, height // model.vae_scale_factor,
                         width // model.vae_scale_factor, device=device)
    with _counting(model.vae) as totals:
        model.vae.decode(latent, return_dict=False)
    return GraphMacs(conv_linear + totals["conv_linear"], attention + totals["attention"])


def generation_macs(per_graph: dict[str, GraphMacs], steps: int, cache_step: int,
                    per_image: GraphMacs | None = None, *, fidelity_guidance: str = "none",
                    guidance_stop: int | None = None, deep_interval: int = 1,
                    skip_mode: str = "uniform", planning_interval: int = 1) -> dict[str, dict[str, float]]:
    """Per convention: planning (and shallow_planning) per evaluation at 2B, fidelity (and shallow) per
    unguided evaluation at B, baseline_total (T*P + E) and cair_total.

    cair_total follows the schedule (``cair_runtime.schedule.Schedule.plan``): n*P, then each
    fidelity or shallow evaluation at its batch (2B before the guidance stop m, B after; MACs are
    linear in the batch), + E: ``n*P + (T-n)*F + E`` for m = n and k = 1. ``per_graph`` holds
    fidelity and shallow at the batch ``fidelity_guidance`` exports them at (2B with "cfg").
    ``per_image`` (E, from ``count_pipeline_macs``): text encoders and VAE decoder, for an end-to-end
    bound; without it E = 0 (the UNet loop alone).
    """
    check_cache_step(cache_step, steps)
    if guidance_stop is None:
        guidance_stop = default_guidance_stop(cache_step)
    if max(deep_interval, planning_interval) > 1 and "shallow" not in per_graph:
        raise ValueError("a deep or planning interval above 1 needs the shallow graphs' counts "
                         "(count_graph_macs deep_branch_id)")
    plan = Schedule(steps, cache_step, guidance_stop, deep_interval, skip_mode,
                    planning_interval=planning_interval).plan(steps)
    exported_halves = 2 if fidelity_guidance == "cfg" else 1  # fidelity and shallow were counted at 2B
    table = {}
    for convention in CONVENTIONS:
        planning = getattr(per_graph["planning"], convention)
        # Planning-phase graphs were counted at their batch 2B; the others at the export's fidelity
        # batch, reported per unguided evaluation (batch B) and doubled where guided.
        per_kind = {kind: getattr(count, convention) // (1 if kind in PLANNING_KINDS else exported_halves)
                    for kind, count in per_graph.items()}
        once = getattr(per_image, convention) if per_image is not None else 0
        baseline = steps * planning + once
        cair = once + sum(per_kind[e.kind] * (2 if e.guided and e.kind not in PLANNING_KINDS else 1) for e in plan)
        table[convention] = {"planning": planning, **per_kind, "baseline_total": baseline,
                             "cair_total": cair, "speedup_bound": baseline / cair}
    return table
