"""One evaluation of a denoiser as its diffusers pipeline calls it: a UNet, or a diffusion transformer (PixArt,
Sana) with its own call convention, and the transformer without its caption projection for replayed steps."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from cair_export.core.models.families import is_transformer


class _NoText(torch.nn.Module):
    """Stands in for Sana's caption projection when no text is given: a (B, 1, width) zero placeholder the
    blocks pass to their ``attn2``, which replays its cache without reading it (the trace keeps none of it)."""

    def __init__(self, sample: torch.Tensor, width: int):
        super().__init__()
        self.sample, self.width = sample, width

    def forward(self, text: None) -> torch.Tensor:
        return self.sample.new_zeros(self.sample.shape[0], 1, self.width)


@contextlib.contextmanager
def caption_projection_removed(model: torch.nn.Module, sample: torch.Tensor) -> Iterator[None]:
    """A transformer without its caption projection (and Sana's caption norm), for steps that replay every
    ``attn2``: only the cross-attention reads the projected text. PixArt skips a None projection and passes
    no text (None) through the blocks; Sana always projects, so it gets ``_NoText``'s placeholder."""
    projection, norm = model.caption_projection, getattr(model, "caption_norm", None)
    if norm is None:
        model.caption_projection = None
    else:
        model.caption_projection = _NoText(sample, norm.weight.shape[0])
        model.caption_norm = torch.nn.Identity()
    try:
        yield
    finally:
        model.caption_projection = projection
        if norm is not None:
            model.caption_norm = norm


def predict_noise(model: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor | None,
                  conditions: dict[str, Any] | None, **residuals: Any) -> torch.Tensor:
    """One evaluation of the denoiser as its diffusers pipeline calls it: the predicted noise, latent channels.

    UNets take ``conditions`` as ``added_cond_kwargs`` (SDXL). Transformers take the timestep per row (Sana's
    times its ``timestep_scale``, as its pipeline does), the text's attention mask
    (``conditions["encoder_attention_mask"]``, unread when ``context`` is None: every ``attn2`` replays its
    cache) and, PixArt, no resolution embedding (Sigma); a learned-sigma output keeps its first half of the
    channels, as the pipelines do after guidance (the same: guidance is per channel).
    """
    if not is_transformer(model):
        return model(sample, timestep, context, added_cond_kwargs=conditions, return_dict=False, **residuals)[0]
    mask = (conditions or {}).get("encoder_attention_mask")
    timestep = timestep.reshape(-1).expand(sample.shape[0])  # traced: a dynamic batch
    if hasattr(model.config, "timestep_scale"):  # Sana
        timestep, extra = timestep * model.config.timestep_scale, {}
    else:  # PixArt
        extra = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    projection = caption_projection_removed(model, sample) if context is None else contextlib.nullcontext()
    with projection:
        output = model(sample, encoder_hidden_states=context, encoder_attention_mask=None if context is None else mask,
                       timestep=timestep, return_dict=False, **extra)[0]
    if model.config.out_channels == 2 * model.config.in_channels:
        output = output[:, :model.config.in_channels]
    return output
