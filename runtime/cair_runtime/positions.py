"""The 2D sin-cos position embedding of a diffusion transformer's patch grid, in numpy.

Port of diffusers' ``get_2d_sincos_pos_embed`` (``PatchEmbed`` at sizes other than its own): the
transformer graphs take it as an input, since the module computes it from Python numbers that a traced
graph would freeze at the trace size.
"""

from __future__ import annotations

import numpy as np


def _sincos(width: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, width): sines then cosines of position x 10000^(-2i/width), in float64."""
    omega = np.arange(width // 2, dtype=np.float64) / (width / 2.0)
    angles = np.outer(positions.astype(np.float64), 1.0 / 10000**omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def position_embedding(width: int, grid_height: int, grid_width: int, base_size: int,
                       interpolation_scale: float) -> np.ndarray:
    """(1, grid_height * grid_width, width) float32, patches in row-major order: the first half of each
    row embeds the patch's column, the second half its row (diffusers' layout)."""
    if width % 4:
        raise ValueError(f"a 2D sin-cos embedding needs a width divisible by 4, not {width}")
    rows = np.arange(grid_height, dtype=np.float32) / np.float32(grid_height / base_size) / np.float32(interpolation_scale)
    columns = np.arange(grid_width, dtype=np.float32) / np.float32(grid_width / base_size) / np.float32(interpolation_scale)
    column, row = np.meshgrid(columns, rows)  # (grid_height, grid_width) each
    embedding = np.concatenate([_sincos(width // 2, column.reshape(-1)), _sincos(width // 2, row.reshape(-1))], axis=1)
    return embedding.astype(np.float32)[None]
