"""The exported graphs against the torch model they were traced from, and the switch graph against the two.

The torch outputs are computed once (``torch_outputs``), so the ONNX checks need no torch model and an
export can release the UNet first. One loop (``validate_graphs``) checks the UNet graphs at fp32 and
at lowered precision alike; which executor runs them is a parameter. The pipeline's text encoder
and VAE graphs are checked against their modules directly (``compare_graph``). Every problem goes
into one ``ValidationReport``, raised once (``finish_validation``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from cair_export.core.graphs import UNET_KINDS, CairGraph, GraphIO, make_inputs
from cair_export.core.memory import free_memory
from cair_export.core.verify import OutputCheck, compare_outputs, named_outputs, run_module, run_session
from cair_runtime.backends.onnxruntime import make_session, shared_weights, switch_feeds
from cair_runtime.errors import CairError, ValidationError
from cair_runtime.manifest import Manifest

# Who runs a graph under validation: onnxruntime's CPU provider, or onnx's reference evaluator
# (numpy, every op in its declared type: true fp16 rounding; slow, for tiny models), or onnxruntime
# where it accepts the graph and the reference evaluator where it refuses it (bf16: onnxruntime has
# almost no CPU kernels for it).
EXECUTORS = ("onnxruntime", "reference", "auto")


@dataclass
class ValidationReport:
    """Worst errors of every graph output at every validation shape."""

    checks: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def add(self, graph: str, dims: dict[str, int], checks: list[OutputCheck]) -> None:
        for check in checks:
            self.checks.append({"graph": graph, "dims": dims, "output": check.output, "max_abs": check.max_abs,
                                "relative": check.relative, "tolerance": check.tolerance})
            if not check.ok:
                self.failures.append(f"{check.problem(graph)} at {dims_text(dims)}")

    def worst(self, graph: str) -> tuple[float, float, float]:
        """Largest absolute and relative error of ``graph``'s checks, and the tolerance they were held to."""
        rows = [c for c in self.checks if c["graph"] == graph]
        return (max(c["max_abs"] for c in rows), max(c["relative"] for c in rows),
                min(c["tolerance"] for c in rows))


def dims_text(dims: dict[str, int]) -> str:
    """``batch=2 latent=8x12``, for progress lines and failures."""
    return f"batch={dims['batch']} latent={dims.get('latent_height')}x{dims.get('latent_width')}"


def torch_outputs(graphs: dict[str, CairGraph], shapes: list[dict[str, int]],
                  progress: Callable[[str], None]) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """The torch modules' outputs on every validation input, computed once, keyed ``(graph, shape index)``.

    With these in hand the ONNX checks (fp32 and lowered precision alike) need no torch model, so
    an export can release the UNet's weights before onnxruntime maps its own copy. ``("chained", 0)``
    is fidelity at step n+1 fed with the caches planning recorded at step n.
    """
    expected = {}
    for kind, graph in graphs.items():
        for index, dims in enumerate(shapes):
            progress(f"torch reference: {kind} at {dims_text(dims)}")
            expected[kind, index] = run_module(graph, make_inputs(graph.io, dims, 100 + index))
    progress(f"torch reference: planning -> fidelity handoff at {dims_text(shapes[0])}")
    expected["chained", 0] = run_module(graphs["fidelity"], handoff_inputs(graphs["fidelity"].io, shapes[0],
                                                                           expected["planning", 0]))
    if "shallow" in graphs:  # ("chained", 1): shallow fed with those caches and that fidelity step's deep feature
        progress(f"torch reference: fidelity -> shallow handoff at {dims_text(shapes[0])}")
        handed = {**expected["planning", 0], **expected["chained", 0]}
        expected["chained", 1] = run_module(graphs["shallow"], handoff_inputs(graphs["shallow"].io, shapes[0],
                                                                              handed, seed=9))
    if "shallow_planning" in graphs:  # ("chained", 2): a guided shallow step on planning's deep feature
        progress(f"torch reference: planning -> guided shallow handoff at {dims_text(shapes[0])}")
        expected["chained", 2] = run_module(graphs["shallow_planning"], handoff_inputs(
            graphs["shallow_planning"].io, shapes[0], expected["planning", 0], seed=10))
    return expected


