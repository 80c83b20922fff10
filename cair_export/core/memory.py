"""Handing memory back during an export: the torch UNet once traced, onnxruntime's buffers after each run.

An export holds a UNet in torch and then has onnxruntime map the graphs' copy; without these the
peak is both at once plus whatever glibc keeps of freed pages.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from pathlib import Path
from typing import Callable

from cair_export.core.models import LoadedModel


def release_unet_weights(model: LoadedModel, progress: Callable[[str], None]) -> None:
    """Free the torch UNet's weights (the model is unusable for computing afterwards): the graphs are
    traced and the torch outputs kept, so onnxruntime's checks can have the memory."""
    resident = _resident_gb()
    model.unet.to("meta")
    free_memory()
    progress(f"released the torch UNet ({resident:.1f} -> {_resident_gb():.1f} GB resident)")


def free_memory() -> None:
    """Collect garbage and hand the freed heap pages back to the system now (glibc keeps them otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _resident_gb() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    return float("nan")
