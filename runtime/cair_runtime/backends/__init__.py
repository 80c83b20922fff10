"""Execution backends: each runs an engine folder's planning and fidelity graphs.

A backend keeps the cross-attention caches on its device: planning writes them into buffers the
backend allocated, fidelity reads the same buffers. Per step only the latents (in) and
``noise_pred`` (out) cross between host and device. Optional backends (TensorRT, AOTInductor)
are imported only when asked for, so their packages (tensorrt, torch) are never loaded otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np

from cair_runtime.errors import InvalidInputError
from cair_runtime.manifest import Manifest

BACKENDS = ("onnxruntime", "tensorrt", "aoti")


class Backend(Protocol):
    def prepare(self, dims: Mapping[str, int]) -> None:
        """Allocate the device buffers (caches, outputs) for these concrete dims; a no-op if unchanged."""

    def switch_to_fidelity(self) -> None:
        """Make the cache buffers planning wrote the fidelity graph's inputs (no copy)."""

    def set_inputs(self, kind: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Upload inputs that stay fixed for a whole generation (text embeddings, time ids)."""

    def run(self, kind: str, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        """One evaluation of the ``kind`` graph; returns ``noise_pred`` on the host."""


def make_backend(name: str, folder: str | Path, manifest: Manifest, **options: Any) -> Backend:
    """Build backend ``name`` for an engine folder; options are the backend's own keywords."""
    if name == "onnxruntime":
        from cair_runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(folder, manifest, **options)
    if name == "tensorrt":
        from cair_runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(folder, manifest, **options)
    if name == "aoti":
        from cair_runtime.backends.aoti import AotiBackend

        return AotiBackend(folder, manifest, **options)
    raise InvalidInputError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
