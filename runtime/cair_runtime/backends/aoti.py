"""AOTInductor backend: runs the ``.pt2`` packages ``cair-export build --backend aoti`` compiled.

Needs torch (not diffusers), imported when the backend is built (``make_backend`` also imports this
module only when the backend is asked for), so the rest of the runtime stays torch-free. Packages load with
``torch._inductor.package.load_package`` (``aoti_load_package`` plus ``num_runners``: one runner
per concurrent call). The caches are device tensors: planning returns them, each call's context
keeps the references from the step-n evaluation and passes the very same tensors to fidelity; they never pass through numpy. Per step only the
latents go up and ``noise_pred`` comes down.

Weights once: packages built without their weights (records naming a ``weights`` file) take the
tensors of that one safetensors file, loaded onto the device once and given to both packages with
``load_constants(..., user_managed=True)``: no copy, every runner of both packages reads the same
memory (see docs/weights_once.md). Older packages carry their own weights and get nothing.
"""

from __future__ import annotations

import importlib

from pathlib import Path
from typing import Mapping

import numpy as np

from cair_runtime.backends.pool import default_concurrency
from cair_runtime.errors import EngineMismatchError, ManifestError, MissingDependencyError, ShapeError
from cair_runtime.manifest import EngineRecord, Manifest

torch = None  # imported when an AotiBackend is built, so that importing this module stays light


def _import_torch():
    """Import torch on first use (importlib: an optional dependency, never loaded by the rest of the runtime)."""
    global torch
    if torch is None:
        try:
            torch = importlib.import_module("torch")
        except ImportError:  # pragma: no cover - depends on the installation
            raise MissingDependencyError("the AOTInductor backend needs torch; install it with `pip install torch` "
                                         "(the CPU or CUDA build the packages were compiled for)") from None
    return torch


def aoti_records(manifest: Manifest) -> dict[str, EngineRecord]:
    """The manifest's AOTInductor packages by graph kind; refuses a folder without both."""
    return manifest.engine_records("aoti", "AOTInductor package")


def check_aoti_record(record: EngineRecord, device: str, torch_version: str) -> None:
    """Refuse a package compiled for another device kind or another torch (AOTI ties both)."""
    properties = record.properties
    built_device = properties.get("device", "cpu")
    if built_device != device.split(":")[0]:
        raise EngineMismatchError(f"{record.file} was compiled for {built_device}, this backend runs on {device}; "
                                  f"rebuild with `cair-export build ENGINE_DIR --backend aoti --device {device}`")
    built_torch = properties.get("torch")
    if built_torch and built_torch.split("+")[0] != torch_version.split("+")[0]:
        raise EngineMismatchError(f"{record.file} was compiled by torch {built_torch}, this is torch {torch_version}; "
                                  "rebuild with `cair-export build ENGINE_DIR --backend aoti`")


def feed_weights(models: Mapping[str, object], folder: Path, records: Mapping[str, EngineRecord], device: str
                 ) -> dict[str, torch.Tensor]:
    """Load the folder's one weights file onto ``device`` and give the very same tensors to every package.

    ``user_managed=True``: the packages keep pointers to these tensors instead of copying them (the
    caller keeps them alive); the runners of one package share its container's constants. Returns
    the tensors by FQN; empty for packages that embed their weights (no ``weights`` in the records).
    """
    names = {record.properties.get("weights") for record in records.values()}
    if len(names) > 1:
        raise ManifestError(f"the AOTInductor records name different weights files ({sorted(map(str, names))}); "
                            "rebuild with `cair-export build ENGINE_DIR --backend aoti`")
    (name,) = names
    if name is None:
        return {}
    try:
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover - depends on the installation
        raise MissingDependencyError("the AOTInductor backend reads its weights with safetensors; "
                                     "install it with `pip install safetensors`") from None
    weights = load_file(str(Path(folder) / name), device=device)
    for kind, model in models.items():
        fqns = model.get_constant_fqns()
        missing = [fqn for fqn in fqns if fqn not in weights]
        if missing:
            raise ManifestError(f"{name} lacks {len(missing)} weight(s) that {records[kind].file} needs "
                                f"(first: {missing[0]}); rebuild with `cair-export build ENGINE_DIR --backend aoti`")
        model.load_constants({fqn: weights[fqn] for fqn in fqns}, check_full_update=True, user_managed=True)
    return weights


