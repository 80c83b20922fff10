"""Export a UNet as CAIR's planning and fidelity (and shallow) ONNX graphs, validate them, write the manifest.

The output folder appears only when everything is written and validated: the export is built in
a hidden folder beside it (``.NAME.partial-PID-*``) and renamed into place at the end. Nothing the
user had is lost on the way: one export at a time holds a target (``.NAME.lock``), ``overwrite``
replaces only a complete engine folder (never the model's own), a folder that appeared meanwhile
is left alone, and an interrupted export removes its partial folder (or a later one does, once its
process is gone).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import gc
import glob
import json
import os
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cair_export.core.graphs import (
    CairGraph,
    GraphIO,
    TextEncoderGraph,
    VaeDecoderGraph,
    VaeEncoderGraph,
    cache_specs,
    graph_dims,
    graph_specs,
    make_inputs,
    make_token_inputs,
    text_encoder_io,
    vae_decoder_io,
    vae_encoder_io,
)
from cair_export.core.deep_feature import deep_branch
from cair_export.core.models import LoadedModel
from cair_export.core.onnx_io import SHARED_WEIGHTS, save_onnx, share_weights
from cair_export.core.reference import FIDELITY_GUIDANCE, CrossAttentionCache
from cair_export.core.switch import SwitchGraphError, write_switch_graph
from cair_export.core.verify import FP32_RELATIVE_TOLERANCE, OutputCheck, compare_outputs, run_module, run_session
from cair_runtime.backends.onnxruntime import make_session, shared_weights, switch_feeds
from cair_runtime.errors import CairError, InvalidInputError, ValidationError
from cair_runtime.files import check_folder_writable, rename_noreplace
from cair_runtime.lora import check_lora_list, read_lora_file
from cair_runtime.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Dim,
    GraphSpec,
    Manifest,
    load_manifest,
    record_file,
    size_problem,
    stamp_verified,
)

MIN_OPSET = 17  # LayerNormalization stays one op


@dataclass(frozen=True)
class ExportConfig:
    """What to export; the CLI's flags map onto these fields one to one."""

    height: int | None = None  # pixels the graphs are tuned for (opt); None = the model's native size
    width: int | None = None
    opset: int = MIN_OPSET
    fidelity_guidance: str = "none"  # "none": batch B, no CFG after step n; "cfg": keep both halves
    cache_step_hint: int = 5  # default n the runtime uses, for the default 25 steps
    max_batch: int = 4  # prompts per call the graphs accept (the graphs see 2x this in planning)
    validate: bool = True  # run every graph in onnxruntime against the torch module
    tolerance: float = FP32_RELATIVE_TOLERANCE  # max abs error / max abs reference value
    dtype: str = "fp32"  # "fp32" | "fp16" | "bf16": compute precision in the UNet graphs (fp32 islands); IO float32
    loras: tuple[tuple[str, float], ...] = ()  # (safetensors file, scale) adapters fused before tracing, in order
    deep_branch: int | None = None  # DeepCache's cache_branch_id: also export the shallow graph; None: no deep caching


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
                self.failures.append(f"{check.problem(graph)} at {_dims_str(dims)}")

    def worst(self, graph: str) -> tuple[float, float, float]:
        """Largest absolute and relative error of ``graph``'s checks, and the tolerance they were held to."""
        rows = [c for c in self.checks if c["graph"] == graph]
        return (max(c["max_abs"] for c in rows), max(c["relative"] for c in rows),
                min(c["tolerance"] for c in rows))


def _dims_str(dims: dict[str, int]) -> str:
    return f"batch={dims['batch']} latent={dims.get('latent_height')}x{dims.get('latent_width')}"


def supported_opsets() -> range:
    """The opsets both torch's TorchScript exporter and the installed onnx know, from ``MIN_OPSET``."""
    import onnx
    from torch.onnx import _constants  # private, but the one place torch states its exporter's newest opset

    newest = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", MIN_OPSET)
    return range(MIN_OPSET, min(newest, onnx.defs.onnx_opset_version()) + 1)


MAX_EXPORT_SIDE = 4096  # px; SDXL's native size is 1024


def check_export_config(model: LoadedModel, config: ExportConfig) -> tuple[int, int]:
    """Validate user options; return the (height, width) in pixels."""
    check_export_options(config)
    factor = model.vae_scale_factor
    native = model.unet.config.sample_size * factor
    height = native if config.height is None else config.height
    width = native if config.width is None else config.width
    for label, value in (("height", height), ("width", width)):
        problem = size_problem(label, value, factor)
        if problem:
            raise InvalidInputError(f"{problem}; try {max(factor, round(value / factor) * factor)}")
    return height, width


