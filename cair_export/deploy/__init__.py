"""The deploy side: TensorRT engines, AOTInductor packages, and engines compared with the fp32 reference.

Builds on the export core (graph IO, verification); never on ``lab``.
"""
