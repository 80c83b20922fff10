"""int8 UNet graphs for the openvino backend: NNCF post-training quantization, calibrated on the folder's own runs.

The calibration inputs are what the planning and fidelity graphs see in real generations through
this runtime (onnxruntime fp32, the folder's own schedule): a recording context stands between the
denoising loop and the backend and keeps each evaluation's inputs by name (the latents, the
timestep, the text embeddings, and at the switch the caches planning wrote).

Modes, after Optimum-Intel's hybrid quantization of Stable Diffusion UNets:

- ``weights``: every MatMul and Convolution weight int8 (asymmetric, per output channel), activations
  fp32; no calibration data needed.
- ``hybrid``: those int8 weights, plus int8 activations in the MatMuls that have no weight (the
  attention score and value products), calibrated with NNCF's post-training quantization.

The shallow graph, when the folder has one, stays fp32. The int8 graphs are OpenVINO IR (``.xml``
and ``.bin``) written into the folder and recorded as ``openvino`` engines with their provenance
(OpenVINO and NNCF versions, mode, calibration count and schedule); ``cair-run --backend openvino
--precision int8`` runs them.
"""

from __future__ import annotations

import importlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from cair_export.deploy.folder import install_engines
from cair_runtime.errors import InvalidInputError, MissingDependencyError
from cair_runtime.manifest import EngineRecord, Manifest, load_manifest

MODES = ("weights", "hybrid")
QUANTIZED = ("planning", "fidelity")  # shallow stays fp32


@dataclass(frozen=True)
class QuantizeConfig:
    mode: str = "hybrid"  # weights: int8 weights only; hybrid: plus int8 activations in weightless MatMuls
    generations: int = 4  # calibration generations (random text embeddings, seeds 0..)
    steps: int = 25  # denoising steps of each calibration generation
    cache_step: int | None = None  # n of the calibration runs (None: the folder's default)
    subset_size: int = 64  # calibration samples per graph NNCF draws from what was recorded
    threads: int = 0  # intra-op threads of the calibration runs (0: the library default)