def check_export_options(config: ExportConfig) -> None:
    """The checks that need no model (all but the sizes): the CLI runs them before loading one."""
    opsets = supported_opsets()
    if config.opset not in opsets:
        raise InvalidInputError(f"opset {config.opset} is not supported; use --opset {opsets.start} to "
                                f"{opsets.stop - 1} (what torch's exporter and the installed onnx support)")
    if config.fidelity_guidance not in FIDELITY_GUIDANCE:
        raise InvalidInputError(f"fidelity guidance {config.fidelity_guidance!r} is unknown; "
                                f"expected one of {', '.join(FIDELITY_GUIDANCE)}")
    if config.cache_step_hint < 1:
        raise InvalidInputError(f"cache step hint {config.cache_step_hint} must be at least 1")
    if config.dtype not in ("fp32", "fp16", "bf16"):
        raise InvalidInputError(f"dtype {config.dtype!r} is unknown; expected fp32, fp16 or bf16")
    if config.max_batch < 1:
        raise InvalidInputError(f"max batch {config.max_batch} must be at least 1")
    for label, value in (("height", config.height), ("width", config.width)):
        if value is not None and value > MAX_EXPORT_SIDE:  # non-positive ones: check_export_config names the factor
            raise InvalidInputError(f"{label} {value} px is above {MAX_EXPORT_SIDE} px (the graphs are checked at "
                                    "sizes around it; larger ones need more memory than an export can have): give "
                                    f"--{label} as the pixel size you will generate", field=label)
    for path, _scale in check_lora_list(list(config.loras)):
        read_lora_file(path)  # truncated, inconsistent or NaN/inf: refused before any model is loaded
    if config.deep_branch is not None and (not isinstance(config.deep_branch, int) or config.deep_branch < 0):
        raise InvalidInputError(f"deep branch {config.deep_branch!r} must be a non-negative integer "
                                "(DeepCache's cache_branch_id: 3 * block + layer)", field="deep_branch")