def handoff_inputs(fidelity: GraphIO, dims: dict[str, int], planning_outputs: dict[str, np.ndarray],
                   seed: int = 8) -> dict[str, np.ndarray]:
    """Fidelity's inputs at step n+1: its own sample and conditions, planning's caches from step n
    (shallow's likewise: the caches and the deep feature of the full step before it)."""
    inputs = make_inputs(fidelity, dims, seed=seed)
    return {**inputs, **{name: planning_outputs[name] for name in inputs if name in planning_outputs
                         and name != "noise_pred"}}


def validate_graphs(ios: dict[str, GraphIO], folder: Path, shapes: list[dict[str, int]],
                    expected: dict[tuple[str, int], dict[str, np.ndarray]], tolerance: float,
                    progress: Callable[[str], None], report: ValidationReport,
                    weights: dict[str, Any] | None = None, label: str = "", executor: str = "onnxruntime"
                    ) -> dict[str, str]:
    """Run each UNet graph (``folder/<kind>.onnx``) against the torch outputs, then the chained handoffs.

    ``expected`` comes from ``torch_outputs``. With the export's shared ``weights`` record, both
    sessions use one memory-mapped copy of the weights; the sessions live one at a time (onnxruntime's
    CPU provider turns fp16 weights into private fp32 copies: two sessions would hold two).
    ``executor`` is one of ``EXECUTORS``. ``label`` names the precision in progress lines and
    reports (``"float16 "``). Returns the executor that ran each graph.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r} is not one of {', '.join(EXECUTORS)}")
    initializers = shared_weights(folder, weights)
    executors, planned, chained = {}, None, None
    for kind in sorted(ios, key=UNET_KINDS.index):  # each handoff needs the graph before
        io = ios[kind]  # one session at a time: lowered graphs get private fp32 copies on the CPU
        run, executors[kind] = _graph_runner(folder / f"{kind}.onnx", initializers.get(kind), executor)
        for index, dims in enumerate(shapes):
            progress(f"validating {label}{kind} at {dims_text(dims)}")
            actual = run(make_inputs(io, dims, 100 + index))
            report.add(kind, dims, compare_outputs(actual, expected[kind, index], tolerance, f"{label}{kind}"))
            planned = actual if (kind, index) == ("planning", 0) else planned
        if kind == "fidelity":
            progress(f"validating {label}planning -> fidelity handoff at {dims_text(shapes[0])}")
            chained = run(handoff_inputs(io, shapes[0], planned))
            report.add("chained", shapes[0], compare_outputs(chained, expected["chained", 0], tolerance,
                                                             f"{label}chained fidelity"))
        if kind == "shallow":
            progress(f"validating {label}fidelity -> shallow handoff at {dims_text(shapes[0])}")
            actual = run(handoff_inputs(io, shapes[0], {**planned, **chained}, seed=9))
            report.add("chained", shapes[0], compare_outputs(actual, expected["chained", 1], tolerance,
                                                             f"{label}chained shallow"))
        if kind == "shallow_planning":
            progress(f"validating {label}planning -> guided shallow handoff at {dims_text(shapes[0])}")
            actual = run(handoff_inputs(io, shapes[0], planned, seed=10))
            report.add("chained", shapes[0], compare_outputs(actual, expected["chained", 2], tolerance,
                                                             f"{label}chained guided shallow"))
        del run
        free_memory()
    return executors


def _graph_runner(path: Path, initializers: dict[str, Any] | None, executor: str
                  ) -> tuple[Callable[[dict], dict], str]:
    """A graph's ``inputs -> outputs`` on the CPU, run by ``executor``, and the name of what ran it."""
    if executor == "reference":
        return lambda inputs: _run_reference_evaluator(path, inputs), "onnx.reference"
    try:
        session = make_session(path, initializers=initializers, memory_arena=False,
                               graph_optimization="extended" if initializers else "all")
    except CairError as error:
        if executor != "auto":
            raise
        return (lambda inputs: _run_reference_evaluator(path, inputs),
                f"onnx.reference (onnxruntime CPU refused: {str(error).splitlines()[0][:160]})")

    def run(inputs: dict) -> dict:
        outputs = run_session(session, inputs)
        free_memory()  # what the run freed goes back now: the next run's peak does not stack on it
        return outputs

    return run, "onnxruntime CPU"


