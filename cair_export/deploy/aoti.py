"""Compile the UNet graphs ahead of time with AOTInductor (``.pt2`` packages): planning, fidelity and,
when the folder has one, DeepCache's shallow graph.

For GPUs without TensorRT: the same two ``CairGraph`` modules the ONNX export traces, exported
with ``torch.export`` (batch and latent size dynamic, ranges from the manifest's dims) and
compiled by ``torch._inductor.aoti_compile_and_package``, as in PyTorch's AOTInductor tutorial.
``cair_runtime.backends.aoti`` loads them with ``torch._inductor.aoti_load_package``.

Graph IO matches the manifest (float32 latents, timestep and conditions; ``noise_pred`` float32),
whatever the compute dtype; the caches, which never leave the device, are in the compute dtype.
Latent sizes must be multiples of the UNet's upsampling factor: diffusers branches in Python on
``size % factor`` (``forward_upsample_size``), which ``torch.export`` cannot keep symbolic, so the
packages are exported for the multiples only and the runtime refuses other sizes with a message.

Weights once (fidelity's weights are nearly all planning's: two whole packages would hold the UNet
twice): the packages are compiled without their weights
(``aot_inductor.package_constants_in_so=False``); the UNet's weights are written once beside them,
``aoti_weights.safetensors`` keyed by the constants' FQNs (fidelity's are a subset of planning's),
and the runtime gives the same device tensors to both packages (``load_constants(...,
user_managed=True)``). See docs/weights_once.md.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from cair_export.core.deep_feature import deep_branch
from cair_export.core.graphs import CairGraph, GraphIO, make_inputs
from cair_export.core.models import LoadedModel
from cair_export.core.reference import CrossAttentionCache
from cair_runtime.errors import InvalidInputError, ManifestError
from cair_runtime.manifest import EngineRecord, Manifest

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Unoptimised wrapper, scalar kernels, no line tables: about half the C++ compile time on a CPU.
QUICK_CPU_COMPILE = {"aot_inductor.compile_wrapper_opt_level": "O0", "cpp.vec_isa_ok": False,
                     "aot_inductor.enable_line_tables": False}
# float IO cast to the compute dtype (a transformer's text mask and position embedding too)
_CONDITIONS = ("sample", "encoder_hidden_states", "text_embeds", "time_ids", "encoder_attention_mask", "pos_embed")
# The UNet's weights, once for both packages; each EngineRecord names it under "weights".
WEIGHTS_FILE = "aoti_weights.safetensors"
# No weights inside the .so: the packages take WEIGHTS_FILE's tensors when loaded ("Experimental" in torch 2.13).
NO_EMBEDDED_WEIGHTS = {"aot_inductor.package_constants_in_so": False}

# The graphs AOTInductor packages: its backend wires the deep feature from fidelity to shallow steps,
# not from planning to guided shallow ones (schedules with a planning interval run on onnxruntime).
AOTI_KINDS = ("planning", "fidelity", "shallow")


class PrecisionGraph(torch.nn.Module):
    """A ``CairGraph`` with float32 IO around a ``dtype`` UNet; caches stay in ``dtype``."""

    def __init__(self, graph: CairGraph, dtype: torch.dtype):
        super().__init__()
        self.cair, self.dtype = graph, dtype  # not `graph`: fx.GraphModule reserves that name
        self.num_caches = graph.num_caches

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cast = [x.to(self.dtype) if name in _CONDITIONS else x for name, x in zip(self.cair.input_names, inputs)]
        # The timestep stays float32: diffusers computes the sinusoidal embedding in fp32 anyway.
        outputs = self.cair(*cast)
        return (outputs[0].float(), *outputs[1:])  # noise_pred back to float32 for the host scheduler


def upsample_factor(manifest: Manifest) -> int:
    """Latent sizes the compiled graphs take are multiples of this: a UNet's ``2 ** (levels - 1)``, a
    transformer's patch size (sizes are whole patches anyway)."""
    if manifest.transformer:
        return manifest.patch_size
    return 2 ** (len(manifest.model["unet_config"]["block_out_channels"]) - 1)


