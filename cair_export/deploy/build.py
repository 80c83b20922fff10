"""``cair-export build``: TensorRT engines or AOTInductor packages for an exported engine folder.

TensorRT: polygraphy parses each ONNX graph into a strongly typed network (the precision is the
ONNX's own: export with ``--dtype fp16`` for fp16 engines), builds it with one optimisation
profile per engine derived from the manifest's dims, reuses a timing cache, and saves
``<kind>.plan``. AOTInductor: ``cair_export.deploy.aoti`` compiles ``<kind>.pt2``. Either way the
provenance goes into the manifest's ``engines`` list and the new files into ``files`` (sha256).

The folder is updated in one step as far as a reader can tell: files are built in a hidden
staging folder inside it, moved into place, and the manifest (written to a temporary file) is
replaced last with ``os.replace``; a build that stops half-way leaves files whose sha256 the old
manifest rejects, never a manifest that points at a missing or different file silently.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from cair_export.deploy.folder import install_engines
from cair_runtime.errors import InvalidInputError, MissingDependencyError
from cair_runtime.manifest import (
    MANIFEST_NAME,
    Dim,
    EngineRecord,
    GraphSpec,
    Manifest,
    eval_dim,
    load_manifest,
    size_problem,
)

BACKENDS = ("tensorrt", "aoti")
INSTALL_TENSORRT = "pip install 'cair-runtime[tensorrt]' polygraphy"


@dataclass(frozen=True)
class BuildConfig:
    """What to build; the CLI's flags map onto these fields one to one."""

    backend: str = "tensorrt"  # "tensorrt" | "aoti"
    min_batch: int | None = None  # prompts; None = the manifest's dim (the graphs see 2x in planning)
    opt_batch: int | None = None
    max_batch: int | None = None
    min_size: int | None = None  # pixels, square; None = the manifest's latent dims times the VAE factor
    opt_size: int | None = None
    max_size: int | None = None
    timing_cache: str | None = None  # TensorRT timing cache file, read if present and written back
    device: str = "cpu"  # AOTInductor: "cpu" or "cuda"
    dtype: str = "fp32"  # AOTInductor compute precision: fp32 | fp16 | bf16 (TensorRT takes the ONNX's)


# --- profiles: pure functions of the manifest ----------------------------------------------------


def profile_dims(manifest: Manifest, config: BuildConfig) -> dict[str, Dim]:
    """The dims' min/opt/max for the build: the manifest's, narrowed by the flags; problems reported together."""
    factor = manifest.vae_scale_factor
    by_name = {dim.name: dim for dim in manifest.dims}
    wanted: dict[str, dict[str, int | None]] = {
        "batch": {"min": config.min_batch, "opt": config.opt_batch, "max": config.max_batch},
    }
    problems = []
    for bound in ("min", "opt", "max"):
        size = getattr(config, f"{bound}_size")
        problem = None if size is None else size_problem(f"--{bound}-size", size, factor)
        if problem:
            problems.append(problem)
            size = None
        for name in ("latent_height", "latent_width"):
            wanted.setdefault(name, {})[bound] = None if size is None else size // factor
    dims = {}
    for dim in manifest.dims:
        values = {bound: getattr(dim, bound) for bound in ("min", "opt", "max")}
        for bound, value in wanted.get(dim.name, {}).items():
            if value is not None:
                values[bound] = value
        scale = factor if dim.name.startswith("latent_") else 1
        if not dim.min <= values["min"] <= values["opt"] <= values["max"] <= dim.max:
            problems.append(f"{dim.name} profile {values['min'] * scale}/{values['opt'] * scale}/{values['max'] * scale} "
                            f"is not ordered min <= opt <= max within the export's range "
                            f"{dim.min * scale}..{dim.max * scale}")
        dims[dim.name] = Dim(dim.name, values["min"], values["opt"], values["max"])
    missing = [name for name in ("batch", "latent_height", "latent_width") if name not in by_name]
    if missing:
        problems.append(f"the manifest declares no {', '.join(missing)} dim")
    if problems:
        raise InvalidInputError("cannot build this profile: " + "; ".join(problems) +
                                "; re-export with a wider range (--height/--width/--max-batch) or narrow the flags")
    return dims


