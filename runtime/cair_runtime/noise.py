"""Random numbers per image: image k draws everything from its own generator.

diffusers' list-of-generators semantics (``randn_tensor`` with one ``torch.Generator`` per batch
row): image k's initial noise and every ancestral noise draw come from ``default_rng(seed_k)``
alone, so the number of images in a call, the chunking by the engine's max batch and the other
images of the batch never change it.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np

from cair_runtime.checks import is_integer
from cair_runtime.errors import InvalidInputError

# One generator for the whole batch (a caller's own), or one per batch row.
Generators = Union[np.random.Generator, Sequence[np.random.Generator]]


def check_seed(seed: Any) -> int:
    """numpy's generators take non-negative integers only; say so before any work."""
    if not is_integer(seed) or seed < 0:
        raise InvalidInputError(f"seed {seed!r} must be a non-negative integer")
    return int(seed)


def image_seeds(seed: int | Sequence[int], count: int) -> list[int]:
    """One seed per image: ``seed + k`` for an int, or the list itself (one per image): the one rule."""
    if is_integer(seed):
        return [check_seed(seed) + k for k in range(count)]
    if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence):
        raise InvalidInputError(f"seed {seed!r} must be a non-negative integer or a list of them, one per image")
    if len(seed) != count:
        raise InvalidInputError(f"{len(seed)} seeds for {count} images; give one per image")
    return [check_seed(s) for s in seed]


def image_generators(seeds: Sequence[int]) -> list[np.random.Generator]:
    """One ``np.random.default_rng(seed)`` per image."""
    return [np.random.default_rng(check_seed(seed)) for seed in seeds]


def standard_normal(rng: Generators, shape: tuple[int, ...]) -> np.ndarray:
    """float32 standard normal noise of ``shape``; with a list of generators, row k from generator k."""
    if isinstance(rng, np.random.Generator):
        return rng.standard_normal(shape, dtype=np.float32)
    if len(rng) != shape[0]:
        raise InvalidInputError(f"{len(rng)} generators for a batch of {shape[0]}; give one per image")
    return np.stack([generator.standard_normal(shape[1:], dtype=np.float32) for generator in rng])


def seeded_latents(seeds: Sequence[int], shape: tuple[int, ...]) -> np.ndarray:
    """Initial noise (len(seeds), *shape): image k is ``default_rng(seeds[k]).standard_normal(shape)``."""
    return standard_normal(image_generators(seeds), (len(seeds), *shape))