def dynamic_shapes(io: GraphIO, manifest: Manifest, factor: int) -> tuple[list[dict[int, Any]], dict[str, int]]:
    """``torch.export`` dynamic shapes per input, from the manifest's dims, and example dims to trace at.

    ``batch`` is a ``Dim`` over its range (``2*batch`` a derived dim); latent sizes are
    ``factor * Dim`` so diffusers' upsampling branch is decided once; cache token counts (a product
    of the latent dims) are left to ``Dim.AUTO``, which infers their relation to the latent dims.
    Fidelity and shallow graphs of a folder with per-half caches (``fidelity_guidance`` cfg) run
    guided at 2B up to the guidance stop and unguided at B after it: their ``2*batch`` is one free
    ``Dim`` over 1..2 * max batch, not a multiple of two.
    """
    from torch.export import Dim

    by_name = {dim.name: dim for dim in manifest.dims}
    batch = by_name["batch"]
    symbols: dict[str, Any] = {}
    example: dict[str, int] = {}
    if batch.max > batch.min:
        symbols["batch"] = Dim("batch", min=batch.min, max=batch.max)
    halves = io.kind != "planning" and manifest.fidelity_guidance == "cfg"
    if halves:  # 2B before the guidance stop, B after it
        symbols["2*batch"] = Dim("halves", min=batch.min, max=2 * batch.max)
    # Trace at batch 2 where allowed: torch.export specialises dims whose example size is 0 or 1.
    example["batch"] = min(max(2, batch.min), batch.max)
    for offset, name in enumerate(("latent_height", "latent_width")):
        dim = by_name[name]
        low, high = -(-dim.min // factor), dim.max // factor
        if high < max(low, 1):
            raise InvalidInputError(f"{name} range {dim.min}..{dim.max} holds no multiple of {factor}; "
                                    "re-export with a larger --height/--width")
        low = max(low, 1)
        # Distinct example sizes for height and width, so no accidental equality is assumed.
        example[name] = factor * min(max(low, 2 + offset), high)
        if high > low:
            symbols[name] = factor * Dim(f"{name}_blocks", min=low, max=high)
    example["text_len"] = by_name["text_len"].opt

    def entry(expr: int | str) -> Any:
        if isinstance(expr, int):
            return None  # static
        if expr in symbols:
            return symbols[expr]
        if expr.startswith("2*") and expr[2:] in symbols:
            return 2 * symbols[expr[2:]]
        if expr in example or (expr.startswith("2*") and expr[2:] in example):
            return None  # a dim with one value (min == max)
        return Dim.AUTO  # e.g. cache tokens: cdiv(latent_height,2)*cdiv(latent_width,2)

    return [{axis: entry(e) for axis, e in enumerate(spec.shape) if entry(e) is not None} for spec in io.inputs], example


def export_graph(graph: torch.nn.Module, io: GraphIO, manifest: Manifest, factor: int, device: str
                 ) -> tuple[torch.export.ExportedProgram, dict[str, int]]:
    """``torch.export`` one graph with dynamic shapes; returns the program and the example dims traced at.

    Cache inputs are traced in the graph's compute dtype (a ``PrecisionGraph``'s ``dtype``): planning
    returns them in that dtype and fidelity takes them as they are, on the device.
    """
    shapes, example = dynamic_shapes(io, manifest, factor)
    cache_dtype = getattr(graph, "dtype", torch.float32)
    # The caches and the deep feature never leave the device: they are in the compute dtype.
    cache_names = {cache.name for cache in manifest.caches} | (
        {manifest.deep_branch["name"]} if manifest.deep_branch else set())
    inputs = tuple(torch.from_numpy(array).to(device, cache_dtype if name in cache_names else None)
                   for name, array in make_inputs(io, example, seed=0).items())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # forward(*inputs): the varargs take one entry of per-input shapes.
        program = torch.export.export(graph, inputs, dynamic_shapes={"inputs": tuple(shapes)}, strict=False)
    return program, example


def compile_graph(graph: torch.nn.Module, io: GraphIO, manifest: Manifest, factor: int, device: str,
                  package: Path, inductor_configs: dict[str, Any] | None = None
                  ) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Export one graph (``export_graph``) and AOT-compile it to ``package`` (a ``.pt2`` file) without its weights.

    Returns the example dims traced at and the program's weights by FQN, the names the package's
    ``get_constant_fqns`` reports and takes in ``load_constants`` (``NO_EMBEDDED_WEIGHTS``).
    """
    program, example = export_graph(graph, io, manifest, factor, device)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch._inductor.aoti_compile_and_package(program, package_path=str(package),
                                                 inductor_configs={**(inductor_configs or {}), **NO_EMBEDDED_WEIGHTS})
    weights = {name: value for name, value in {**program.state_dict, **program.constants}.items()
               if isinstance(value, torch.Tensor)}
    return example, weights


def save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    """Write the packages' weights once, as safetensors (host copies, contiguous; the dtype they compute in)."""
    from safetensors.torch import save_file

    save_file({name: tensor.detach().to("cpu").contiguous() for name, tensor in weights.items()}, str(path))


def _name(dtype: str) -> str:
    return str(TORCH_DTYPES[dtype]).removeprefix("torch.")


def _device_properties(device: str) -> dict[str, Any]:
    if not device.startswith("cuda"):
        return {"device": "cpu"}
    index = torch.device(device).index or 0
    major, minor = torch.cuda.get_device_capability(index)
    return {"device": "cuda", "gpu": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}",
            "cuda": torch.version.cuda}


