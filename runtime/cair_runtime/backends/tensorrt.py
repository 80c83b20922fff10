"""TensorRT backend: two engines shared by every call; per call one stream, one activation block, caches bound by address.

- Engines are deserialised once, after their provenance in the manifest (TensorRT version,
  compute capability) was checked against this machine: a mismatch is refused with the reason
  (``EngineMismatchError``) instead of failing deep inside ``deserialize_cuda_engine``.
- The engines are shared; each concurrent call has a context of its own (TensorRT needs one
  execution context per concurrent call): two execution contexts, a stream, an activation block,
  one device buffer per IO tensor wired with ``set_tensor_address``, CUDA graphs;
  ``execute_async_v3`` on the call's stream (as the TensorRT demo's ``Engine.allocate_buffers``/
  ``Engine.infer``). CUDA's current device is per thread: every entry point sets it.
- Planning's cache output buffers ARE fidelity's cache input buffers: the same device addresses
  are bound on both contexts; nothing is copied at the switch.
- Within one call the two engines never run at once, so both execution contexts are created
  with ``ExecutionContextAllocationStrategy.USER_MANAGED`` and share one activation block of
  ``max(device_memory_size_v2)`` bytes (``set_device_memory``).
- Optional CUDA-graph capture per engine for static shapes: the step inputs are copied into the
  fixed buffers before each launch, and ``noise_pred`` is copied out before the next launch
  overwrites it.

Light dependencies: ``tensorrt`` and ``cuda-python`` (``pip install cair-runtime[tensorrt]``),
imported when the backend is built, never torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from cair_runtime.backends.pool import default_concurrency
from cair_runtime.errors import EngineMismatchError, MissingDependencyError, ShapeError
from cair_runtime.manifest import EngineRecord, Manifest

INSTALL = "pip install 'cair-runtime[tensorrt]'"
REBUILD = "rebuild the engines on this machine with `cair-export build ENGINE_DIR --backend tensorrt`"


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or a ``MissingDependencyError`` naming what to install."""
    try:
        import tensorrt
    except ImportError:
        raise MissingDependencyError(f"the TensorRT backend needs the tensorrt package (and an NVIDIA GPU); "
                                     f"install it with `{INSTALL}`") from None
    return tensorrt


def import_cudart() -> Any:
    """cuda-python's runtime bindings (``cuda.bindings.runtime`` since 12.6, ``cuda.cudart`` before)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise MissingDependencyError(f"the TensorRT backend needs cuda-python; install it with `{INSTALL}`") from None
    return runtime


def _call(cudart: Any, result: Any) -> Any:
    """Unwrap a cuda-python ``(error, *values)`` result; raise on a CUDA error."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA call failed: {cudart.cudaGetErrorString(error)[1].decode()}")
    return values[0] if len(values) == 1 else values or None


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU an engine is built for or runs on."""

    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "major.minor", e.g. "9.0"


def device_info(device_id: int = 0) -> DeviceInfo:
    """Name and compute capability of CUDA device ``device_id`` (needs a GPU and cuda-python)."""
    cudart = import_cudart()
    try:
        properties = _call(cudart, cudart.cudaGetDeviceProperties(device_id))
    except RuntimeError as error:
        raise MissingDependencyError(f"no usable CUDA GPU {device_id} ({error}); TensorRT engines are built on, "
                                     "and run on, an NVIDIA GPU") from None
    name = properties.name.decode(errors="replace") if isinstance(properties.name, bytes) else str(properties.name)
    return DeviceInfo(name.rstrip("\x00").strip(), f"{properties.major}.{properties.minor}")


# --- provenance: pure functions over manifest records ------------------------------------------


def tensorrt_records(manifest: Manifest) -> dict[str, EngineRecord]:
    """The manifest's TensorRT engines by graph kind; refuses a folder without both."""
    return manifest.engine_records("tensorrt", "TensorRT engine", " on the GPU that will run them")


def engine_problems(record: EngineRecord, tensorrt_version: str, device: DeviceInfo) -> list[str]:
    """Why ``record``'s engine cannot run with this TensorRT on this GPU; empty if it can.

    A plan file is tied to the exact TensorRT version that built it and to the GPU's compute
    capability (engines are not version- or hardware-compatible unless built so).
    """
    problems = []
    properties = record.properties
    built_version = properties.get("tensorrt")
    if built_version != tensorrt_version:
        problems.append(f"{record.file} was built by TensorRT {built_version}, this is TensorRT {tensorrt_version}")
    built_capability = properties.get("compute_capability")
    if built_capability != device.compute_capability:
        problems.append(f"{record.file} was built for compute capability {built_capability} "
                        f"({properties.get('gpu', 'unknown GPU')}), this GPU ({device.name}) is {device.compute_capability}")
    return problems


