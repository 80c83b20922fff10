"""The type checks every user-facing number goes through (bool is an int in Python, never here), the
guidance scale's range, and the last check before numbers become an image."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cair_runtime.errors import InvalidInputError, NonFiniteResultError

# Classifier-free guidance scales accepted everywhere (CLI, Python API, HTTP). Models are tuned for
# about 1..15; far beyond 100 the guided noise prediction leaves float32's range within a step and
# the image is black.
GUIDANCE_SCALE_RANGE = (0.0, 100.0)


def is_integer(value: Any) -> bool:
    """An int (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """An int or float (Python or numpy), not a bool, neither NaN nor infinite nor past float64's range."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (JSON takes 10**400)
        return False


def check_guidance_scale(value: Any) -> None:
    """A finite number in ``GUIDANCE_SCALE_RANGE``, or ``InvalidInputError(field="guidance_scale")``."""
    low, high = GUIDANCE_SCALE_RANGE
    if not is_finite_number(value):
        raise InvalidInputError(f"guidance scale {value!r} must be a finite number", field="guidance_scale")
    if not low <= value <= high:
        raise InvalidInputError(f"guidance scale {value!r} is outside {low:g}..{high:g} (models are tuned for about "
                                "1..15; larger values overflow float32)", field="guidance_scale")


def check_finite_result(array: np.ndarray, what: str) -> None:
    """Refuse to turn NaN or infinite values into an image: ``NonFiniteResultError`` naming how many."""
    if not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise NonFiniteResultError(f"the {what} hold {bad} NaN or infinite values of {array.size}: the model "
                                   "overflowed (an adapter's weights or scale, or the guidance scale, are too large "
                                   "for it); nothing was written")