def _run_reference_evaluator(path: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(path))
    outputs = [np.asarray(o, dtype=np.float32) for o in evaluator.run(None, dict(inputs))]
    return named_outputs(evaluator.output_names, outputs, f"onnx.reference on {path.name}")


def compare_graph(graph: torch.nn.Module, session, shapes: list[dict[str, int]], make: Callable,
                  report: ValidationReport, tolerance: float, progress: Callable[[str], None]) -> None:
    """One graph against its torch module at each shape (``make(io, dims, seed)`` its inputs); into ``report``."""
    kind = graph.io.kind
    for seed, dims in enumerate(shapes):
        progress(f"validating {kind} at {dims_text(dims)}")
        inputs = make(graph.io, dims, 100 + seed)
        checks = compare_outputs(run_session(session, inputs), run_module(graph, inputs), tolerance, kind)
        report.add(kind, dims, checks)


def finish_validation(report: ValidationReport, folder: Path, progress: Callable[[str], None]) -> str:
    """Raise every failure at once; otherwise print each graph's worst error and write ``validation.json``
    (returned: the file written)."""
    if report.failures:
        raise ValidationError(f"exported graphs differ from the torch model: {'; '.join(report.failures)}")
    for kind in dict.fromkeys(check["graph"] for check in report.checks):
        max_abs, relative, tolerance = report.worst(kind)
        progress(f"  {kind:15s} max abs error {max_abs:.2e}, relative {relative:.2e} (tolerance {tolerance:.0e})")
    (folder / "validation.json").write_text(json.dumps(report.checks, indent=2) + "\n")
    return "validation.json"


def check_switch(work: Path, manifest: Manifest, ios: dict[str, GraphIO], dims: dict[str, int],
                 progress: Callable[[str], None]) -> Manifest:
    """The switch graph must compute planning's and fidelity's outputs bit for bit in onnxruntime, with
    the runtime's default settings (private weights, level ``all``, prepacking) and the placeholder
    inputs it feeds; otherwise it is dropped from the folder. One session at a time."""
    progress(f"checking the switch graph against planning and fidelity at {dims_text(dims)}")

    def outputs(file: str, inputs: dict[str, np.ndarray], names) -> dict[str, np.ndarray]:
        session = make_session(work / file)
        named = run_session(session, inputs)
        del session
        free_memory()
        return {name: named[name] for name in names}

    switch = manifest.switch
    planning_in = make_inputs(ios["planning"], dims, 100)
    planning_names = [spec.name for spec in ios["planning"].outputs]
    planned = outputs("planning.onnx", planning_in, planning_names)
    fidelity_in = handoff_inputs(ios["fidelity"], dims, planned)
    fidelity_names = [spec.name for spec in ios["fidelity"].outputs]
    expected = {("planning", name): value for name, value in planned.items()}
    expected |= {("fidelity", name): value
                 for name, value in outputs("fidelity.onnx", fidelity_in, fidelity_names).items()}
    renamed = {switch["cache_inputs"].get(name, name): value for name, value in fidelity_in.items()}
    actual = {("planning", name): value for name, value in outputs(
        switch["file"], {**planning_in, **switch_feeds(manifest, "planning")}, planning_names).items()}
    actual |= {("fidelity", name): value for name, value in outputs(
        switch["file"], {**renamed, **switch_feeds(manifest, "fidelity")}, fidelity_names).items()}
    differing = [f"{kind} {name} (max abs {np.abs(actual[kind, name] - value).max():.1e})"
                 for (kind, name), value in expected.items() if not np.array_equal(actual[kind, name], value)]
    if not differing:
        return manifest
    progress(f"no switch graph: it differs from the two graphs in {', '.join(differing[:3])}; "
             "runtimes use the two graphs")
    (work / switch["file"]).unlink()
    files = tuple(record for record in manifest.files if record.path != switch["file"])
    return dataclasses.replace(manifest, switch=None, files=files)
