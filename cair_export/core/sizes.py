"""The VAE's scale factor of a model being exported.

The default and the pixel-size check are the runtime's (``cair_runtime.manifest``), which reads
the factor back from the manifest (``Manifest.vae_scale_factor``).
"""

from __future__ import annotations

from typing import Sequence

from cair_runtime.manifest import DEFAULT_VAE_SCALE_FACTOR


def vae_scale_factor(block_out_channels: Sequence[int] | None = None) -> int:
    """Pixels per latent pixel of a diffusers ``AutoencoderKL`` with these blocks (``2 ** (blocks - 1)``)."""
    if not block_out_channels:
        return DEFAULT_VAE_SCALE_FACTOR
    return 2 ** (len(block_out_channels) - 1)