def check_engine_records(records: Iterable[EngineRecord], tensorrt_version: str, device: DeviceInfo) -> None:
    """Refuse, with every reason at once, engines this TensorRT and GPU cannot run."""
    problems = [problem for record in records for problem in engine_problems(record, tensorrt_version, device)]
    if problems:
        raise EngineMismatchError("; ".join(problems) + f"; {REBUILD}")


# --- the backend ------------------------------------------------------------------------------------


@dataclass
class DeviceBuffer:
    pointer: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: np.dtype


class TensorRTBackend:
    """planning.plan and fidelity.plan on CUDA device ``device_id``: the engines, shared by every context."""

    schedules = False  # planning and fidelity only: no guidance stop before T, no deep-feature caching

    def __init__(self, folder: str | Path, manifest: Manifest, device_id: int = 0, cuda_graphs: bool = False,
                 max_concurrency: int | None = None):
        trt = import_tensorrt()
        cudart = import_cudart()
        self.trt, self.cudart, self.manifest, self.device_id = trt, cudart, manifest, device_id
        records = tensorrt_records(manifest)
        device = device_info(device_id)  # no GPU: MissingDependencyError
        _call(cudart, cudart.cudaSetDevice(device_id))
        check_engine_records(records.values(), trt.__version__, device)  # before deserialising

        self.logger = trt.Logger(trt.Logger.ERROR)
        self.runtime = trt.Runtime(self.logger)
        self.engines = {}
        for kind, record in records.items():
            engine = self.runtime.deserialize_cuda_engine((Path(folder) / record.file).read_bytes())
            if engine is None:
                raise EngineMismatchError(f"TensorRT {trt.__version__} could not deserialise {record.file}; {REBUILD}")
            self.engines[kind] = engine
        self.activation_bytes = max(_activation_bytes(engine) for engine in self.engines.values())
        self.use_cuda_graphs = cuda_graphs
        self.cache_names = {cache.name for cache in manifest.caches}
        self.noise_pred = {kind: graph.outputs[0].name for kind, graph in manifest.unet_graphs.items()}
        self.kinds = frozenset(manifest.unet_graphs)
        self.max_concurrency = default_concurrency("cuda") if max_concurrency is None else max_concurrency

    def set_device(self) -> None:
        """CUDA's current device is per thread: set it on every thread that touches this backend."""
        _call(self.cudart, self.cudart.cudaSetDevice(self.device_id))

    def new_context(self) -> TensorRTContext:
        return TensorRTContext(self)

    def close(self) -> None:
        self.engines = {}  # the engines and runtime go with their last references