def _import(name: str, package: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingDependencyError(f"cair-export quantize needs {package}; install it with "
                                     "`pip install 'cair-export[quantize]'`") from None


class _RecordingContext:
    """A backend context that keeps every evaluation's inputs by name, then runs it unchanged."""

    def __init__(self, context: Any, samples: dict[str, list[dict[str, np.ndarray]]]):
        self._context, self._samples = context, samples
        self._fixed: dict[str, dict[str, np.ndarray]] = {kind: {} for kind in QUANTIZED}
        self._caches: dict[str, np.ndarray] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def set_inputs(self, kind: str, arrays: Mapping[str, np.ndarray]) -> None:
        self._fixed.setdefault(kind, {}).update({name: np.array(a) for name, a in arrays.items()})
        self._context.set_inputs(kind, arrays)

    def switch_to_fidelity(self) -> None:
        self._context.switch_to_fidelity()
        self._caches = self._context.read_caches()

    def merge_halves(self) -> None:
        self._context.merge_halves()
        self._caches = {name: (value[: len(value) // 2] + value[len(value) // 2:]) / np.float32(2)
                        for name, value in self._caches.items()}

    def run(self, kind: str, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        if kind in QUANTIZED:
            feeds = {**self._fixed.get(kind, {}), "sample": np.array(sample), "timestep": np.array(timestep)}
            if kind == "fidelity":
                feeds.update(self._caches)
            self._samples[kind].append(feeds)
        return self._context.run(kind, sample, timestep)


def record_calibration(folder: Path, config: QuantizeConfig, progress: Callable[[str], None] = print
                       ) -> dict[str, list[dict[str, np.ndarray]]]:
    """Planning and fidelity inputs of ``config.generations`` generations through the runtime (onnxruntime fp32)."""
    from cair_runtime.pipeline import CairEngine

    samples: dict[str, list[dict[str, np.ndarray]]] = {kind: [] for kind in QUANTIZED}
    with CairEngine(folder, threads=config.threads, max_concurrency=1) as engine:
        create = engine.backend.new_context
        # The pool lends recording contexts (created lazily: none exists before the first call).
        engine.pool._create = lambda: _RecordingContext(create(), samples)
        text_len = engine.manifest.dim("text_len").opt
        for seed in range(config.generations):
            rng = np.random.default_rng(seed)
            embeds = {name: rng.standard_normal((1, text_len, engine.context_dim), dtype=np.float32)
                      for name in ("prompt_embeds", "negative_prompt_embeds")}
            if engine.pooled_dim:
                embeds |= {name: rng.standard_normal((1, engine.pooled_dim), dtype=np.float32)
                           for name in ("text_embeds", "negative_text_embeds")}
            engine.denoise(**embeds, num_inference_steps=config.steps, cache_step=config.cache_step, seed=seed)
            progress(f"calibration generation {seed + 1}/{config.generations}: "
                     f"{len(samples['planning'])} planning, {len(samples['fidelity'])} fidelity inputs")
    return samples


def _weightless_matmuls(model: Any) -> list[str]:
    """MatMuls whose both inputs are activations (attention scores and values), by node name."""
    names = []
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        sources = [op.input_value(i).get_node() for i in range(2)]
        if not any(source.get_type_name() in ("Constant", "Convert") for source in sources):
            names.append(op.get_friendly_name())
    return names


def quantize_graph(path: Path, samples: list[dict[str, np.ndarray]], config: QuantizeConfig) -> Any:
    """One ONNX graph -> an int8 OpenVINO model (``config.mode``)."""
    ov = _import("openvino", "openvino")
    nncf = _import("nncf", "nncf")
    model = ov.Core().read_model(str(path))
    weightless = _weightless_matmuls(model)
    compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    if config.mode == "weights":
        return compressed
    names = {input_.get_any_name() for input_ in model.inputs}
    dataset = nncf.Dataset([{name: value for name, value in sample.items() if name in names} for sample in samples])
    everything_else = [op.get_friendly_name() for op in compressed.get_ops()
                       if op.get_type_name() in ("MatMul", "Convolution") and op.get_friendly_name() not in weightless]
    return nncf.quantize(compressed, dataset, model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=min(config.subset_size, len(samples)),
                         ignored_scope=nncf.IgnoredScope(names=everything_else, validate=False),
                         advanced_parameters=nncf.AdvancedQuantizationParameters(smooth_quant_alpha=-1))


def quantize_folder(folder: str | Path, config: QuantizeConfig = QuantizeConfig(),
                    progress: Callable[[str], None] = print) -> Manifest:
    """Write int8 planning and fidelity graphs into ``folder`` and record them as ``openvino`` engines."""
    if config.mode not in MODES:
        raise InvalidInputError(f"quantization mode {config.mode!r} is unknown; expected one of {', '.join(MODES)}")
    for name in ("generations", "steps", "subset_size"):
        if getattr(config, name) < 1:
            raise InvalidInputError(f"{name} {getattr(config, name)} must be at least 1")
    ov = _import("openvino", "openvino")
    nncf = _import("nncf", "nncf")
    folder = Path(folder)
    manifest = load_manifest(folder)
    samples = (record_calibration(folder, config, progress) if config.mode == "hybrid"
               else {kind: [] for kind in QUANTIZED})
    records, staged = [], {}
    with tempfile.TemporaryDirectory(dir=folder, prefix=".quantize-") as stage:
        for kind in QUANTIZED:
            progress(f"quantizing {kind} ({config.mode}, {len(samples[kind])} calibration inputs)")
            model = quantize_graph(folder / manifest.graphs[kind].file, samples[kind], config)
            xml = Path(stage) / f"{kind}.int8.xml"
            ov.save_model(model, str(xml), compress_to_fp16=False)
            staged[f"{kind}.xml"], staged[f"{kind}.bin"] = xml, xml.with_suffix(".bin")
            records.append(EngineRecord(graph=kind, backend="openvino", file=xml.name, properties={
                "precision": "int8", "mode": config.mode, "openvino": ov.get_version().split("-")[0],
                "nncf": nncf.__version__, "source": manifest.graphs[kind].file,
                "calibration": {"generations": config.generations, "steps": config.steps,
                                "cache_step": config.cache_step, "samples": len(samples[kind]),
                                "subset_size": min(config.subset_size, len(samples[kind]))}
                if config.mode == "hybrid" else None}))
        return install_engines(folder, manifest, staged, records)
