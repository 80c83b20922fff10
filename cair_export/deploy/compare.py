"""``cair-export compare``: every built engine and low-precision graph against the fp32 reference.

The reference is the fp32 ONNX graphs run by onnxruntime's CPU provider. Candidates: the folder's
own graphs when they are not fp32 (``--dtype fp16`` exports), every TensorRT engine (polygraphy's
``TrtRunner``; needs TensorRT and a GPU) and every AOTInductor package. All run on the same seeded
inputs (``cair_export.core.graphs.make_inputs`` from the manifest's specs); each output is checked
against its tolerance (relative: max abs error over max abs reference value; fp32 1e-4, fp16
2e-2, bf16 6e-2). Prints a table; any failure exits 2. Candidates that cannot run here are listed
with the reason and do not fail the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from cair_export.core.graphs import GraphIO, make_inputs
from cair_export.core.verify import TOLERANCES, compare_outputs, named_outputs, run_session, within_tolerance
from cair_runtime.errors import CairError, InvalidInputError
from cair_runtime.manifest import EngineRecord, Manifest, load_manifest

_BY_NAME = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

Runner = Callable[[str, Mapping[str, np.ndarray]], dict[str, np.ndarray]]  # (kind, inputs) -> outputs by name


@dataclass
class Row:
    candidate: str
    graph: str
    output: str
    precision: str
    max_abs: float = float("nan")
    relative: float = float("nan")
    tolerance: float = float("nan")
    note: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.note) or within_tolerance(self.relative, self.tolerance)


def _onnxruntime_runner(folder: Path, manifest: Manifest) -> Runner:
    from cair_runtime.backends.onnxruntime import make_session

    sessions = {kind: make_session(folder / graph.file) for kind, graph in manifest.unet_graphs.items()}
    return lambda kind, inputs: run_session(sessions[kind], inputs)


def _tensorrt_runner(folder: Path, records: Mapping[str, EngineRecord]) -> Runner:
    from cair_runtime.backends.tensorrt import check_engine_records, device_info, import_tensorrt

    trt = import_tensorrt()
    check_engine_records(records.values(), trt.__version__, device_info())
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    runners = {kind: TrtRunner(EngineFromBytes(BytesFromPath(str(folder / record.file)))) for kind, record in records.items()}
    for runner in runners.values():
        runner.activate()

    def run(kind: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(runners[kind].infer(dict(inputs), copy_outputs_to_host=True))  # polygraphy names them

    return run


def _aoti_runner(folder: Path, manifest: Manifest, records: Mapping[str, EngineRecord]) -> Runner:
    import torch

    device = records["planning"].properties.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("the AOTInductor packages were compiled for CUDA and this machine has no GPU")
    models = {kind: torch._inductor.aoti_load_package(str(folder / record.file)) for kind, record in records.items()}
    graphs = manifest.unet_graphs

    def run(kind: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # A package takes and returns tensors in the order of the manifest's IO spec, its only names.
        outputs = models[kind](*(torch.from_numpy(inputs[spec.name]).to(device) for spec in graphs[kind].inputs))
        return named_outputs([spec.name for spec in graphs[kind].outputs],
                             [output.detach().to("cpu", torch.float32).numpy() for output in outputs], f"aoti {kind}")

    return run


def comparison_dims(manifest: Manifest, batch: int | None = None, multiple: int = 1) -> dict[str, int]:
    """The manifest's opt dims (latent sizes rounded to ``multiple``, for AOTInductor packages)."""
    dims = {dim.name: dim.opt for dim in manifest.dims}
    for name in ("latent_height", "latent_width"):
        dims[name] = max(multiple, dims[name] // multiple * multiple)
    if batch is not None:
        dims["batch"] = batch
    return dims


def compare_engines(engine_dir: str | Path, reference_dir: str | Path | None = None, batch: int | None = None,
                    progress: Callable[[str], None] = print) -> list[Row]:
    """Run every candidate and the reference on the same inputs; one row per candidate, graph and output."""
    folder = Path(engine_dir)
    manifest = load_manifest(folder)
    own_precision = _BY_NAME.get(str(manifest.model.get("dtype", "float32")), "fp32")
    if reference_dir is None and own_precision != "fp32":
        raise InvalidInputError(f"{folder}'s graphs are {manifest.model['dtype']}, so they cannot be the fp32 reference; "
                                "pass --reference FP32_ENGINE_DIR (an fp32 export of the same model)")
    reference_folder = Path(reference_dir) if reference_dir else folder
    reference_manifest = load_manifest(reference_folder) if reference_dir else manifest
    reference = _onnxruntime_runner(reference_folder, reference_manifest)

    candidates: list[tuple[str, str, Callable[[], Runner], int]] = []  # name, precision, runner factory, multiple
    if own_precision != "fp32":
        candidates.append((f"onnx {own_precision} (onnxruntime CPU)", own_precision,
                           lambda: _onnxruntime_runner(folder, manifest), 1))
    by_backend: dict[str, dict[str, EngineRecord]] = {}
    for record in manifest.engines:
        by_backend.setdefault(record.backend, {})[record.graph] = record
    for backend, records in by_backend.items():
        precision = _BY_NAME.get(str(records["planning"].properties.get("precision", "float32")), "fp32")
        multiple = int(records["planning"].properties.get("latent_multiple", 1))
        factory = {"tensorrt": lambda r=records: _tensorrt_runner(folder, r),
                   "aoti": lambda r=records: _aoti_runner(folder, manifest, r)}.get(backend)
        if factory is None:
            continue
        candidates.append((backend, precision, factory, multiple))
    if not candidates:
        raise InvalidInputError(f"{folder} has nothing to compare: fp32 graphs and no built engines; "
                                "run `cair-export build` first or export with --dtype fp16")

    rows: list[Row] = []
    for name, precision, factory, multiple in candidates:
        tolerance = TOLERANCES[precision]
        try:
            runner = factory()
        except CairError as error:  # e.g. no TensorRT here: reported, not failed
            rows += [Row(name, kind, "-", precision, note=f"not run: {error}") for kind in manifest.unet_graphs]
            continue
        dims = comparison_dims(manifest, batch, multiple)
        for seed, (kind, graph) in enumerate(manifest.unet_graphs.items()):
            progress(f"comparing {name} {kind} at {dims}")
            inputs = make_inputs(GraphIO(kind, graph.inputs, graph.outputs), dims, seed=300 + seed)
            checks = compare_outputs(runner(kind, inputs), reference(kind, inputs), tolerance, f"{name} {kind}")
            rows += [Row(name, kind, check.output, precision, check.max_abs, check.relative, tolerance)
                     for check in checks]
    return rows


def format_table(rows: list[Row]) -> str:
    """A markdown table, failures marked."""
    lines = ["| candidate | graph | output | precision | max abs | relative | tolerance | result |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        result = row.note or ("ok" if row.ok else "FAIL")
        lines.append(f"| {row.candidate} | {row.graph} | {row.output} | {row.precision} | {row.max_abs:.2e} | "
                     f"{row.relative:.2e} | {row.tolerance:.0e} | {result} |")
    return "\n".join(lines)
