"""Which denoiser a model has: the UNet every Stable Diffusion release uses, or a diffusion transformer."""

from __future__ import annotations

from typing import Any

TRANSFORMERS = ("PixArtTransformer2DModel", "SanaTransformer2DModel")  # diffusion transformers with a cross-attention (attn2) in every block


def is_transformer(model: Any) -> bool:
    """A diffusion transformer (PixArt, Sana): patches and a stack of blocks, not a UNet's (or ControlNet's) levels."""
    return type(model).__name__ in TRANSFORMERS


def patch_embedding(model: Any) -> Any:
    """A transformer's patch embedding (a diffusers ``PatchEmbed``): PixArt's ``pos_embed``, Sana's ``patch_embed``."""
    return model.pos_embed if hasattr(model, "pos_embed") else model.patch_embed


def reads_positions(model: Any) -> bool:
    """A transformer whose patch embedding adds a 2D sin-cos position embedding (PixArt; Sana 1.6B at
    1024 px has none: its Mix-FFN's depthwise convolution carries position)."""
    return is_transformer(model) and patch_embedding(model).pos_embed is not None


def sana_instruction() -> list[str]:
    """The "complex human instruction" ``SanaPipeline`` puts before every prompt by default (its lines)."""
    import inspect

    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)
