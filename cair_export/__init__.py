"""cair-export: export diffusers UNets as CAIR planning and fidelity graphs.

The exporter needs torch, diffusers and onnx; the graphs it writes are run by the light
``cair_runtime`` package, whose manifest code the exporter uses (never the reverse).
"""

__version__ = "0.1.0"
