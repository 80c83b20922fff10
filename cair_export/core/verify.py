"""One way to check graph outputs against a reference: by name, shapes before values, NaN-safe tolerance.

As Optimum's ``validate_model_outputs``: the output names are compared first (a missing or an
extra output is an error, never a shorter zip), then every shape, then the values. The error of
one output is relative: max abs error over max abs reference value. A NaN anywhere makes it NaN,
and NaN is outside every tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from cair_runtime.errors import ValidationError

FP32_RELATIVE_TOLERANCE = 1e-4
TOLERANCES = {"fp32": FP32_RELATIVE_TOLERANCE, "fp16": 2e-2, "bf16": 6e-2}  # relative, per compute precision


def relative_error(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """``(max abs error, max abs error / max abs reference value)``; NaN when either holds a NaN."""
    max_abs = float(np.abs(np.asarray(actual, dtype=np.float32) - expected).max())
    return max_abs, max_abs / max(float(np.abs(expected).max()), 1e-12)


def within_tolerance(relative: float, tolerance: float) -> bool:
    """Whether a relative error is within ``tolerance``; a NaN error never is."""
    return bool(relative <= tolerance)


@dataclass(frozen=True)
class OutputCheck:
    """One output's error against the reference."""

    output: str  # the graph output's name
    max_abs: float
    relative: float  # max abs error / max abs reference value
    tolerance: float

    @property
    def ok(self) -> bool:
        return within_tolerance(self.relative, self.tolerance)

    def problem(self, where: str) -> str:
        return f"{where}:{self.output} relative error {self.relative:.2e} > {self.tolerance:.0e}"


def named_outputs(names: Sequence[str], values: Sequence[Any], where: str) -> dict[str, Any]:
    """Outputs by name from a runner that returns them in order; their count must match the names."""
    values = list(values)
    if len(values) != len(names):
        raise ValidationError(f"{where} returned {len(values)} outputs, expected {len(names)} ({', '.join(names)})")
    return dict(zip(names, values))


def compare_outputs(actual: Mapping[str, Any], expected: Mapping[str, np.ndarray], tolerance: float,
                    where: str) -> list[OutputCheck]:
    """One check per reference output, in the reference's order, after names and shapes agree.

    Raises ``ValidationError`` naming every missing, extra or mis-shaped output at once.
    """
    problems = []
    missing = [name for name in expected if name not in actual]
    extra = [name for name in actual if name not in expected]
    if missing:
        problems.append(f"missing output(s) {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected output(s) {', '.join(extra)}")
    for name in expected:
        if name in actual and np.shape(actual[name]) != np.shape(expected[name]):
            problems.append(f"output {name} has shape {tuple(np.shape(actual[name]))}, "
                            f"expected {tuple(np.shape(expected[name]))}")
    if problems:
        raise ValidationError(f"{where}: {'; '.join(problems)}")
    return [OutputCheck(name, *relative_error(actual[name], reference), tolerance)
            for name, reference in expected.items()]


def run_session(session: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an onnxruntime session; its outputs by the names the graph declares."""
    names = [output.name for output in session.get_outputs()]
    return named_outputs(names, session.run(None, dict(inputs)), "onnxruntime session")


def run_module(graph: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a graph module (``CairGraph``, ``TextEncoderGraph``, ...) in torch; its outputs by its IO spec's names."""
    import torch

    with torch.no_grad():
        outputs = graph(*(torch.from_numpy(inputs[name]) for name in graph.input_names))
    return named_outputs([spec.name for spec in graph.io.outputs], [output.numpy() for output in outputs],
                         f"torch {graph.io.kind}")