def check_output_dir(out_dir: str | Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse, before any work, an output the export cannot write or must not replace.

    ``overwrite`` replaces only a complete engine folder (its manifest loads); ``source`` is the
    model's own folder, which is never the output nor inside it. Creates the parent folder.
    """
    out_dir = Path(out_dir)
    if source is not None:
        target, source = out_dir.resolve(), Path(source).resolve()
        if target == source or target in source.parents:
            what = "is the model folder" if target == source else f"holds the model folder {source}"
            raise InvalidInputError(f"output {out_dir} {what}; writing there would delete the model; "
                                    "choose another output folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInputError(f"output {out_dir} exists and is not a folder; choose another path")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise InvalidInputError(f"output folder {out_dir} exists and is not empty; pass --overwrite to replace it")
        try:
            load_manifest(out_dir, verify="size")
        except CairError as error:
            reason = str(error).splitlines()[0]
            raise InvalidInputError(f"--overwrite replaces only a complete engine folder: {reason}; replacing it "
                                    "would lose its files: empty it or choose another folder") from None
    check_folder_writable(out_dir.parent)


_locks_held: set[tuple[Path, int]] = set()  # (lock file, thread): export_lock is re-entrant per thread


@contextlib.contextmanager
def export_lock(out_dir: str | Path):
    """Hold ``.NAME.lock`` beside ``out_dir``: a second export to the same folder fails at once.

    Re-entrant within a thread, so the CLI can take it before loading the model and
    ``export_model`` again. The parent folder must exist (``check_output_dir`` makes it).
    """
    out_dir = Path(out_dir)
    path = out_dir.parent.resolve() / f".{out_dir.name}.lock"
    key = (path, threading.get_ident())
    if key in _locks_held:
        yield
        return
    fd = _acquire_lock(path, out_dir)
    _locks_held.add(key)
    try:
        yield
    finally:
        _locks_held.discard(key)
        path.unlink(missing_ok=True)  # still locked: whoever opened this file sees it gone and retries
        os.close(fd)


def _acquire_lock(path: Path, out_dir: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InvalidInputError(f"another export to {out_dir} is running (pid {owner}); wait for it to finish "
                                    "or choose another folder") from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)  # the previous holder removed the file as we locked it: lock the new one


def _remove_stale_folders(out_dir: Path) -> None:
    """Partial (and moved-aside) folders of ``out_dir`` whose export process is gone, e.g. after SIGKILL.

    A moved-aside old export is the only copy while the target is missing: it stays then.
    """
    for kind in ("partial", "old"):
        if kind == "old" and not out_dir.is_dir():
            continue
        prefix = f".{out_dir.name}.{kind}-"
        for folder in out_dir.parent.glob(glob.escape(prefix) + "*"):
            pid = folder.name[len(prefix):].split("-")[0]
            if folder.is_dir() and pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _trace_dims(dims: tuple[Dim, ...], up_factor: int) -> dict[str, int]:
    """Batch 1 at the smallest latent size, made NOT a multiple of the UNet's upsampling factor.

    diffusers then passes explicit upsample sizes (``forward_upsample_size``), so the traced
    Resize ops take their size from the skip tensors instead of freezing the trace size. The trace
    is one forward pass whose values are thrown away: the smallest size makes it cheap (a quarter
    of the opt size's work); validation runs at other sizes.
    """
    concrete = {dim.name: dim.min for dim in dims}
    concrete["batch"] = 1
    for name in ("latent_height", "latent_width"):
        size = concrete[name] + 1
        while size % up_factor == 0:
            size += 1
        concrete[name] = size
    return concrete


def _validation_dims(dims: tuple[Dim, ...], up_factor: int) -> list[dict[str, int]]:
    """Shapes other than the trace shape: the opt size at batch 1, and batch 2 at a smaller, non-square size.

    The second checks the dynamic batch and latent axes at about a quarter of the opt size's cost
    (for SDXL at 1024 px a batch-2 planning check at the opt size is four 1024 px UNet evaluations).
    """
    by_name = {dim.name: dim for dim in dims}
    opt = {dim.name: dim.opt for dim in dims}
    height, width = by_name["latent_height"], by_name["latent_width"]
    small = dict(opt, batch=min(2, by_name["batch"].max), latent_height=height.min,
                 latent_width=min(width.min + up_factor, width.max))
    if small["latent_width"] == small["latent_height"]:  # keep it non-square
        small["latent_height"] = min(height.min + 2 * up_factor, height.max)
    return [opt, small]


def _export_onnx(graph: CairGraph, io: GraphIO, inputs: dict[str, np.ndarray], folder: Path, opset: int,
                 keep_raw: bool = False) -> list[str]:
    """Trace one graph to ``folder/<kind>.onnx`` (+ ``.onnx.data`` when large); return the files written.

    ``keep_raw``: leave the exporter's own output (``.<kind>-raw/<kind>.onnx``, tensors in side files
    when large) for ``share_weights`` to stream from, instead of loading the whole model to save it.
    """
    import onnx

    raw_dir = folder / f".{io.kind}-raw"
    raw_dir.mkdir()
    raw = raw_dir / f"{io.kind}.onnx"
    dynamic_axes = {
        spec.name: {axis: str(entry) for axis, entry in enumerate(spec.shape) if isinstance(entry, str)}
        for spec in io.inputs + io.outputs
    }
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow we checked
        # The TorchScript exporter, as the TensorRT demo and Optimum use for UNets: dynamic axes
        # come from the IO spec; validation below checks shapes other than the trace shape.
        torch.onnx.export(
            graph, tuple(torch.from_numpy(inputs[spec.name]) for spec in io.inputs), str(raw),
            input_names=[spec.name for spec in io.inputs], output_names=[spec.name for spec in io.outputs],
            dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    if keep_raw:
        return [str(raw.relative_to(folder))]
    files = save_onnx(onnx.load(str(raw), load_external_data=True), folder / f"{io.kind}.onnx")
    shutil.rmtree(raw_dir)
    onnx.checker.check_model(str(folder / files[0]))
    return files


UNET_KINDS = ("planning", "fidelity", "shallow")
UNET_FILES = tuple(f"{kind}.onnx" for kind in UNET_KINDS) + (SHARED_WEIGHTS,)


def _share_unet_weights(work: Path, files: list[str]) -> tuple[list[str], dict[str, Any]]:
    """One copy of the UNet's weights on disk: the graphs point into one file (docs/weights_once.md)."""
    graph_files = {kind: sorted(f for f in files if f.startswith((f"{kind}.onnx", f".{kind}-raw/")))
                   for kind in UNET_KINDS}
    shared, weights = share_weights(work, {kind: names for kind, names in graph_files.items() if names})
    raw = tuple(f".{kind}-raw/" for kind in UNET_KINDS)
    return [f for f in files if not f.startswith(UNET_FILES + raw)] + shared, weights


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
            progress(f"torch reference: {kind} at {_dims_str(dims)}")
            expected[kind, index] = run_module(graph, make_inputs(graph.io, dims, 100 + index))
    progress(f"torch reference: planning -> fidelity handoff at {_dims_str(shapes[0])}")
    expected["chained", 0] = run_module(graphs["fidelity"], _handoff_inputs(graphs["fidelity"].io, shapes[0],
                                                                            expected["planning", 0]))
    if "shallow" in graphs:  # ("chained", 1): shallow fed with those caches and that fidelity step's deep feature
        progress(f"torch reference: fidelity -> shallow handoff at {_dims_str(shapes[0])}")
        handed = {**expected["planning", 0], **expected["chained", 0]}
        expected["chained", 1] = run_module(graphs["shallow"], _handoff_inputs(graphs["shallow"].io, shapes[0],
                                                                               handed, seed=9))
    return expected


def _handoff_inputs(fidelity: GraphIO, dims: dict[str, int], planning_outputs: dict[str, np.ndarray],
                    seed: int = 8) -> dict[str, np.ndarray]:
    """Fidelity's inputs at step n+1: its own sample and conditions, planning's caches from step n
    (shallow's likewise: the caches and the deep feature of the full step before it)."""
    inputs = make_inputs(fidelity, dims, seed=seed)
    return {**inputs, **{name: planning_outputs[name] for name in inputs if name in planning_outputs
                         and name != "noise_pred"}}


def validate_graphs(ios: dict[str, GraphIO], folder: Path, shapes: list[dict[str, int]],
                    expected: dict[tuple[str, int], dict[str, np.ndarray]], tolerance: float,
                    progress: Callable[[str], None], report: ValidationReport,
                    weights: dict[str, Any] | None = None, label: str = "", reference_fallback: bool = False
                    ) -> dict[str, str]:
    """Run each UNet graph in onnxruntime (CPU) against the torch outputs, then the chained handoff.

    ``expected`` comes from ``torch_outputs``. With the export's shared ``weights`` record, both
    sessions use one memory-mapped copy of the weights; the sessions live one at a time (onnxruntime's
    CPU provider turns fp16 weights into private fp32 copies: two sessions would hold two). ``label`` names the precision in progress lines and reports
    (``"float16 "``). Returns the executor that ran each graph.
    """
    initializers = shared_weights(folder, weights)
    executors, planned, chained = {}, None, None
    for kind in sorted(ios, key=("planning", "fidelity", "shallow").index):  # each handoff needs the graph before
        io = ios[kind]  # one session at a time: lowered graphs get private fp32 copies on the CPU
        run, executors[kind] = _graph_runner(folder / f"{kind}.onnx", initializers.get(kind), reference_fallback)
        for index, dims in enumerate(shapes):
            progress(f"validating {label}{kind} at {_dims_str(dims)}")
            actual = run(make_inputs(io, dims, 100 + index))
            report.add(kind, dims, compare_outputs(actual, expected[kind, index], tolerance, f"{label}{kind}"))
            planned = actual if (kind, index) == ("planning", 0) else planned
        if kind == "fidelity":
            progress(f"validating {label}planning -> fidelity handoff at {_dims_str(shapes[0])}")
            chained = run(_handoff_inputs(io, shapes[0], planned))
            report.add("chained", shapes[0], compare_outputs(chained, expected["chained", 0], tolerance,
                                                             f"{label}chained fidelity"))
        if kind == "shallow":
            progress(f"validating {label}fidelity -> shallow handoff at {_dims_str(shapes[0])}")
            actual = run(_handoff_inputs(io, shapes[0], {**planned, **chained}, seed=9))
            report.add("chained", shapes[0], compare_outputs(actual, expected["chained", 1], tolerance,
                                                             f"{label}chained shallow"))
        del run
        _free_memory()
    return executors


def _graph_runner(path: Path, initializers: dict[str, Any] | None, reference_fallback: bool = False
                  ) -> tuple[Callable[[dict], dict], str]:
    """A graph's ``inputs -> outputs`` in onnxruntime CPU; with ``reference_fallback`` (bf16 graphs,
    for which onnxruntime has almost no CPU kernels) in onnx's reference evaluator where onnxruntime
    refuses the graph: slow, for tiny models."""
    try:
        session = make_session(path, initializers=initializers, memory_arena=False,
                               graph_optimization="extended" if initializers else "all")
    except CairError as error:
        if not reference_fallback:
            raise
        from cair_export.core.precision import run_onnx

        return (lambda inputs: run_onnx(path, inputs, "reference")[0],
                f"onnx.reference (onnxruntime CPU refused: {str(error).splitlines()[0][:160]})")
    def run(inputs: dict) -> dict:
        outputs = run_session(session, inputs)
        _free_memory()  # what the run freed goes back now: the next run's peak does not stack on it
        return outputs

    return run, "onnxruntime CPU"


def _compare(graph: torch.nn.Module, session, shapes: list[dict[str, int]], make: Callable,
             report: ValidationReport, tolerance: float, progress: Callable[[str], None]) -> None:
    """One graph against its torch module at each shape; results go into ``report``."""
    kind = graph.io.kind
    for seed, dims in enumerate(shapes):
        progress(f"validating {kind} at {_dims_str(dims)}")
        inputs = make(graph.io, dims, 100 + seed)
        checks = compare_outputs(run_session(session, inputs), run_module(graph, inputs), tolerance, kind)
        report.add(kind, dims, checks)


def _export_pipeline_parts(model: LoadedModel, work: Path, dims: tuple[Dim, ...], config: ExportConfig,
                           report: ValidationReport | None, progress: Callable[[str], None]):
    """Text encoder(s), VAE decoder and encoder and tokenizer(s) beside the UNet graphs, validated like them;
    returns the pipeline section, the graphs' IO and every file written (external data included)."""
    opt = {dim.name: dim.opt for dim in dims}
    text_dims = [dict(opt, batch=1), dict(opt, batch=2)]
    pipeline = {"type": "stable-diffusion-xl" if model.family == "sdxl" else "stable-diffusion",
                "text_encoders": [], "vae_graph": "vae_decoder", "vae_encoder_graph": "vae_encoder",
                "vae_scaling_factor": float(model.vae.config.scaling_factor),
                "force_zeros_for_empty_prompt": model.force_zeros_for_empty_prompt,
                "pooled_from": "text_encoder_2" if model.family == "sdxl" else None}
    ios, files, text_weights = {}, [], {}
    for index, encoder in enumerate(model.text_encoders):
        kind = "text_encoder" if index == 0 else f"text_encoder_{index + 1}"
        tokenizer_file = f"{'tokenizer' if index == 0 else f'tokenizer_{index + 1}'}/tokenizer.json"
        (work / tokenizer_file).parent.mkdir()
        encoder.tokenizer.backend_tokenizer.save(str(work / tokenizer_file))
        tokenizer = encoder.tokenizer
        pipeline["text_encoders"].append({
            "graph": kind, "tokenizer": tokenizer_file, "max_length": model.text_len,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            # SD-1.x/2.x condition on the last layer (after the final norm), SDXL on the penultimate.
            "prompt_output": "penultimate_hidden_state" if model.family == "sdxl" else "last_hidden_state"})
        io = text_encoder_io(kind, encoder.model)
        graph = TextEncoderGraph(encoder.model, io)

        def tokens(io, dims, seed, tokenizer=tokenizer):
            return make_token_inputs(io, dims, seed, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)

        progress(f"exporting {kind} graph")
        # Its weights as external data in a file of its own, where run-time LoRA finds the base values.
        written, record = share_weights(work, {kind: _export_onnx(graph, io, tokens(io, dict(opt, batch=1), 0), work,
                                                                  config.opset)}, f"{kind}_weights.bin")
        files += written
        text_weights[kind] = record
        if report is not None:
            _compare(graph, make_session(work / f"{kind}.onnx"), text_dims, tokens, report, config.tolerance, progress)
        ios[kind] = io

    io = vae_decoder_io(model.vae, model.vae_scale_factor)
    graph = VaeDecoderGraph(model.vae, io)
    progress("exporting vae_decoder graph")
    trace = dict(opt, batch=1, latent_height=opt["latent_height"] + 1)
    files += _export_onnx(graph, io, make_inputs(io, trace, 0), work, config.opset)
    wide = dict(opt, batch=2, latent_width=opt["latent_width"] + 2)
    if report is not None:
        _compare(graph, make_session(work / "vae_decoder.onnx"), [dict(opt, batch=1), wide],
                 lambda io, dims, seed: make_inputs(io, dims, seed), report, config.tolerance, progress)
    ios["vae_decoder"] = io

    # The VAE encoder, for image to image: small (SD's is 34M parameters, 4% of the pipeline), so always.
    io = vae_encoder_io(model.vae, model.vae_scale_factor)
    graph = VaeEncoderGraph(model.vae, io)
    progress("exporting vae_encoder graph")
    files += _export_onnx(graph, io, make_inputs(io, trace, 0), work, config.opset)
    if report is not None:
        _compare(graph, make_session(work / "vae_encoder.onnx"), [dict(opt, batch=1), wide],
                 lambda io, dims, seed: make_inputs(io, dims, seed), report, config.tolerance, progress)
    ios["vae_encoder"] = io
    files += [encoder["tokenizer"] for encoder in pipeline["text_encoders"]]
    return pipeline, ios, files, text_weights


def _producer() -> dict[str, str]:
    import diffusers
    import onnx

    from cair_export import __version__
    return {"cair-export": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "onnx": onnx.__version__}


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def export_model(model: LoadedModel, out_dir: str | Path, config: ExportConfig = ExportConfig(),
                 overwrite: bool = False, progress: Callable[[str], None] = print,
                 release_unet: bool = False) -> Manifest:
    """Export ``model`` to ``out_dir``: planning.onnx, fidelity.onnx, manifest.json.

    ``overwrite`` replaces a complete engine folder there; the old one is removed only once the
    new one is in place. On any error or interruption the partial folder is removed.
    ``release_unet`` frees the torch UNet's weights once the graphs are traced and the torch
    outputs for validation computed (the model cannot compute afterwards): the peak memory is then
    one copy of the UNet plus activations, not two (``cair-export export`` does this).
    """
    out_dir = Path(out_dir)
    height, width = check_export_config(model, config)
    check_output_dir(out_dir, overwrite, model.folder)
    with export_lock(out_dir):
        _remove_stale_folders(out_dir)
        check_output_dir(out_dir, overwrite, model.folder)  # again, now that no other export can change it
        existed = out_dir.is_dir()
        work = None
        try:
            work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))
            work.chmod(0o755)  # mkdtemp makes it private; the engine folder is an ordinary one
            manifest = _export_into(model, work, config, height, width, progress, release_unet)
            _move_into_place(work, out_dir, overwrite, existed)
        except BaseException as error:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
            if isinstance(error, OSError) and error.errno in _DISK_FULL:
                raise InvalidInputError(f"no space left to write the export to {out_dir} ({error.strerror}); "
                                        "the unfinished export was removed; free some space or choose another "
                                        "folder") from None
            raise
    progress(f"wrote {out_dir}")
    return manifest


