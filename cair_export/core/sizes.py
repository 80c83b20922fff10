"""Pixel sizes and the VAE's scale factor: the one default and the one check.

The runtime reads the same manifest entry (``model.vae_scale_factor``); see docs/architecture.md
for the runtime lines that repeat this rule.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

DEFAULT_VAE_SCALE_FACTOR = 8  # Stable Diffusion's VAE (three 2x downsamplings), when nothing says otherwise


def vae_scale_factor(block_out_channels: Sequence[int] | None = None) -> int:
    """Pixels per latent pixel of a diffusers ``AutoencoderKL`` with these blocks (``2 ** (blocks - 1)``)."""
    if not block_out_channels:
        return DEFAULT_VAE_SCALE_FACTOR
    return 2 ** (len(block_out_channels) - 1)


def manifest_vae_scale_factor(model_info: Mapping[str, Any]) -> int:
    """The factor a manifest's ``model`` entry records (older manifests: the default)."""
    return int(model_info.get("vae_scale_factor", DEFAULT_VAE_SCALE_FACTOR))


def size_problem(label: str, pixels: int, factor: int) -> str | None:
    """Why ``pixels`` cannot be an image side (not a positive multiple of the VAE's factor), or None."""
    if pixels <= 0 or pixels % factor:
        return f"{label} {pixels} is not a positive multiple of {factor} (the VAE's factor)"
    return None
