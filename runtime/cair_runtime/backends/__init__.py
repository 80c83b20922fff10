"""Execution backends: each runs an engine folder's planning and fidelity graphs.

A backend holds what every generation shares (sessions, engines, weights); a context holds what one
generation writes, and keeps the cross-attention caches on the device: planning writes them into
buffers the context allocated, fidelity reads the same buffers. Per step only the latents (in) and
``noise_pred`` (out) cross between host and device. Optional backends (TensorRT, AOTInductor, OpenVINO)
are imported only when asked for, so their packages (tensorrt, torch, openvino) are never loaded otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np

from cair_runtime.errors import InvalidInputError
from cair_runtime.manifest import Manifest

BACKENDS = ("onnxruntime", "tensorrt", "aoti", "openvino")


class BackendContext(Protocol):
    """Everything one generation writes: bindings, cache and output buffers, streams, graphs."""

    def prepare(self, dims: Mapping[str, int]) -> None:
        """Allocate the device buffers (caches, outputs) for these concrete dims; a no-op if unchanged."""

    def switch_to_fidelity(self) -> None:
        """Make the cache buffers planning wrote the fidelity graph's inputs (no copy)."""

    def merge_halves(self) -> None:
        """At the guidance stop: per-half caches and deep feature become their means (batch B); optional."""

    def set_inputs(self, kind: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Upload inputs that stay fixed for a whole generation (text embeddings, time ids)."""

    def run(self, kind: str, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        """One evaluation of the ``kind`` graph; returns ``noise_pred`` on the host."""

    def read_caches(self) -> dict[str, np.ndarray]:
        """Host copies of the cache buffers planning last wrote (merged or per half); optional (for measuring)."""

    def close(self) -> None:
        """Release the buffers, bindings, streams and graphs."""


class Backend(Protocol):
    """The shared, read-only part: sessions or engines and their weights, loaded once."""

    max_concurrency: int  # contexts the engine's pool may hold (the caller's choice, or sized for the device)
    schedules: bool  # runs a guidance stop before T and shallow steps (its contexts have merge_halves)
    kinds: frozenset[str]  # the UNet graphs it runs: planning, fidelity and, when built, shallow

    def new_context(self) -> BackendContext:
        """A fresh per-call context (the pool calls this lazily)."""

    def close(self) -> None:
        """Release the sessions/engines; every context must be closed first."""


def make_backend(name: str, folder: str | Path, manifest: Manifest, **options: Any) -> Backend:
    """Build backend ``name`` for an engine folder; options are the backend's own keywords."""
    if manifest.transformer and name == "tensorrt":
        raise InvalidInputError(f"{folder} holds a diffusion transformer, which runs on onnxruntime, openvino and "
                                f"aoti only so far; drop --backend {name}", field="backend")
    if name == "onnxruntime":
        from cair_runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(folder, manifest, **options)
    if name == "tensorrt":
        from cair_runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(folder, manifest, **options)
    if name == "aoti":
        from cair_runtime.backends.aoti import AotiBackend

        return AotiBackend(folder, manifest, **options)
    if name == "openvino":
        from cair_runtime.backends.openvino import OpenVinoBackend

        return OpenVinoBackend(folder, manifest, **options)
    raise InvalidInputError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
