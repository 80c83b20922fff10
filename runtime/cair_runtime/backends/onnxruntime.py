"""ONNX Runtime backend: one session per graph, caches chained through IOBinding.

A folder with a switch graph (``unet.onnx``: planning and fidelity in one graph, one ``If`` per
cross-attention module; cair_export/core/switch.py) runs both phases on that one session, so the
process holds each UNet weight once, with onnxruntime's full optimisations and prepacking: a
planning step binds ``use_cache = false``, a fidelity step ``true`` and the caches as inputs.

The sessions are shared by every concurrent generation; each generation's context owns its
IOBindings and buffers. The cache ``OrtValue``s are allocated once per shape on the execution
device, bound as the planning session's outputs (``bind_ortvalue_output``) and as the fidelity
session's inputs (``bind_ortvalue_input``): planning writes them in place, fidelity reads them in
place, and they never pass through numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from cair_runtime.backends.pool import default_concurrency
from cair_runtime.checks import is_integer
from cair_runtime.errors import EngineMismatchError, InvalidInputError, MissingDependencyError
from cair_runtime.manifest import Manifest
from cair_runtime.schedule import PLANNING_KINDS

GRAPH_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# Execution provider -> the OrtValue device its buffers live on.
_DEVICES = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


def make_session(path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), *, threads: int = 0,
                 graph_optimization: str = "all", device_id: int = 0, spinning: bool = True,
                 initializers: Mapping[str, ort.OrtValue] | None = None, memory_arena: bool = True,
                 prepacking: bool | None = None) -> ort.InferenceSession:
    """One onnxruntime session, set up the same way everywhere in the project.

    ``threads`` is the intra-op pool (0: onnxruntime's default, the physical cores); ``device_id``
    reaches the CUDA and TensorRT providers through their provider options; ``spinning=False``
    stops idle pool threads from busy-waiting (for sessions that run once per generation).
    ``initializers`` are caller-owned weight buffers the session uses instead of reading its own
    copies (``SessionOptions.add_initializer``); they must outlive the session. Prepacking, which
    would make private copies of them, is then off unless ``prepacking`` says otherwise (adapter
    weights, which are private anyway, keep the default kernels and rounding).
    ``memory_arena=False`` returns each run's buffers to the system instead of keeping them for the
    next run: for fp16 graphs on the CPU, whose per-run fp32 weight casts would otherwise stay.
    """
    providers = tuple(providers)
    if not providers:
        raise InvalidInputError("no onnxruntime execution provider given; name at least one, e.g. "
                                "CPUExecutionProvider")
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise MissingDependencyError(
            f"onnxruntime execution provider(s) {', '.join(missing)} not available in this onnxruntime build "
            f"(available: {', '.join(available)}); install onnxruntime-gpu for CUDA/TensorRT providers"
        )
    if graph_optimization not in GRAPH_OPTIMIZATION:
        raise InvalidInputError(f"graph optimisation {graph_optimization!r} is unknown; "
                                f"expected one of {', '.join(GRAPH_OPTIMIZATION)}")
    if not is_integer(threads) or threads < 0:
        raise InvalidInputError(f"threads {threads!r} must be a non-negative integer (0: onnxruntime's default)")
    ort.disable_telemetry_events()  # besides ORT_DISABLE_TELEMETRY (cair_runtime/__init__.py), which stops it at import
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # sequential graphs: one inter-op thread
    options.graph_optimization_level = GRAPH_OPTIMIZATION[graph_optimization]
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = memory_arena
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if initializers:
        if not prepacking:
            options.add_session_config_entry("session.disable_prepacking", "1")
        for name, value in initializers.items():
            options.add_initializer(name, value)
    provider_options = [{"device_id": str(device_id)} if p in _DEVICES and _DEVICES[p] == "cuda" else {}
                        for p in providers]
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers), provider_options=provider_options)
    except Exception as error:  # noqa: BLE001 - onnxruntime raises bare Fail/InvalidGraph/RuntimeException
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise EngineMismatchError(f"onnxruntime {ort.__version__} cannot load {Path(path).name} with "
                                  f"{', '.join(providers)}: {reason}; re-export the folder, or use a provider or "
                                  "backend that supports the graph's precision") from None


def adapter_optimization(level: str) -> str:
    """The optimisation level for a session whose weights are overridden (adapters): at most ``extended``.

    At ``all`` onnxruntime 1.32's NCHWc layout transformer re-lays out convolution weights from the
    graph's own initializers, ignoring ``add_initializer`` overrides: a LoRA on a convolution would
    be silently dropped (measured: 0.16 max error on tiny-sd15's noise_pred, 0 below ``all``).
    """
    return "extended" if level == "all" else level


def shared_weights(folder: str | Path, record: Mapping[str, Any] | None) -> dict[str, dict[str, ort.OrtValue]]:
    """Per UNet graph, initializer name -> an ``OrtValue`` over the shared weights file (memory-mapped).

    ``record`` is a manifest's ``weights``. Tensors the graphs have in common (the same bytes in
    the file) get the same ``OrtValue``: the process holds each weight once, whatever the number of
    sessions. Empty without a weights record.
    """
    if record is None:
        return {}
    data = np.memmap(Path(folder) / record["file"], dtype=np.uint8, mode="r")
    values: dict[int, ort.OrtValue] = {}  # offset -> the one buffer of those bytes
    graphs: dict[str, dict[str, ort.OrtValue]] = {}
    for kind, tensors in record["graphs"].items():
        graphs[kind] = {}
        for name, (offset, length, dtype, shape) in tensors.items():
            if dtype == "bfloat16":  # numpy has no bfloat16: such a graph reads its own copy
                continue
            if offset not in values:
                array = data[offset:offset + length].view(np.dtype(dtype)).reshape(shape)
                values[offset] = ort.OrtValue.ortvalue_from_numpy(array)  # wraps the mapped bytes, no copy
            graphs[kind][name] = values[offset]
    return graphs


def switch_feeds(manifest: Manifest, kind: str) -> dict[str, np.ndarray]:
    """What a ``kind`` step ("planning" or "fidelity") gives the switch graph beyond that graph's own inputs.

    The condition, and placeholders for what the step does not read: planning's cached-output
    inputs (the ``then`` branches that return them do not run) and fidelity's text input and a
    transformer's text mask (read only inside the ``else`` branches). The export checks the switch
    graph with exactly these.
    """
    switch = manifest.switch
    if kind == "planning":
        return {switch["condition"]: np.array(False),
                **{switch["cache_inputs"][cache.name]: np.zeros((1, 1, cache.channels), np.float32)
                   for cache in manifest.caches}}
    read = {spec.name for spec in manifest.graphs["fidelity"].inputs}
    dims = {dim.name: dim.opt for dim in manifest.dims}
    return {switch["condition"]: np.array(True),
            **{spec.name: np.zeros([size if isinstance(size, int) else dims.get(size, 1) for size in spec.shape],
                                   np.float32)
               for spec in manifest.graphs["planning"].inputs if spec.name not in read}}


class OnnxRuntimeBackend:
    """planning.onnx, fidelity.onnx (and shallow.onnx) in onnxruntime: the sessions, shared by every context.

    ``InferenceSession.run_with_iobinding`` is thread-safe; ``IOBinding`` objects are not, so
    everything a generation binds lives in an ``OnnxRuntimeContext`` of its own.
    """

    def __init__(self, folder: str | Path, manifest: Manifest,
                 providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0,
                 graph_optimization: str | None = None, device_id: int = 0, max_concurrency: int | None = None,
                 share_weights: bool = False, one_graph: bool = True):
        self.manifest = manifest
        # one_graph: planning and fidelity steps on the switch graph's one session (folders that have it)
        self.switch = manifest.switch if one_graph else None
        self.kinds = frozenset(manifest.schedule_graphs)
        self.device = _DEVICES.get(providers[0], "cpu") if providers else "cpu"
        self.device_id = device_id
        # share_weights: one buffer per weight for both sessions, memory-mapped from the shared file
        # (exports with a weights record). It turns prepacking off and, by default, stops at the
        # "extended" optimisation level: "all" re-lays convolution weights out in private copies.
        # On the CPU that costs loop time and changes rounding (docs/weights_once.md), so each
        # session reading its own copy stays the default.
        # A low-precision engine on the CPU always shares: onnxruntime's CPU provider has few fp16/bf16
        # kernels and computes such graphs in fp32, casting the weights. Private sessions fold those
        # casts into an fp32 copy each (an SDXL fp16 engine: two of 10 GB); shared ones cast at each run,
        # from one mapped fp16 copy, into buffers no memory arena keeps between runs.
        cpu_low_precision = self.device == "cpu" and manifest.model.get("dtype", "float32") != "float32"
        share_weights = share_weights or (cpu_low_precision and manifest.weights is not None)
        self.weights = shared_weights(folder, manifest.weights) if share_weights else {}
        if graph_optimization is None:
            graph_optimization = "extended" if self.weights else "all"
        self._session_options = {"providers": providers, "threads": threads, "graph_optimization": graph_optimization,
                                 "device_id": device_id, "memory_arena": not cpu_low_precision}
        self.folder = Path(folder)
        self.adapter_values: dict[str, dict[str, ort.OrtValue]] = {}  # adapter weights the sessions use
        self.sessions = self._make_sessions()
        self.max_concurrency = default_concurrency(self.device) if max_concurrency is None else max_concurrency

    def _make_sessions(self) -> dict[str, ort.InferenceSession]:
        """Per UNet graph kind its session; with the switch graph, planning and fidelity share one."""
        files = {kind: graph.file for kind, graph in self.manifest.schedule_graphs.items()}
        if self.switch is not None:  # its initializers are planning's: planning's weights and adapter maps apply
            files["planning"] = files["fidelity"] = self.switch["file"]
        sessions: dict[str, ort.InferenceSession] = {}
        for kind, file in files.items():
            source = "planning" if file == files["planning"] else kind
            if source in sessions:
                sessions[kind] = sessions[source]
                continue
            initializers = {**self.weights.get(source, {}), **self.adapter_values.get(source, {})}
            options = dict(self._session_options)
            if self.adapter_values.get(source):
                options["graph_optimization"] = adapter_optimization(options["graph_optimization"])
            sessions[kind] = make_session(self.folder / file, initializers=initializers,
                                          prepacking=not self.weights, **options)
        for kind, session in sessions.items():
            self._check_io(kind, files[kind], session)
        return sessions

    def _check_io(self, kind: str, file: str, session: ort.InferenceSession) -> None:
        """The graph file has every input and output the runtime binds for ``kind``; else one line, not a
        binding error mid-generation (a manifest edited or paired with other graphs)."""
        graph = self.manifest.graphs[kind]
        inputs = [spec.name for spec in graph.inputs]
        if self.switch is not None and kind in ("planning", "fidelity"):
            inputs = [self.switch["cache_inputs"].get(name, name) for name in inputs] + [self.switch["condition"]]
        have_inputs, have_outputs = ({value.name for value in values}
                                     for values in (session.get_inputs(), session.get_outputs()))
        missing = [name for name in inputs if name not in have_inputs]
        missing += [spec.name for spec in graph.outputs if spec.name not in have_outputs]
        if missing:
            raise EngineMismatchError(f"{file} lacks {', '.join(missing[:4])}, which the manifest's {kind} graph "
                                      "needs: the manifest and the graphs do not belong together; re-export the folder")

    def set_weights(self, overrides: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Rebuild the sessions with these initializers replaced (adapters); empty: the base weights.

        The session options are the base sessions' own, so an empty ``overrides`` gives back
        sessions that compute exactly what the base ones did. Every context must be idle and is
        discarded by the caller (their bindings belong to the old sessions).
        """
        self.sessions = {}  # the old sessions go first: no moment with two copies of the weights
        self.adapter_values = {kind: {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in values.items()}
                               for kind, values in overrides.items() if kind in self.manifest.schedule_graphs}
        self._adapter_arrays = overrides  # the OrtValues wrap these arrays: they must stay alive
        self.sessions = self._make_sessions()

    schedules = True  # runs the guidance stop and shallow steps (merge_halves, the deep feature)

    def new_context(self) -> OnnxRuntimeContext:
        return OnnxRuntimeContext(self)

    def close(self) -> None:
        self.sessions = {}  # the last references: onnxruntime frees a session with its Python object
        self.weights, self.adapter_values = {}, {}  # after the sessions that use them


class OnnxRuntimeContext:
    """One generation's bindings and device buffers; the caches and the deep feature are chained through IOBinding."""

    def __init__(self, backend: OnnxRuntimeBackend):
        self.backend = backend
        self.sessions = backend.sessions
        self.bindings = {kind: session.io_binding() for kind, session in self.sessions.items()}
        self.caches: dict[str, ort.OrtValue] = {}  # cache name -> device buffer planning writes, fidelity reads
        self._outputs: dict[str, ort.OrtValue] = {}  # kind -> noise_pred buffer
        self._deep: ort.OrtValue | None = None  # the deep feature: fidelity writes it, shallow reads it
        self._planning_deep: ort.OrtValue | None = None  # (2B, ...): planning writes it, guided shallow reads it
        self._deep_written = False  # a fidelity step has written it since the buffer was bound
        # inputs bound for a generation (OrtValues) or for the context's life (the switch graph's arrays),
        # kept alive here while bound
        self._fixed: dict[str, ort.OrtValue | np.ndarray] = {}
        self._dims: dict[str, int] | None = None
        self._cache_inputs = {cache.name: cache.name for cache in backend.manifest.caches}
        if backend.switch is not None:  # the condition and placeholders, fixed for the context's life
            self._cache_inputs = dict(backend.switch["cache_inputs"])
            for kind in ("planning", "fidelity"):
                for name, array in switch_feeds(backend.manifest, kind).items():
                    self._fixed[f"{kind}/{name}"] = array
                    self.bindings[kind].bind_cpu_input(name, array)

    def _buffer(self, shape: tuple[int, ...], dtype: str) -> ort.OrtValue:
        backend = self.backend
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(dtype).type, backend.device, backend.device_id)

    def _bind_deep(self, value: ort.OrtValue) -> None:
        name = self.backend.manifest.deep_branch["name"]
        self._deep, self._deep_written = value, False
        self.bindings["fidelity"].bind_ortvalue_output(name, value)
        self.bindings["shallow"].bind_ortvalue_input(name, value)

    def prepare(self, dims: Mapping[str, int]) -> None:
        dims = dict(dims)
        if dims == self._dims:
            return
        manifest = self.backend.manifest
        planning = manifest.graphs["planning"]
        cache_names = {cache.name for cache in manifest.caches}
        for spec in planning.outputs:
            if spec.name in cache_names:
                self.caches[spec.name] = self._buffer(spec.resolve(dims), spec.dtype)
                self.bindings["planning"].bind_ortvalue_output(spec.name, self.caches[spec.name])
        for kind, graph in manifest.schedule_graphs.items():
            spec = graph.outputs[0]  # noise_pred
            self._outputs[kind] = self._buffer(spec.resolve(dims), spec.dtype)
            self.bindings[kind].bind_ortvalue_output(spec.name, self._outputs[kind])
        if "shallow" in self.bindings:
            spec = manifest.graphs["fidelity"].outputs[1]
            self._bind_deep(self._buffer(spec.resolve(dims), spec.dtype))
        if "shallow_planning" in self.bindings:
            # Guided shallow steps: planning's deep feature in, and the caches of the modules they run
            # out into planning's own buffers, so each cache holds its module's latest output.
            name = manifest.deep_branch["name"]
            spec = next(spec for spec in planning.outputs if spec.name == name)
            self._planning_deep = self._buffer(spec.resolve(dims), spec.dtype)
            self.bindings["planning"].bind_ortvalue_output(name, self._planning_deep)
            self.bindings["shallow_planning"].bind_ortvalue_input(name, self._planning_deep)
            for spec in manifest.graphs["shallow_planning"].outputs[1:]:
                self.bindings["shallow_planning"].bind_ortvalue_output(spec.name, self.caches[spec.name])
        self._dims = dims

    def switch_to_fidelity(self) -> None:
        # The same OrtValues planning wrote become fidelity's (and shallow's) inputs: a pointer hand-off, no copy.
        self._bind_caches(self.caches)

    def _bind_caches(self, caches: Mapping[str, ort.OrtValue]) -> None:
        for name, value in caches.items():
            self.bindings["fidelity"].bind_ortvalue_input(self._cache_inputs[name], value)
        if "shallow" in self.bindings:
            for spec in self.backend.manifest.graphs["shallow"].inputs:
                if spec.name in caches:
                    self.bindings["shallow"].bind_ortvalue_input(spec.name, caches[spec.name])

    def merge_halves(self) -> None:
        """The guidance stop: per-half caches (and deep feature) -> their means; fidelity and shallow run at batch B.

        On the CPU provider ``numpy()`` views the buffers, so nothing moves; on a GPU provider
        this round-trips them through the host once per generation.
        """
        def mean(value: ort.OrtValue) -> ort.OrtValue:
            uncond, cond = np.split(value.numpy(), 2)  # (2B, ...): unconditional half first
            merged = self._buffer(uncond.shape, str(uncond.dtype))
            merged.update_inplace((uncond + cond) / np.float32(2))
            return merged

        self._bind_caches({name: mean(value) for name, value in self.caches.items()})
        for kind, value in self._outputs.items():
            if kind not in PLANNING_KINDS:  # guided always: batch 2B
                shape, dtype = value.shape(), self.backend.manifest.graphs[kind].outputs[0].dtype
                self._outputs[kind] = self._buffer((shape[0] // 2, *shape[1:]), dtype)
                self.bindings[kind].bind_ortvalue_output("noise_pred", self._outputs[kind])
        if self._deep is not None:
            # A guidance stop at n (no fidelity step yet) merges a buffer nothing wrote: the next
            # evaluation is full and writes it, so a fresh half-size buffer is all it needs.
            shape, dtype = self._deep.shape(), self.backend.manifest.graphs["fidelity"].outputs[1].dtype
            self._bind_deep(mean(self._deep) if self._deep_written else self._buffer((shape[0] // 2, *shape[1:]), dtype))
        self._dims = None  # the next prepare binds full-size buffers again

    def set_inputs(self, kind: str, arrays: Mapping[str, np.ndarray]) -> None:
        backend = self.backend
        for name, array in arrays.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), backend.device, backend.device_id)
            self._fixed[f"{kind}/{name}"] = value
            self.bindings[kind].bind_ortvalue_input(name, value)

    def run(self, kind: str, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        binding = self.bindings[kind]
        # On CPU these bind the numpy buffers directly; on a GPU they copy the latents up.
        binding.bind_cpu_input("sample", np.ascontiguousarray(sample))
        binding.bind_cpu_input("timestep", timestep)
        self.sessions[kind].run_with_iobinding(binding)
        self._deep_written = self._deep_written or kind == "fidelity"
        # noise_pred only (the caches stay where they are). On CPU numpy() is a view of the buffer
        # the next run overwrites, and multistep schedulers keep past outputs: copy.
        return self._outputs[kind].numpy().copy()

    def read_caches(self) -> dict[str, np.ndarray]:
        return {name: value.numpy().copy() for name, value in self.caches.items()}

    def close(self) -> None:
        for binding in self.bindings.values():
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
        self.bindings, self.sessions, self.caches, self._outputs, self._fixed = {}, {}, {}, {}, {}
        self._deep = self._planning_deep = None
        self._dims = None
