"""AOTInductor backend: runs the ``.pt2`` packages ``cair-export build --backend aoti`` compiled.

Schedules (n, m, k) as on onnxruntime: at the guidance stop the per-half caches and the deep
feature become their means on the device (torch ops, no host copy); the fidelity package returns
the deep feature beside ``noise_pred`` and the shallow package (folders exported with a deep
branch) takes it.

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
    """The manifest's AOTInductor packages by graph kind (shallow when built); refuses a folder without
    planning and fidelity."""
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
    """planning.pt2, fidelity.pt2 (and shallow.pt2) on ``device`` ("cpu" or "cuda[:N]"), shared by every context.

    Each package is loaded with one AOTInductor runner per context (``num_runners``): the model
    container lends a runner to each concurrent call, so calls never share activation buffers.
    ``weights``: the one set of weight tensors both packages run on (``feed_weights``).
    """

    schedules = True  # guidance stop on the device; shallow steps when shallow.pt2 was built

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
        text = manifest.dim("text_len").opt
        self.text_len_range = (text, text)  # the packages are compiled for one text window (long prompts: ONNX)
        self.vae_scale_factor = manifest.vae_scale_factor
        self.max_concurrency = default_concurrency(self.device) if max_concurrency is None else max_concurrency
        index = torch.device(self.device).index
        load_package = importlib.import_module("torch._inductor.package").load_package  # torch's, loaded on use

        self.models = {kind: load_package(str(Path(folder) / record.file), num_runners=self.max_concurrency,
                                          device_index=-1 if index is None else index)
                       for kind, record in records.items()}
        # One copy of the weights on the device, shared by both packages (the packages point at these tensors).
        self.weights = feed_weights(self.models, Path(folder), records, self.device)
        self.kinds = frozenset(self.models)
        self.inputs = {kind: [spec.name for spec in manifest.graphs[kind].inputs] for kind in self.models}
        self.cache_names = [cache.name for cache in manifest.caches]
        self.deep_name = manifest.deep_branch["name"] if manifest.deep_branch else None

    def new_context(self) -> AotiContext:
        return AotiContext(self)

    def close(self) -> None:
        self.models = {}
        self.weights = {}  # after the packages: they point into these tensors


class AotiContext:
    """One generation's device tensors: fixed inputs, the caches handed from planning to fidelity, the deep feature."""

    def __init__(self, backend: AotiBackend):
        self.backend = backend
        self.caches: dict[str, torch.Tensor] = {}  # fidelity's cache inputs: device tensors from planning
        self._planned: dict[str, torch.Tensor] = {}  # the latest planning evaluation's caches
        self._deep: torch.Tensor | None = None  # the last full fidelity step's deep feature, shallow's input
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
        self._deep = None

    def merge_halves(self) -> None:
        """The guidance stop: per-half caches (2B, ...) and the deep feature become their means (B, ...),
        on the device, summed in float32 and stored in their own dtype."""
        def mean(value: torch.Tensor) -> torch.Tensor:
            uncond, cond = value.float().chunk(2)  # unconditional half first
            return ((uncond + cond) / 2).to(value.dtype)

        self.caches = {name: mean(value) for name, value in self.caches.items()}
        if self._deep is not None:  # None at a guidance stop at n: the next step is full and writes it
            self._deep = mean(self._deep)

    def read_caches(self) -> dict[str, np.ndarray]:
        return {name: value.detach().float().cpu().numpy() for name, value in self._planned.items()}

    def run(self, kind: str, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        backend = self.backend
        step = {"sample": torch.from_numpy(np.ascontiguousarray(sample)).to(backend.device),
                "timestep": torch.from_numpy(np.ascontiguousarray(timestep)).to(backend.device)}
        named = {**self._fixed[kind], **step}
        if kind != "planning":  # fidelity takes every cache, shallow those of the modules it keeps
            named.update(self.caches)
        if kind == "shallow":
            named[backend.deep_name] = self._deep
        outputs = backend.models[kind](*(named[name] for name in backend.inputs[kind]))
        if kind == "planning":
            self._planned = dict(zip(backend.cache_names, outputs[1:]))
        elif kind == "fidelity" and backend.deep_name is not None:
            self._deep = outputs[1]
        # noise_pred only; one fresh copy, since the scheduler keeps past outputs and the package may reuse buffers.
        return outputs[0].detach().to("cpu", torch.float32, copy=True).numpy()

    def close(self) -> None:
        self.caches, self._planned, self._deep = {}, {}, None
        self._fixed = {kind: {} for kind in self._fixed}
