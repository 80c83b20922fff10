"""Count multiply-accumulates of one planning and one fidelity UNet evaluation, and of a generation.

The UNet runs on the meta device (shapes only, no weights) with hooks on every module. Two
conventions side by side: convolutions and linear layers only (what published tables count),
and the same plus the attention-score matmuls ``QK^T`` and ``AV``. Text encoders and the VAE
are not counted (they run once per image, not once per step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cair_export.graphs import graph_specs, cache_specs
from cair_export.models import LoadedModel
from cair_export.reference import CrossAttentionCache
from cair_runtime.stages import check_cache_step

CONVENTIONS = ("conv_linear", "with_attention")


@dataclass(frozen=True)
class GraphMacs:
    conv_linear: int  # Conv2d and Linear layers
    attention: int  # QK^T and AV of every attention module that runs

    @property
    def with_attention(self) -> int:
        return self.conv_linear + self.attention


def _count(unet: torch.nn.Module, cache: CrossAttentionCache, inputs: dict[str, torch.Tensor]) -> GraphMacs:
    from diffusers.models.attention_processor import Attention

    totals = {"conv_linear": 0, "attention": 0}
    replayed = {id(unet.get_submodule(site.module)) for site in cache.sites} if cache.mode == "replay" else set()

    def conv_hook(module, args, output):
        kernel = module.kernel_size[0] * module.kernel_size[1]
        totals["conv_linear"] += output.numel() * (module.in_channels // module.groups) * kernel

    def linear_hook(module, args, output):
        totals["conv_linear"] += output.numel() * module.in_features

    def attention_hook(module, args, kwargs, output):
        if id(module) in replayed:
            return
        hidden_states = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        batch, queries = hidden_states.shape[0], hidden_states.shape[1]
        keys = context.shape[1] if context is not None else queries
        # QK^T and AV: each batch * queries * keys * inner_dim multiply-adds.
        totals["attention"] += 2 * batch * queries * keys * module.inner_dim

    handles = []
    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
        elif isinstance(module, Attention):
            handles.append(module.register_forward_hook(attention_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            added = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs} or None
            unet(inputs["sample"], inputs["timestep"], inputs.get("encoder_hidden_states"),
                 added_cond_kwargs=added, return_dict=False)
    finally:
        for handle in handles:
            handle.remove()
    return GraphMacs(totals["conv_linear"], totals["attention"])


def count_graph_macs(model: LoadedModel, height: int, width: int, batch: int = 1,
                     fidelity_guidance: str = "none") -> dict[str, GraphMacs]:
    """MACs of one planning evaluation (batch 2B) and one fidelity evaluation (batch B or 2B)."""
    unet = model.unet
    device = next(unet.parameters()).device
    dims = {"batch": batch, "latent_height": height // model.vae_scale_factor,
            "latent_width": width // model.vae_scale_factor, "text_len": model.text_len}
    results = {}
    with CrossAttentionCache(unet, fidelity_guidance) as cache:
        ios = graph_specs(model, cache_specs(cache.sites), fidelity_guidance)
        for kind, io in ios.items():
            inputs = {spec.name: torch.zeros(spec.resolve(dims), device=device) for spec in io.inputs}
            if kind == "fidelity":
                cache.mode = "replay"
                cache.values = [inputs[site.name] for site in cache.sites]
            else:
                cache.mode = "compute"
            results[kind] = _count(unet, cache, inputs)
    return results


def generation_macs(per_graph: dict[str, GraphMacs], steps: int, cache_step: int) -> dict[str, dict[str, float]]:
    """Per convention: planning, fidelity, baseline_total (T*P) and cair_total (n*P + (T-n)*F)."""
    check_cache_step(cache_step, steps)
    table = {}
    for convention in CONVENTIONS:
        planning = getattr(per_graph["planning"], convention)
        fidelity = getattr(per_graph["fidelity"], convention)
        baseline = steps * planning
        cair = cache_step * planning + (steps - cache_step) * fidelity
        table[convention] = {"planning": planning, "fidelity": fidelity, "baseline_total": baseline,
                             "cair_total": cair, "speedup_bound": baseline / cair}
    return table
