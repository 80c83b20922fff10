"""The export core: model loading, the torch reference, graph IO, ONNX export, precision, verification.

Depends on torch, diffusers, onnx and the runtime's manifest code; never on ``deploy`` or ``lab``.
"""