def _move_into_place(work: Path, target: Path, overwrite: bool, existed: bool) -> None:
    """Rename the finished folder to ``target``; what is there is replaced only as ``check_output_dir`` allows.

    A folder that appeared during the export is left alone unless ``overwrite`` says otherwise. An
    old folder is moved aside and removed only after the new one is in; a link to a folder is
    replaced (the link removed, the folder it pointed to left untouched).
    """
    appeared = InvalidInputError(f"output folder {target} appeared while exporting and was left as it is; "
                                 "the new export was discarded; remove it or pass --overwrite, and export again")
    if not os.path.lexists(target):
        try:
            rename_noreplace(work, target)
        except FileExistsError:
            raise appeared from None
        return
    if not existed and not overwrite:
        raise appeared
    check_output_dir(target, overwrite)  # what is there now may still be replaced
    old = target.with_name(work.name.replace(".partial-", ".old-", 1))
    rename_noreplace(target, old)
    try:
        rename_noreplace(work, target)
    except BaseException:
        with contextlib.suppress(OSError):
            rename_noreplace(old, target)  # put the old one back
        raise
    if old.is_symlink():  # the target was a link to a folder: the link goes, the folder it named stays as it is
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def _release_unet(model: LoadedModel, progress: Callable[[str], None]) -> None:
    """Free the torch UNet's weights (the model is unusable for computing afterwards): the graphs are
    traced and the torch outputs kept, so onnxruntime's checks can have the memory."""
    resident = _resident_gb()
    model.unet.to("meta")
    _free_memory()
    progress(f"released the torch UNet ({resident:.1f} -> {_resident_gb():.1f} GB resident)")