def tensor_profiles(graph: GraphSpec, dims: Mapping[str, Dim]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Per graph input, its (min, opt, max) shape: the manifest's shape expressions at each bound."""
    at = {bound: {name: getattr(dim, bound) for name, dim in dims.items()} for bound in ("min", "opt", "max")}
    return {spec.name: tuple(tuple(eval_dim(entry, at[bound]) for entry in spec.shape) for bound in ("min", "opt", "max"))
            for spec in graph.inputs}


# --- TensorRT -------------------------------------------------------------------------------------


def _precision(manifest: Manifest) -> str:
    return str(manifest.model.get("dtype", "float32"))


def build_tensorrt_engines(folder: Path, manifest: Manifest, config: BuildConfig,
                           progress: Callable[[str], None]) -> tuple[dict[str, Path], list[EngineRecord]]:
    """Build ``<kind>.plan`` per graph with polygraphy into a staging folder; return files and records."""
    from cair_runtime.backends.tensorrt import device_info, import_cudart, import_tensorrt

    trt = import_tensorrt()
    import_cudart()
    try:
        from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine
    except ImportError:
        raise MissingDependencyError(f"building TensorRT engines needs polygraphy; install it with `{INSTALL_TENSORRT}`") from None
    device = device_info()  # no GPU: MissingDependencyError
    dims = profile_dims(manifest, config)
    staging = folder / f".build-tensorrt-{os.getpid()}"
    staging.mkdir(exist_ok=True)
    files, records = {}, []
    try:
        for kind, graph in manifest.unet_graphs.items():
            shapes = tensor_profiles(graph, dims)
            profile = Profile()
            for name, (low, opt, high) in shapes.items():
                profile.add(name, min=low, opt=opt, max=high)
            progress(f"building {kind} engine with TensorRT {trt.__version__} on {device.name} "
                     f"(sm {device.compute_capability}, strongly typed, {_precision(manifest)}); minutes")
            started = time.perf_counter()
            network = network_from_onnx_path(str(folder / graph.file), strongly_typed=True)
            create = CreateConfig(profiles=[profile], load_timing_cache=config.timing_cache)
            engine = engine_from_network(network, config=create, save_timing_cache=config.timing_cache)
            path = staging / f"{kind}.plan"
            save_engine(engine, path=str(path))
            progress(f"  {kind}.plan: {path.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - started:.0f} s")
            files[kind] = path
            records.append(EngineRecord(kind, "tensorrt", path.name, {
                "tensorrt": trt.__version__, "gpu": device.name, "compute_capability": device.compute_capability,
                "precision": _precision(manifest), "strongly_typed": True, "source": graph.file,
                "profile": {name: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for name, s in shapes.items()},
                "dims": {name: [d.min, d.opt, d.max] for name, d in dims.items()},
            }))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return files, records


# --- AOTInductor ----------------------------------------------------------------------------------


def build_aoti_packages(folder: Path, manifest: Manifest, config: BuildConfig,
                        progress: Callable[[str], None]) -> tuple[dict[str, Path], list[EngineRecord]]:
    """Compile ``<kind>.pt2`` per graph without embedded weights, plus the one weights file (staged
    under ``"weights"``); the model is reloaded from the manifest's identity."""
    from cair_export.deploy.aoti import compile_aoti_packages
    from cair_export.core.models.loading import load_exported_model

    profile = profile_dims(manifest, config)
    if profile != {dim.name: dim for dim in manifest.dims}:
        manifest = dataclasses.replace(manifest, dims=tuple(profile.values()))  # the narrowed ranges
    model = load_exported_model(manifest.model)
    return compile_aoti_packages(model, folder, manifest, device=config.device, dtype=config.dtype, progress=progress)


def build_engines(engine_dir: str | Path, config: BuildConfig, progress: Callable[[str], None] = print) -> Manifest:
    """Build ``config.backend``'s engines for an exported folder and record them in its manifest."""
    if config.backend not in BACKENDS:
        raise InvalidInputError(f"backend {config.backend!r} is unknown; expected one of {', '.join(BACKENDS)}")
    folder = Path(engine_dir)
    if config.backend == "tensorrt":  # dependencies first: fail in a second, not after loading anything
        from cair_runtime.backends.tensorrt import import_cudart, import_tensorrt

        import_tensorrt()
        import_cudart()
    manifest = load_manifest(folder)
    if config.backend == "aoti" and (manifest.controlnets or manifest.ip_adapter):
        raise InvalidInputError(f"{folder} holds ControlNets or an IP-Adapter, which AOTInductor packages do not "
                                "take yet: run it with onnxruntime, openvino or tensorrt")
    if manifest.transformer and config.backend == "tensorrt":
        raise InvalidInputError(f"{folder} holds a diffusion transformer, whose TensorRT builds are not tested yet: "
                                "build it for aoti, or run it with onnxruntime or openvino")
    build = build_tensorrt_engines if config.backend == "tensorrt" else build_aoti_packages
    staged: dict[str, Path] = {}
    try:
        staged, records = build(folder, manifest, config, progress)
        updated = install_engines(folder, load_manifest(folder, verify="size"), staged, records)
    finally:
        for parent in {path.parent for path in staged.values()}:
            shutil.rmtree(parent, ignore_errors=True)
    progress(f"recorded {len(records)} {config.backend} engine(s) in {folder / MANIFEST_NAME}")
    return updated
