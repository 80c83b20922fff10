"""cair-runtime: run CAIR-exported diffusion UNets with numpy and an execution backend.

Importing this package never imports torch, diffusers, transformers or onnx.
"""

__version__ = "0.1.0"