class TensorRTContext:
    """One generation's execution contexts, stream, activation block, IO buffers and CUDA graphs.

    The planning and fidelity execution contexts of one generation never run at once, so they
    share one activation block (``ExecutionContextAllocationStrategy.USER_MANAGED``); concurrent
    generations each have their own.
    """

    def __init__(self, backend: TensorRTBackend):
        self.backend, self.cudart = backend, backend.cudart
        backend.set_device()
        strategy = backend.trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.contexts = {kind: engine.create_execution_context(strategy) for kind, engine in backend.engines.items()}
        self.activation = _call(self.cudart, self.cudart.cudaMalloc(max(backend.activation_bytes, 1)))
        for context in self.contexts.values():
            if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1
                context.set_device_memory(self.activation, backend.activation_bytes)
            else:
                context.device_memory = self.activation
        self.stream = _call(self.cudart, self.cudart.cudaStreamCreate())
        self.stream_handle = int(self.stream)
        self.caches: dict[str, DeviceBuffer] = {}  # shared by planning (outputs) and fidelity (inputs)
        self.buffers: dict[str, dict[str, DeviceBuffer]] = {kind: {} for kind in self.contexts}
        self._graphs: dict[str, Any] = {}  # kind -> instantiated CUDA graph for the prepared shapes
        self._dims: dict[str, int] | None = None

    # -- buffers ------------------------------------------------------------------------------

    def _allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> DeviceBuffer:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        return DeviceBuffer(_call(self.cudart, self.cudart.cudaMalloc(max(nbytes, 1))), nbytes, shape, dtype)

    def _free_buffers(self) -> None:
        seen = set()
        for buffer in [*self.caches.values(), *(b for kind in self.buffers.values() for b in kind.values())]:
            if buffer.pointer not in seen:
                seen.add(buffer.pointer)
                _call(self.cudart, self.cudart.cudaFree(buffer.pointer))
        self.caches, self.buffers = {}, {kind: {} for kind in self.contexts}
        for graph in self._graphs.values():  # captured for the old buffers' addresses
            _call(self.cudart, self.cudart.cudaGraphExecDestroy(graph))
        self._graphs.clear()

    def prepare(self, dims: Mapping[str, int]) -> None:
        self.backend.set_device()  # this call's thread may not be the one that made the context
        dims = dict(dims)
        if dims == self._dims:
            return
        self._free_buffers()
        backend = self.backend
        for kind, graph in backend.manifest.unet_graphs.items():
            engine, context = backend.engines[kind], self.contexts[kind]
            for spec in (*graph.inputs, *graph.outputs):
                shape = spec.resolve(dims)
                dtype = np.dtype(spec.dtype)
                built = backend.trt.nptype(engine.get_tensor_dtype(spec.name))
                if np.dtype(built) != dtype:
                    raise EngineMismatchError(f"{kind} engine tensor {spec.name} is {np.dtype(built)}, the manifest "
                                              f"declares {dtype}; {REBUILD}")
                if spec.name in backend.cache_names:
                    # Allocated once, bound as planning's output and (at the switch) fidelity's input.
                    buffer = self.caches.get(spec.name)
                    if buffer is None:
                        buffer = self.caches[spec.name] = self._allocate(shape, dtype)
                else:
                    buffer = self._allocate(shape, dtype)
                self.buffers[kind][spec.name] = buffer
                if engine.get_tensor_mode(spec.name) == backend.trt.TensorIOMode.INPUT:
                    if not context.set_input_shape(spec.name, shape):
                        raise ShapeError(f"{kind} engine does not accept {spec.name} of shape {shape} (outside its "
                                         "optimisation profile); rebuild with wider --min/--max sizes")
                context.set_tensor_address(spec.name, buffer.pointer)
        self._dims = dims

    def switch_to_fidelity(self) -> None:
        # Already bound in prepare: fidelity reads the addresses planning wrote. Rebinding is free
        # and keeps the hand-off visible here, as in the onnxruntime backend.
        for name, buffer in self.caches.items():
            self.contexts["fidelity"].set_tensor_address(name, buffer.pointer)

    def _upload(self, buffer: DeviceBuffer, array: np.ndarray) -> None:
        host = np.ascontiguousarray(array, dtype=buffer.dtype)
        if host.shape != buffer.shape:
            raise ShapeError(f"input of shape {host.shape} does not fit the prepared buffer {buffer.shape}")
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _call(self.cudart, self.cudart.cudaMemcpyAsync(buffer.pointer, host.ctypes.data, buffer.nbytes, kind, self.stream))
        _call(self.cudart, self.cudart.cudaStreamSynchronize(self.stream))  # `host` may be freed after return

    def set_inputs(self, kind: str, arrays: Mapping[str, np.ndarray]) -> None:
        for name, array in arrays.items():
            self._upload(self.buffers[kind][name], array)

    def _execute(self, kind: str) -> None:
        cudart = self.cudart
        if not self.backend.use_cuda_graphs:
            if not self.contexts[kind].execute_async_v3(self.stream_handle):
                raise RuntimeError(f"TensorRT failed to enqueue the {kind} engine")
            return
        if kind not in self._graphs:
            # First run un-captured (TensorRT's lazy initialisation; its result is this step's), then
            # capture one launch for these shapes, replayed from the next step on. Thread-local
            # capture: other threads' CUDA calls during the capture are theirs, not an error here.
            if not self.contexts[kind].execute_async_v3(self.stream_handle):
                raise RuntimeError(f"TensorRT failed to enqueue the {kind} engine")
            mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            _call(cudart, cudart.cudaStreamBeginCapture(self.stream, mode))
            self.contexts[kind].execute_async_v3(self.stream_handle)
            graph = _call(cudart, cudart.cudaStreamEndCapture(self.stream))
            self._graphs[kind] = _call(cudart, cudart.cudaGraphInstantiate(graph, 0))
            _call(cudart, cudart.cudaGraphDestroy(graph))  # the instantiated copy is what runs
            return
        _call(cudart, cudart.cudaGraphLaunch(self._graphs[kind], self.stream))

    def run(self, kind: str, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        buffers = self.buffers[kind]
        self._upload(buffers["sample"], sample)
        self._upload(buffers["timestep"], timestep)
        self._execute(kind)
        noise_pred = buffers[self.backend.noise_pred[kind]]
        host = np.empty(noise_pred.shape, noise_pred.dtype)  # fresh: multistep schedulers keep past outputs
        kind_d2h = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _call(self.cudart, self.cudart.cudaMemcpyAsync(host.ctypes.data, noise_pred.pointer, noise_pred.nbytes,
                                                       kind_d2h, self.stream))
        _call(self.cudart, self.cudart.cudaStreamSynchronize(self.stream))
        return host

    def close(self) -> None:
        """Free the buffers, graphs, stream and activation block (also on garbage collection)."""
        if getattr(self, "activation", None) is None:
            return
        self.backend.set_device()
        self._free_buffers()
        self.contexts = {}  # execution contexts before the memory they use
        _call(self.cudart, self.cudart.cudaStreamDestroy(self.stream))
        _call(self.cudart, self.cudart.cudaFree(self.activation))
        self.activation = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down cuda-python
            pass


def _activation_bytes(engine: Any) -> int:
    """Activation memory the engine needs at most (``device_memory_size_v2`` since TensorRT 10.1)."""
    return int(getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size)