class AotiBackend:
    """planning.pt2 and fidelity.pt2 on ``device`` ("cpu" or "cuda[:N]"), shared by every context.

    Each package is loaded with one AOTInductor runner per context (``num_runners``): the model
    container lends a runner to each concurrent call, so calls never share activation buffers.
    ``weights``: the one set of weight tensors both packages run on (``feed_weights``).
    """

    schedules = False  # planning and fidelity only: no guidance stop before T, no shallow graph (issue 15)

    def __init__(self, folder: str | Path, manifest: Manifest, device: str | None = None,
                 max_concurrency: int | None = None):
        _import_torch()
        records = aoti_records(manifest)
        self.device = device or records["planning"].properties.get("device", "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise MissingDependencyError(f"device {self.device!r} requested but torch sees no CUDA GPU; "
                                         "use a CUDA build of torch on a GPU machine, or --device cpu packages")
        for record in records.values():
            check_aoti_record(record, self.device, torch.__version__)
        self.manifest = manifest
        self.latent_multiple = int(records["planning"].properties.get("latent_multiple", 1))
        self.vae_scale_factor = manifest.vae_scale_factor
        self.max_concurrency = default_concurrency(self.device) if max_concurrency is None else max_concurrency
        index = torch.device(self.device).index
        load_package = importlib.import_module("torch._inductor.package").load_package  # torch's, loaded on use

        self.models = {kind: load_package(str(Path(folder) / record.file), num_runners=self.max_concurrency,
                                          device_index=-1 if index is None else index)
                       for kind, record in records.items()}
        # One copy of the weights on the device, shared by both packages (the packages point at these tensors).
        self.weights = feed_weights(self.models, Path(folder), records, self.device)
        self.inputs = {kind: [spec.name for spec in graph.inputs] for kind, graph in manifest.unet_graphs.items()}
        self.cache_names = [cache.name for cache in manifest.caches]

    def new_context(self) -> AotiContext:
        return AotiContext(self)

    def close(self) -> None:
        self.models = {}
        self.weights = {}  # after the packages: they point into these tensors


class AotiContext:
    """One generation's device tensors: fixed inputs and the caches handed from planning to fidelity."""

    def __init__(self, backend: AotiBackend):
        self.backend = backend
        self.caches: dict[str, torch.Tensor] = {}  # fidelity's cache inputs: device tensors from planning
        self._planned: dict[str, torch.Tensor] = {}  # the latest planning evaluation's caches
        self._fixed: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in backend.inputs}

    def prepare(self, dims: Mapping[str, int]) -> None:
        multiple = self.backend.latent_multiple
        odd = [f"{name} {dims[name]}" for name in ("latent_height", "latent_width") if dims[name] % multiple]
        if odd:
            raise ShapeError(f"the AOTInductor packages take latent sizes that are multiples of {multiple} "
                             f"(pixels: {self.backend.vae_scale_factor * multiple}); got {', '.join(odd)}; use "
                             "another size or the onnxruntime backend")

    def set_inputs(self, kind: str, arrays: Mapping[str, np.ndarray]) -> None:
        for name, array in arrays.items():
            self._fixed[kind][name] = torch.from_numpy(np.ascontiguousarray(array)).to(self.backend.device)

    def switch_to_fidelity(self) -> None:
        # The tensors planning returned at step n become fidelity's inputs: references, no copy.
        self.caches = dict(self._planned)

    def run(self, kind: str, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        backend = self.backend
        step = {"sample": torch.from_numpy(np.ascontiguousarray(sample)).to(backend.device),
                "timestep": torch.from_numpy(np.ascontiguousarray(timestep)).to(backend.device)}
        named = {**self._fixed[kind], **self.caches, **step} if kind == "fidelity" else {**self._fixed[kind], **step}
        outputs = backend.models[kind](*(named[name] for name in backend.inputs[kind]))
        if kind == "planning":
            self._planned = dict(zip(backend.cache_names, outputs[1:]))
        # noise_pred only; one fresh copy, since the scheduler keeps past outputs and the package may reuse buffers.
        return outputs[0].detach().to("cpu", torch.float32, copy=True).numpy()

    def close(self) -> None:
        self.caches, self._planned = {}, {}
        self._fixed = {kind: {} for kind in self._fixed}
