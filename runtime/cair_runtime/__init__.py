"""cair-runtime: run CAIR-exported diffusion UNets with numpy and an execution backend.

Importing this package never imports torch, diffusers, transformers or onnx.
"""

import os

# Offline means offline: onnxruntime (1.32) starts its telemetry when it is imported (a device id
# and an event database under the user's cache folder, a ".ses" file in TMPDIR, a DNS lookup of
# its collector) unless this is set first. Every runtime module is imported after this package,
# so it holds wherever onnxruntime is first imported through the runtime or the exporter; a
# program that imports onnxruntime before cair_runtime must set it itself. Set it to 0 to allow it.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