def _free_memory() -> None:
    """Collect garbage and hand the freed heap pages back to the system now (glibc keeps them otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _resident_gb() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def _lower_unet_graphs(work: Path, config: ExportConfig, ios: dict[str, GraphIO], shapes: list[dict[str, int]],
                       expected: dict | None, report: ValidationReport | None, files: list[str],
                       progress: Callable[[str], None]) -> tuple[list[str], dict[str, Any]]:
    """Rewrite the fp32 UNet graphs in ``config.dtype``, share their weights again, and check them against
    the fp32 torch outputs at the dtype's tolerance (into ``report``); ``precision.json`` records the
    conversion and that check."""
    from cair_export.core.precision import DTYPES, TOLERANCES, lower_exported_graphs

    lowered, lowering = lower_exported_graphs(ios, work, config.dtype, progress)
    (work / SHARED_WEIGHTS).unlink()  # the fp32 weights: the lowered graphs hold their own now
    files, weights = _share_unet_weights(work, [f for f in files if not f.startswith(UNET_FILES)] + lowered)
    if report is not None:
        name, tolerance = DTYPES[config.dtype], TOLERANCES[config.dtype]
        checks = ValidationReport()
        executors = validate_graphs(ios, work, shapes, expected, tolerance, progress, checks, weights,
                                    label=f"{name} ", reference_fallback=config.dtype == "bf16")
        lowering["validation"] = {"dtype": name, "tolerance": tolerance, "checks": checks.checks,
                                  "executors": executors, "failures": checks.failures}
        report.checks += checks.checks
        if checks.failures:
            raise ValidationError(f"{name} graphs differ from the fp32 torch model beyond {tolerance:.0e}: "
                                  f"{'; '.join(checks.failures)}")
    (work / "precision.json").write_text(json.dumps(lowering, indent=2, default=str) + "\n")
    return files + ["precision.json"], weights


def _write_switch(work: Path, caches, branch, config: ExportConfig, progress: Callable[[str], None]
                  ) -> dict[str, Any] | None:
    """``unet.onnx``, planning and fidelity as one graph (core/switch.py); None where it cannot be built here."""
    if config.dtype != "fp32":
        # onnxruntime's CPU provider runs fp16 nodes in fp32 through casts it inserts and then prunes in
        # pairs; a branch boundary keeps an fp16 rounding the flat graph drops (tiny-sd21: planning's
        # noise_pred 8e-4 apart), so the bit-for-bit check cannot pass here (bf16 does not run at all).
        progress(f"no switch graph for {config.dtype} graphs (not checkable bit for bit on onnxruntime's CPU "
                 "provider); runtimes use the two graphs")
        return None
    progress("writing the switch graph (planning and fidelity in one graph, each weight once)")
    try:
        return write_switch_graph(work, caches, None if branch is None else branch.as_dict()["name"])
    except SwitchGraphError as error:
        progress(f"no switch graph: {error}; runtimes use the two graphs")
        return None


def _check_switch(work: Path, manifest: Manifest, ios: dict[str, GraphIO], dims: dict[str, int],
                  progress: Callable[[str], None]) -> Manifest:
    """The switch graph must compute planning's and fidelity's outputs bit for bit in onnxruntime, with
    the runtime's default settings (private weights, level ``all``, prepacking) and the placeholder
    inputs it feeds; otherwise it is dropped from the folder. One session at a time."""
    progress(f"checking the switch graph against planning and fidelity at {_dims_str(dims)}")

    def outputs(file: str, inputs: dict[str, np.ndarray], names) -> dict[str, np.ndarray]:
        session = make_session(work / file)
        named = run_session(session, inputs)
        del session
        _free_memory()
        return {name: named[name] for name in names}

    switch = manifest.switch
    planning_in = make_inputs(ios["planning"], dims, 100)
    planning_names = [spec.name for spec in ios["planning"].outputs]
    planned = outputs("planning.onnx", planning_in, planning_names)
    fidelity_in = _handoff_inputs(ios["fidelity"], dims, planned)
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


def _lora_targets(model: LoadedModel, unet_digests: dict | None, work: Path, weights: dict[str, Any],
                  text_weights: dict[str, Any], caches, shallow_paths: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Per graph, where each LoRA-able model weight lies (run-time adapters); fidelity has no attn2, and
    shallow only the modules outside the branch (``shallow_paths``). Empty for fp16/bf16 exports
    (``unet_digests`` None): run-time adapters need fp32 weights."""
    from cair_export.core.lora import weight_digests, weight_targets

    if unet_digests is None:
        return {}
    cached = [cache.module for cache in caches]
    below_branch = [weight.removesuffix(".weight") for weight in unet_digests
                    if weight.removesuffix(".weight") not in shallow_paths]
    targets = {kind: weight_targets(unet_digests, work, weights["graphs"][kind], weights["file"], "unet",
                                    skip={"planning": (), "fidelity": cached, "shallow": cached + below_branch}[kind])
               for kind in ("planning", "fidelity", "shallow") if kind in weights["graphs"]}
    for index, encoder in enumerate(model.text_encoders):
        kind = "text_encoder" if index == 0 else f"text_encoder_{index + 1}"
        targets[kind] = weight_targets(weight_digests(encoder.model), work, text_weights[kind]["graphs"][kind],
                                       text_weights[kind]["file"], kind)
    return targets