def compile_aoti_packages(model: LoadedModel, folder: Path, manifest: Manifest, device: str = "cpu",
                          dtype: str = "fp32", progress: Callable[[str], None] = print,
                          inductor_configs: dict[str, Any] | None = None) -> tuple[dict[str, Path], list[EngineRecord]]:
    """Compile planning and fidelity into staged ``<kind>.pt2`` files in a temporary folder inside ``folder``.

    Returns the staged files (kind -> path, and ``"weights"`` -> ``WEIGHTS_FILE``, the weights both
    packages take at load time; the caller moves them into place and updates the manifest, see
    ``cair_export.deploy.build``) and one ``EngineRecord`` per graph. ``inductor_configs``
    go to ``aoti_compile_and_package`` (``QUICK_CPU_COMPILE`` halves CPU compile time, for tests).
    """
    if dtype not in TORCH_DTYPES:
        raise InvalidInputError(f"AOTInductor precision {dtype!r} is unknown; expected one of {', '.join(TORCH_DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"device {device!r} requested but torch sees no CUDA GPU; use --device cpu")
    factor = upsample_factor(manifest)
    unet = model.unet.eval().to(device=device, dtype=TORCH_DTYPES[dtype])
    staging = Path(tempfile.mkdtemp(prefix=".aoti-", dir=folder))
    try:
        return _compile_into(unet, staging, manifest, factor, device, dtype, progress, inductor_configs)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _compile_into(unet: torch.nn.Module, staging: Path, manifest: Manifest, factor: int, device: str, dtype: str,
                  progress: Callable[[str], None], inductor_configs: dict[str, Any] | None
                  ) -> tuple[dict[str, Path], list[EngineRecord]]:
    files: dict[str, Path] = {}
    records = []
    weights: dict[str, torch.Tensor] = {}  # FQN -> tensor, the union of both programs' (fidelity's: a subset)
    branch = None if manifest.deep_branch is None else deep_branch(unet, manifest.deep_branch["branch"])
    with CrossAttentionCache(unet, manifest.fidelity_guidance) as cache:
        names = [site.name for site in cache.sites]
        if names != [spec.name for spec in manifest.caches]:
            raise ManifestError(f"the model's cross-attention modules ({len(names)}) do not match the manifest's "
                                f"caches ({len(manifest.caches)}); build from the model the folder was exported from")
        for kind, spec in manifest.schedule_graphs.items():
            if kind not in AOTI_KINDS:
                continue
            io = GraphIO(kind, spec.inputs, spec.outputs)  # the manifest's IO: the single description
            graph = PrecisionGraph(CairGraph(unet, cache, io, branch), TORCH_DTYPES[dtype])
            progress(f"compiling {kind} with AOTInductor on {device} ({dtype}); minutes on a CPU")
            started = time.perf_counter()
            package = staging / f"{kind}.pt2"
            example, graph_weights = compile_graph(graph, io, manifest, factor, device, package, inductor_configs)
            _merge_weights(weights, graph_weights, kind)
            files[kind] = package
            progress(f"  {kind}.pt2 in {time.perf_counter() - started:.0f} s")
            records.append(EngineRecord(kind, "aoti", f"{kind}.pt2", {
                "torch": torch.__version__, **_device_properties(device), "precision": _name(dtype),
                "cache_dtype": _name(dtype), "latent_multiple": factor, "weights": WEIGHTS_FILE,
                "profile": {dim.name: [dim.min, dim.opt, dim.max] for dim in manifest.dims},
                "example": example,
            }))
    files["weights"] = staging / WEIGHTS_FILE
    save_weights(weights, files["weights"])
    progress(f"  {WEIGHTS_FILE}: {files['weights'].stat().st_size / 1e6:.1f} MB, once for both packages")
    return files, records


def _merge_weights(weights: dict[str, torch.Tensor], graph_weights: dict[str, torch.Tensor], kind: str) -> None:
    """Add one program's weights to the shared set; a name both graphs use must hold the same values."""
    for name, tensor in graph_weights.items():
        known = weights.setdefault(name, tensor)
        if known is not tensor and not (known.shape == tensor.shape and torch.equal(known, tensor)):
            raise ManifestError(f"{kind}'s weight {name!r} differs from the other graph's under the same name; "
                                "the packages cannot share one weights file (a bug: please report it)")


def aoti_manifest(model: LoadedModel, height: int, width: int, max_batch: int = 1, static: bool = False,
                  fidelity_guidance: str = "none", deep_branch_id: int | None = None) -> Manifest:
    """The manifest of an AOTInductor-only engine folder (no ONNX): graphs are the ``.pt2`` packages.

    ``static`` pins every dim to its opt value (batch ``max_batch``): static shapes compile faster
    and run faster, for measuring one configuration (``scripts/gpu_measure.py``). ``deep_branch_id``
    adds DeepCache's shallow graph cut at that branch (deep intervals k > 1).
    """
    from cair_export.core.engine_manifest import model_record
    from cair_export.core.graphs import cache_specs, graph_dims, graph_specs
    from cair_runtime.manifest import SCHEMA_VERSION, Dim, GraphSpec

    dims = graph_dims(model, height, width, max_batch)
    if static:
        dims = tuple(Dim(d.name, v, v, v) for d, v in ((d, max_batch if d.name == "batch" else d.opt) for d in dims))
    with CrossAttentionCache(model.unet, fidelity_guidance) as cache:
        caches = cache_specs(cache.sites)
    branch = None if deep_branch_id is None else deep_branch(model.unet, deep_branch_id)
    ios = {kind: io for kind, io in graph_specs(model, caches, fidelity_guidance, branch).items() if kind in AOTI_KINDS}
    return Manifest(
        schema_version=SCHEMA_VERSION, producer={"torch": torch.__version__},
        model=model_record(model),
        scheduler_config=model.scheduler_config, fidelity_guidance=fidelity_guidance, dims=dims,
        graphs={kind: GraphSpec(kind, f"{kind}.pt2", io.inputs, io.outputs, format="aoti") for kind, io in ios.items()},
        caches=caches, files=(), deep_branch=None if branch is None else branch.as_dict())


def export_aoti_folder(model: LoadedModel, out_dir: str | Path, height: int, width: int, device: str = "cpu",
                       dtype: str = "fp32", max_batch: int = 1, static: bool = False,
                       progress: Callable[[str], None] = print,
                       inductor_configs: dict[str, Any] | None = None, fidelity_guidance: str = "none",
                       deep_branch_id: int | None = None) -> Manifest:
    """Compile an AOTInductor-only engine folder: ``planning.pt2``, ``fidelity.pt2`` (and ``shallow.pt2`` with
    a ``deep_branch_id``), their weights once, manifest."""
    from cair_export.deploy.folder import install_engines

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = aoti_manifest(model, height, width, max_batch, static, fidelity_guidance, deep_branch_id)
    files, records = compile_aoti_packages(model, folder, manifest, device, dtype, progress, inductor_configs)
    try:
        return install_engines(folder, manifest, files, records)
    finally:
        shutil.rmtree(next(iter(files.values())).parent, ignore_errors=True)
