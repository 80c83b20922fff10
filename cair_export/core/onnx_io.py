"""Saving ONNX models: one file, or the graph plus one side file for its tensors when large; and
one weights file shared by the UNet graphs."""

from __future__ import annotations

import hashlib
import mmap
import shutil
from pathlib import Path
from typing import Any

import numpy as np

EXTERNAL_DATA_BYTES = 1 << 30  # above this, tensors go to one side file (protobuf caps a file at 2 GB)


def save_onnx(model: Any, path: str | Path) -> list[str]:
    """Save ``model`` (an ``onnx.ModelProto``) to ``path``; return the file names written (``x.onnx[, x.onnx.data]``).

    Over ``EXTERNAL_DATA_BYTES`` of initializers every tensor goes to ``<name>.data`` beside it
    (``all_tensors_to_one_file``), as SD-2.1's 3.4 GB fp32 UNet needs.
    """
    import onnx

    path = Path(path)
    size = sum(initializer.ByteSize() for initializer in model.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
        return [path.name, f"{path.name}.data"]
    onnx.save_model(model, str(path))
    return [path.name]


SHARED_WEIGHTS = "unet_weights.bin"
SHARED_WEIGHTS_ALIGNMENT = 64  # bytes; every tensor starts on such a boundary (numpy views, SIMD loads)
SHARED_WEIGHTS_MIN_BYTES = 1024  # smaller tensors (scalars, shapes) stay inside their graph


def _tensor_bytes(base: Path, tensor: Any, maps: dict[Path, mmap.mmap]) -> bytes | memoryview:
    """A TensorProto's little-endian bytes, from its raw data or a slice of its external file (under ``base``)."""
    from onnx import external_data_helper, numpy_helper

    if not external_data_helper.uses_external_data(tensor):
        return tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
    info = external_data_helper.ExternalDataInfo(tensor)
    path = base / info.location
    if path not in maps:
        with open(path, "rb") as handle:
            maps[path] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    offset = info.offset or 0
    length = info.length if info.length is not None and info.length > 0 else len(maps[path]) - offset
    return memoryview(maps[path])[offset:offset + length]


def read_tensor(base: Path, tensor: Any, maps: dict[Path, mmap.mmap]) -> np.ndarray:
    """A TensorProto as a numpy array, read-only over its external file's mapping when it has one."""
    from onnx import helper

    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    return np.frombuffer(_tensor_bytes(base, tensor, maps), dtype=dtype).reshape(tuple(tensor.dims))


class TensorWriter:
    """Writes initializers one at a time: large ones appended to one side file, small ones inline.

    The graph being built keeps only the small tensors and the external-data entries, so a model
    of any size is rewritten in the memory of its largest tensor.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None

    def tensor(self, name: str, data: np.ndarray) -> Any:
        import onnx
        from onnx import helper

        data = np.ascontiguousarray(data)
        tensor = onnx.TensorProto(name=name, dims=data.shape, data_type=helper.np_dtype_to_tensor_dtype(data.dtype))
        if data.nbytes < SHARED_WEIGHTS_MIN_BYTES:
            tensor.raw_data = data.tobytes()
            return tensor
        if self._file is None:
            self._file = open(self.path, "wb")
        self._file.write(b"\0" * (-self._file.tell() % SHARED_WEIGHTS_ALIGNMENT))
        offset = self._file.tell()
        self._file.write(data.reshape(-1).view(np.uint8).data)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(data.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def close(self) -> list[str]:
        """Finish the side file; return its name, or nothing when every tensor was small."""
        if self._file is None:
            return []
        self._file.close()
        return [self.path.name]


def subgraphs(node: Any) -> list[Any]:
    """The graphs a node carries as attributes (If's branches, Loop's body)."""
    graphs = []
    for attribute in node.attribute:
        graphs += [attribute.g] if attribute.HasField("g") else []
        graphs += list(attribute.graphs)
    return graphs


def _inline(tensor: Any, data: bytes | memoryview) -> None:
    """An external TensorProto made inline with ``data``, its bytes (a mapping's view is released)."""
    import onnx

    tensor.raw_data = bytes(data)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    if isinstance(data, memoryview):
        data.release()


def _inline_constants(graph: Any, base: Path, maps: dict[Path, mmap.mmap]) -> None:
    """Constant values the exporter stored in side files (it does for a graph over 2 GB) back into the graph:
    the side files go once the weights are shared, and these values are small."""
    import onnx

    for node in graph.node:
        for attribute in node.attribute:
            tensors = [attribute.t] if attribute.HasField("t") else list(attribute.tensors)
            for tensor in tensors:
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    _inline(tensor, _tensor_bytes(base, tensor, maps))
        for subgraph in subgraphs(node):
            _inline_constants(subgraph, base, maps)


def share_weights(folder: Path, graph_files: dict[str, list[str]], data_name: str = SHARED_WEIGHTS
                  ) -> tuple[list[str], dict[str, Any]]:
    """Rewrite graphs so that equal weights are stored once, in ``data_name``, which every graph points into.

    ``graph_files`` maps a graph kind to the files it was saved as (``x.onnx[, x.onnx.data]``), or
    to the exporter's raw output in a folder of its own (``.x-raw/x.onnx``, one file per tensor when
    large), which is streamed from and removed: no step holds the whole model in memory.
    Tensors are matched by content (dtype, shape and bytes: the TorchScript exporter renames
    transposed MatMul weights per graph, so names alone do not tell). Each graph keeps its own
    initializer names, as ONNX external data entries (location, offset, length) into the one file.
    Returns the files the graphs now consist of and the manifest's ``weights`` record: per graph,
    initializer name -> ``[offset, length, dtype, shape]``, which lets a runtime load each tensor
    once without parsing ONNX.
    """
    import onnx
    from onnx import helper

    protos = {kind: onnx.load(str(folder / files[0]), load_external_data=False) for kind, files in graph_files.items()}
    bases = {kind: (folder / files[0]).parent for kind, files in graph_files.items()}
    stored: dict[tuple, tuple[int, int]] = {}  # (dtype, dims, sha256) -> (offset, length)
    record: dict[str, dict[str, list]] = {}
    partial = folder / f".{data_name}.partial"
    with open(partial, "wb") as out:
        for kind, proto in protos.items():
            entries = record[kind] = {}
            maps: dict[Path, mmap.mmap] = {}  # this graph's side files, unmapped once it is done
            _inline_constants(proto.graph, bases[kind], maps)
            for tensor in proto.graph.initializer:
                data = _tensor_bytes(bases[kind], tensor, maps)
                if len(data) < SHARED_WEIGHTS_MIN_BYTES:
                    if tensor.data_location == onnx.TensorProto.EXTERNAL:  # small but external: back inline
                        _inline(tensor, data)
                    elif isinstance(data, memoryview):
                        data.release()
                    continue
                dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).name
                key = (dtype, tuple(tensor.dims), hashlib.sha256(data).digest())
                if key not in stored:
                    out.write(b"\0" * (-out.tell() % SHARED_WEIGHTS_ALIGNMENT))
                    stored[key] = (out.tell(), len(data))
                    out.write(data)
                offset, length = stored[key]
                for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    tensor.ClearField(field)
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for field, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = field, value
                entries[tensor.name] = [offset, length, dtype, list(tensor.dims)]
                if isinstance(data, memoryview):
                    data.release()  # the mapped file closes below only once no view is left
            for view in maps.values():
                view.close()
    for kind, proto in protos.items():
        if bases[kind] != folder:  # the exporter's raw output: its folder goes
            shutil.rmtree(bases[kind])
        for stale in graph_files[kind][1:]:  # the graph's own side file, now copied into the shared one
            (folder / stale).unlink(missing_ok=True)
        onnx.save_model(proto, str(folder / f"{kind}.onnx"))
    partial.rename(folder / data_name)
    for kind in protos:
        onnx.checker.check_model(str(folder / f"{kind}.onnx"))
    return [f"{kind}.onnx" for kind in protos] + [data_name], {"file": data_name, "graphs": record}