def _export_into(model: LoadedModel, work: Path, config: ExportConfig, height: int, width: int,
                 progress: Callable[[str], None], release_unet: bool = False) -> Manifest:
    fused = ()
    if config.loras:
        from cair_export.core.lora import fuse_loras

        progress(f"fusing {len(config.loras)} LoRA adapter(s)")
        fused = fuse_loras(model, config.loras)
    unet = model.unet.eval()
    up_factor = 2 ** (len(unet.config.block_out_channels) - 1)
    dims = graph_dims(model, height, width, config.max_batch)
    shapes = _validation_dims(dims, up_factor)
    files: list[str] = []
    report = ValidationReport() if config.validate else None
    expected = None
    branch = None if config.deep_branch is None else deep_branch(unet, config.deep_branch)
    with CrossAttentionCache(unet, config.fidelity_guidance) as cache:
        caches = cache_specs(cache.sites)
        ios = graph_specs(model, caches, config.fidelity_guidance, branch)
        graphs = {kind: CairGraph(unet, cache, io, branch) for kind, io in ios.items()}
        trace = _trace_dims(dims, up_factor)
        for kind, graph in graphs.items():
            progress(f"exporting {kind} graph (trace at {_dims_str(trace)}, opset {config.opset})")
            files += _export_onnx(graph, graph.io, make_inputs(graph.io, trace, seed=0), work, config.opset,
                                  keep_raw=True)
        if report is not None:
            expected = torch_outputs(graphs, shapes, progress)
    unet_ios = dict(ios)
    del graphs, cache
    unet_digests, shallow_paths = None, frozenset()
    if config.dtype == "fp32":
        from cair_export.core.lora import weight_digests

        unet_digests = weight_digests(unet)  # the run-time LoRA map needs the weights; taken before release
        if branch is not None:
            from cair_export.core.deep_feature import shallow_module_paths

            shallow_paths = shallow_module_paths(unet, branch)
    if release_unet:
        _release_unet(model, progress)
    files, weights = _share_unet_weights(work, files)  # before validation, which then maps them once
    if config.dtype != "fp32":  # the fp32 graphs are an intermediate: validated as shipped, after lowering
        files, weights = _lower_unet_graphs(work, config, unet_ios, shapes, expected, report, files, progress)
    elif report is not None:
        validate_graphs(unet_ios, work, shapes, expected, config.tolerance, progress, report, weights)
    switch = _write_switch(work, caches, branch, config, progress)
    if switch is not None:
        files.append(switch["file"])
    pipeline, text_weights = None, {}
    if model.has_pipeline:
        pipeline, pipeline_ios, pipeline_files, text_weights = _export_pipeline_parts(model, work, dims, config,
                                                                                      report, progress)
        ios.update(pipeline_ios)
        files += pipeline_files  # graphs with their external data, if any, and the tokenizers
    if report is not None:
        if report.failures:
            raise ValidationError(f"exported graphs differ from the torch model: {'; '.join(report.failures)}")
        for kind in dict.fromkeys(check["graph"] for check in report.checks):
            max_abs, relative, tolerance = report.worst(kind)
            progress(f"  {kind:15s} max abs error {max_abs:.2e}, relative {relative:.2e} (tolerance {tolerance:.0e})")
        (work / "validation.json").write_text(json.dumps(report.checks, indent=2) + "\n")
        files.append("validation.json")

    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        producer=_producer(),
        model={"name": model.name, "source": model.source, "family": model.family,
               "dtype": {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[config.dtype],
               "vae_scale_factor": model.vae_scale_factor, "cache_step_hint": config.cache_step_hint,
               "source_sha256": model.source_sha256,
               "unet_config": json.loads(json.dumps(dict(unet.config), default=str))},
        scheduler_config=model.scheduler_config,
        fidelity_guidance=config.fidelity_guidance,
        dims=dims,
        graphs={kind: GraphSpec(kind, f"{kind}.onnx", io.inputs, io.outputs) for kind, io in ios.items()},
        caches=caches,
        files=tuple(record_file(work, name) for name in files),
        pipeline=pipeline,
        weights=weights,
        lora={"fused": list(fused), "targets": _lora_targets(model, unet_digests, work, weights, text_weights, caches,
                                                               shallow_paths)},
        deep_branch=None if branch is None else branch.as_dict(),
        switch=switch,
    )
    if switch is not None:  # at the trace size, the smallest: which kernels run does not depend on the size
        manifest = _check_switch(work, manifest, unet_ios, trace, progress)
    (work / MANIFEST_NAME).write_text(manifest.to_json())
    for path in work.rglob("*"):  # some writers create files private (0600); engine files are ordinary
        path.chmod(0o755 if path.is_dir() else 0o644)
    stamp_verified(work, manifest)  # just hashed: the runtime's first load need not hash again
    return manifest
