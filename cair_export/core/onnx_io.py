"""Saving ONNX models: one file, or the graph plus one side file for its tensors when large."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
