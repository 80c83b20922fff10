"""OpenVINO backend: the engine folder's ONNX graphs compiled by OpenVINO for the CPU, at a chosen precision.

OpenVINO reads the exported ONNX as it is (external data included) and computes in bf16 with fp32
accumulation on CPUs with bf16 matrix units (AMX, AVX512-BF16) when asked: ``precision`` is
``fp32``, ``bf16`` or ``auto`` (bf16 where the CPU has the units, else fp32; ``precision_note``
says which and why). Inputs and outputs stay float32 whatever the precision, so the loop, the
latents and the scheduler math are unchanged.

Planning and fidelity run as two compiled graphs (``planning.onnx``, ``fidelity.onnx``), each with
its own copy of the weights. ``one_graph=True`` compiles the switch graph (``unet.onnx``) once instead
(two infer requests of one compiled model, each weight once), but OpenVINO 2026.4.1 computes it
wrongly on its first inference (see ``_SWITCH_CONFIG``), so it is for measuring only. A folder
quantized by ``cair-export quantize`` has int8 graphs (OpenVINO IR) recorded as ``openvino``
engines; ``precision="int8"`` runs those.

Per call a context owns one infer request per graph kind. The cache tensors the planning request
wrote at step n become the fidelity (and shallow) request's input tensors, and fidelity's deep
feature the shallow request's: shared memory, no copy per step. Only the latents go in (wrapped,
not copied) and ``noise_pred`` comes out each step.

Compiled models are cached on disk (OpenVINO's ``CACHE_DIR``) beside the engine, in a folder
keyed by the OpenVINO version and the sha256 of the graph and its weights: a second start loads
the compiled blob instead of compiling. A read-only engine folder compiles without the cache.

Needs the ``openvino`` package, imported when the backend is built, so the rest of the runtime
never loads it.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cair_runtime.backends.onnxruntime import switch_feeds
from cair_runtime.backends.pool import default_concurrency
from cair_runtime.checks import is_integer
from cair_runtime.errors import EngineMismatchError, InvalidInputError, MissingDependencyError
from cair_runtime.manifest import Manifest

PRECISIONS = ("auto", "fp32", "bf16", "int8")
# precision -> OpenVINO's INFERENCE_PRECISION_HINT (int8 graphs keep their non-quantized ops in fp32)
_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
# The switch graph's ``If`` branches: with the CPU plugin's runtime cache on, the first inference returned
# NaN caches and noise_pred (OpenVINO 2026.4.1, tiny-sd15); with it off the NaNs go, but the first
# generation on a freshly compiled shapes switch graph still differed from onnxruntime (latents off by up
# to 2.3; later ones matched to 4e-5). Hence two graphs by default (docs/openvino.md).
_SWITCH_CONFIG = {"CPU_RUNTIME_CACHE_CAPACITY": 0}
CACHE_FOLDER = "openvino_cache"  # beside the graphs, one subfolder per OpenVINO version and graph

ov = None  # the openvino module, imported when an OpenVinoBackend is built


def _import_openvino():
    """Import openvino on first use (an optional dependency: the runtime's other backends never load it)."""
    global ov
    if ov is None:
        try:
            ov = importlib.import_module("openvino")
        except ImportError:
            raise MissingDependencyError("the openvino backend needs OpenVINO; install it with "
                                         "`pip install 'cair-runtime[openvino]'` (or `pip install openvino`)") from None
    return ov


def cpu_capabilities(core: Any) -> tuple[str, ...]:
    """OpenVINO's CPU optimisation capabilities, e.g. ('BF16', 'FP32', 'INT8', ...)."""
    return tuple(str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def choose_precision(requested: str, capabilities: Sequence[str]) -> tuple[str, str]:
    """The precision to run and a one-line note saying why; ``auto`` is bf16 on CPUs with bf16 units, else fp32.

    int8 is never ``auto``'s choice: it needs a quantized folder and its quality is the model's own
    question (docs/openvino.md).
    """
    if requested not in PRECISIONS:
        raise InvalidInputError(f"precision {requested!r} is unknown; expected one of {', '.join(PRECISIONS)}",
                                field="precision")
    has_bf16 = "BF16" in capabilities
    if requested == "auto":
        if has_bf16:
            return "bf16", "auto: bf16, this CPU has bf16 matrix units"
        return "fp32", "auto: fp32, this CPU has no bf16 matrix units (AMX or AVX512-BF16)"
    if requested == "bf16" and not has_bf16:
        raise InvalidInputError("precision bf16 needs a CPU with bf16 matrix units (AMX or AVX512-BF16); this one "
                                f"has {', '.join(capabilities)}: use --precision fp32 or auto", field="precision")
    return requested, requested


def cache_key(manifest: Manifest, file: str, version: str, config: Mapping[str, Any] = {}) -> str:
    """The compile cache's subfolder for ``file``: OpenVINO's version, the sha256 of the graph and the weights
    files (a changed weight file, e.g. a re-export with a fused adapter, gets a fresh cache) and the compile
    config (OpenVINO's own cache key leaves some CPU properties out, e.g. the runtime cache capacity)."""
    digests = sorted(record.sha256 for record in manifest.files
                     if record.path == file or record.path.endswith((".bin", ".data", ".xml")))
    settings = [f"{name}={value}" for name, value in sorted(config.items())]
    key = hashlib.sha256(" ".join([file, *digests, *settings]).encode()).hexdigest()[:16]
    return f"{version.split('-')[0]}/{key}"


class OpenVinoSession:
    """One compiled graph with onnxruntime's ``run(output_names, feeds)``: the text encoders and the VAE.

    Each call runs on an infer request of its own, so any number of threads may share it.
    """

    def __init__(self, compiled: Any):
        self.compiled = compiled
        self.output_names = [output.get_any_name() for output in compiled.outputs]

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        request = self.compiled.create_infer_request()
        request.infer({name: np.ascontiguousarray(array) for name, array in feeds.items()})
        return [request.get_tensor(name).data.copy() for name in (output_names or self.output_names)]


class OpenVinoBackend:
    """planning, fidelity (and shallow) compiled by OpenVINO for the CPU, shared by every context.

    ``CompiledModel`` is shared between threads; each context creates its own ``InferRequest``s
    (one per graph kind), which hold that call's tensors.
    """

    schedules = True  # guidance stop and shallow steps, as on onnxruntime

    def __init__(self, folder: str | Path, manifest: Manifest, precision: str = "auto", threads: int = 0,
                 max_concurrency: int | None = None, one_graph: bool = False, cache_dir: str | Path | None = None,
                 compile_cache: bool = True):
        _import_openvino()
        if not is_integer(threads) or threads < 0:
            raise InvalidInputError(f"threads {threads!r} must be a non-negative integer (0: OpenVINO's default)")
        self.folder = Path(folder)
        self.manifest = manifest
        self.core = ov.Core()
        self.capabilities = cpu_capabilities(self.core)
        self.precision, self.precision_note = choose_precision(precision, self.capabilities)
        self.version = ov.get_version()
        self.config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _HINTS[self.precision],
                                       "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        # compile_cache=False: compile every start (for measuring the cache); cache_dir: another root than the folder
        root = Path(cache_dir) if cache_dir is not None else self.folder / CACHE_FOLDER
        self.cache_root = root if compile_cache and _writable(root) else None
        self.device = "cpu"
        self.max_concurrency = default_concurrency(self.device) if max_concurrency is None else max_concurrency
        self.switch = manifest.switch if one_graph and self.precision != "int8" else None
        self.files = self._graph_files()
        self.compiled: dict[str, Any] = {}
        for kind, file in self.files.items():
            same = next((k for k in self.compiled if self.files[k] == file), None)
            switch = self.switch is not None and file == self.switch["file"]
            self.compiled[kind] = self.compiled[same] if same else self.compile(file, _SWITCH_CONFIG if switch else {})
        self.kinds = frozenset(self.compiled)
        for kind in self.compiled:
            self._check_io(kind)

    def _graph_files(self) -> dict[str, str]:
        """Per UNet graph kind the file to compile: the switch graph for planning and fidelity when there is one,
        the quantized IR for int8. Not the guided shallow graph: its contexts do not wire planning's deep feature
        to it, so schedules with a planning interval are refused here (``Schedule.check_runs_on``)."""
        graphs = {kind: graph for kind, graph in self.manifest.schedule_graphs.items() if kind != "shallow_planning"}
        if self.precision == "int8":
            records = {record.graph: record for record in self.manifest.engines if record.backend == "openvino"}
            if not {"planning", "fidelity"} <= set(records):
                raise EngineMismatchError(f"{self.folder} has no int8 graphs; quantize it with "
                                          "`cair-export quantize ENGINE_DIR`, or use --precision fp32, bf16 or auto")
            # quantized: planning and fidelity; a shallow graph stays the fp32 ONNX
            return {kind: records[kind].file if kind in records else graph.file for kind, graph in graphs.items()}
        files = {kind: graph.file for kind, graph in graphs.items()}
        if self.switch is not None:
            files["planning"] = files["fidelity"] = self.switch["file"]
        return files

    def compile(self, file: str, extra: Mapping[str, Any] = {}) -> Any:
        """Compile one graph of the folder with the backend's precision and threads (cached on disk when allowed)."""
        config = {**self.config, **extra}
        if self.cache_root is not None:
            config["CACHE_DIR"] = str(self.cache_root / cache_key(self.manifest, file, self.version, config))
        try:
            return self.core.compile_model(str(self.folder / file), "CPU", config)
        except Exception as error:  # noqa: BLE001 - OpenVINO raises RuntimeError with a multi-line report
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise EngineMismatchError(f"OpenVINO {self.version} cannot compile {file}: {reason}; re-export the "
                                      "folder, or use --backend onnxruntime") from None

    def session(self, kind: str) -> OpenVinoSession:
        """A pipeline graph (text encoder, VAE) compiled like the UNet's, with onnxruntime's ``run``."""
        return OpenVinoSession(self.compile(self.manifest.graphs[kind].file))

    def _check_io(self, kind: str) -> None:
        """The compiled graph has every input and output the context sets for ``kind``; else one line."""
        graph = self.manifest.graphs[kind]
        inputs = [spec.name for spec in graph.inputs]
        if self.switch is not None and kind in ("planning", "fidelity"):
            inputs = [self.switch["cache_inputs"].get(name, name) for name in inputs] + [self.switch["condition"]]
        compiled = self.compiled[kind]
        have = {name for port in (*compiled.inputs, *compiled.outputs) for name in port.get_names()}
        missing = [name for name in [*inputs, *(spec.name for spec in graph.outputs)] if name not in have]
        if missing:
            raise EngineMismatchError(f"{self.files[kind]} lacks {', '.join(missing[:4])}, which the manifest's {kind} "
                                      "graph needs: the manifest and the graphs do not belong together; re-export")

    def new_context(self) -> OpenVinoContext:
        return OpenVinoContext(self)

    def close(self) -> None:
        self.compiled = {}  # OpenVINO frees a compiled model with its last Python reference


def _writable(root: Path) -> bool:
    """Whether the cache root can be created and written (an engine folder may be read-only)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(root, os.W_OK)


class OpenVinoContext:
    """One generation's infer requests; the caches and the deep feature pass between them as tensors, not copies.

    Outputs live in the tensors each request allocates (user-set output tensors are not written
    reliably through the switch graph's ``If`` on a request's first inference with OpenVINO 2026.4):
    at the switch the planning request's cache tensors become the fidelity (and shallow) request's
    input tensors, and after each fidelity step its deep-feature tensor becomes the shallow request's
    input. ``set_tensor`` with another request's tensor shares its memory: a pointer hand-off.
    """

    def __init__(self, backend: OpenVinoBackend):
        self.backend = backend
        manifest = backend.manifest
        self.requests = {kind: compiled.create_infer_request() for kind, compiled in backend.compiled.items()}
        self.caches: dict[str, Any] = {}  # cache name -> the tensor fidelity reads (planning's, or merged)
        self._cache_names = [cache.name for cache in manifest.caches]
        self._deep_name = manifest.deep_branch["name"] if manifest.deep_branch else None
        self._deep: Any = None  # the deep feature shallow reads (fidelity's output tensor, or merged)
        self._kept: dict[str, np.ndarray] = {}  # arrays the requests' tensors wrap: kept alive while set
        self._cache_inputs = {name: name for name in self._cache_names}
        if backend.switch is not None:  # the condition and placeholders, fixed for the context's life
            self._cache_inputs = dict(backend.switch["cache_inputs"])
            for kind in ("planning", "fidelity"):
                for name, array in switch_feeds(manifest, kind).items():
                    self._set(kind, name, array)

    def _set(self, kind: str, name: str, array: np.ndarray) -> None:
        """Give ``kind``'s request this array as its input tensor ``name``, without a copy."""
        array = np.require(array, requirements="C")  # not ascontiguousarray: it makes a 0-d condition 1-d
        self._kept[f"{kind}/{name}"] = array
        self.requests[kind].set_tensor(name, ov.Tensor(array, shared_memory=True))

    def prepare(self, dims: Mapping[str, int]) -> None:
        pass  # the requests allocate their outputs for the shapes they are given

    def switch_to_fidelity(self) -> None:
        # The tensors planning wrote at step n become fidelity's (and shallow's) inputs: no copy.
        planning = self.requests["planning"]
        self._bind_caches({name: planning.get_tensor(name) for name in self._cache_names})
        self._deep = None

    def _bind_caches(self, caches: Mapping[str, Any]) -> None:
        self.caches = dict(caches)
        for name, tensor in caches.items():
            self.requests["fidelity"].set_tensor(self._cache_inputs[name], tensor)
        if "shallow" in self.requests:
            for spec in self.backend.manifest.graphs["shallow"].inputs:
                if spec.name in caches:
                    self.requests["shallow"].set_tensor(spec.name, caches[spec.name])

    def merge_halves(self) -> None:
        """The guidance stop: per-half caches (and deep feature) -> their means; fidelity and shallow at batch B."""
        def mean(tensor: Any) -> Any:
            uncond, cond = np.split(tensor.data, 2)  # (2B, ...): unconditional half first
            merged = (uncond + cond) / np.float32(2)
            self._kept[f"merged/{id(merged)}"] = merged
            return ov.Tensor(merged, shared_memory=True)

        self._bind_caches({name: mean(tensor) for name, tensor in self.caches.items()})
        if self._deep is not None:  # None at a guidance stop at n: the next evaluation is full and writes it
            self._deep = mean(self._deep)
            self.requests["shallow"].set_tensor(self._deep_name, self._deep)

    def set_inputs(self, kind: str, arrays: Mapping[str, np.ndarray]) -> None:
        for name, array in arrays.items():
            self._set(kind, name, array)

    def run(self, kind: str, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        request = self.requests[kind]
        sample, timestep = np.require(sample, requirements="C"), np.require(timestep, requirements="C")
        request.set_tensor("sample", ov.Tensor(sample, shared_memory=True))
        request.set_tensor("timestep", ov.Tensor(timestep, shared_memory=True))
        request.infer()
        if kind == "fidelity" and "shallow" in self.requests:
            self._deep = request.get_tensor(self._deep_name)  # the shallow steps until the next full one read it
            self.requests["shallow"].set_tensor(self._deep_name, self._deep)
        # noise_pred only; the next run overwrites the tensor and multistep schedulers keep past outputs: copy.
        return request.get_tensor("noise_pred").data.copy()

    def read_caches(self) -> dict[str, np.ndarray]:
        planning = self.requests["planning"]
        return {name: planning.get_tensor(name).data.copy() for name in self._cache_names}

    def close(self) -> None:
        self.requests, self.caches, self._kept = {}, {}, {}
        self._deep = None
