"""Which denoiser a model has: the UNet every Stable Diffusion release uses, or a diffusion transformer."""

from __future__ import annotations

from typing import Any

TRANSFORMERS = ("PixArtTransformer2DModel",)  # diffusion transformers with a cross-attention (attn2) in every block


def is_transformer(model: Any) -> bool:
    """A diffusion transformer (PixArt): patches and a stack of blocks, not a UNet's (or ControlNet's) levels."""
    return type(model).__name__ in TRANSFORMERS
