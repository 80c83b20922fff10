"""cair-export: export diffusers UNets as CAIR planning and fidelity graphs.

The exporter needs torch, diffusers and onnx; the graphs it writes are run by the light
``cair_runtime`` package, whose manifest code the exporter uses (never the reverse).
"""

import cair_runtime  # noqa: F401 - first, before torch or onnx can import onnxruntime: its telemetry stays off

__version__ = "0.1.0"
