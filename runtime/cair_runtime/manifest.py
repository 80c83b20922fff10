"""``manifest.json``: the whole contract between the exporter and the runtime.

The runtime owns the schema; the exporter writes manifests through ``Manifest.to_json`` here.
Shapes are lists whose entries are ints or expressions over the named dims, e.g.
``["2*batch", 4, "latent_height", "latent_width"]`` or
``["batch", "cdiv(latent_height,2)*cdiv(latent_width,2)", 64]``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import operator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cair_runtime.checks import is_finite_number, is_integer
from cair_runtime.errors import InvalidInputError, ManifestError, ShapeError
from cair_runtime.files import write_atomically
from cair_runtime.schedule import Schedule

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32")
GRAPH_KINDS = ("planning", "fidelity")  # required; text_encoder(_2) and the VAE's come with a pipeline
# DeepCache's cut, with the deep_branch section: the shallow step after n (caches in) and before it
# (guided, text in; planning then also emits the deep feature); older deep folders have only the first
OPTIONAL_UNET_GRAPH_KINDS = ("shallow", "shallow_planning")
DEEP_BRANCH_KEYS = ("name", "branch", "block", "layer", "up_block", "up_layer", "channels", "level")
# A diffusion transformer's cut: its middle blocks start..stop-1, whose residual is the deep feature.
BLOCK_RANGE_KEYS = ("name", "kind", "branch", "start", "stop", "channels", "level")
# vae_encoder (image to image) since 2026-11-30: older pipeline folders lack it and still load
PIPELINE_GRAPH_KINDS = ("text_encoder", "text_encoder_2", "vae_decoder", "vae_encoder", "image_encoder")
FIDELITY_GUIDANCE = ("none", "cfg")
PROMPT_OUTPUTS = ("last_hidden_state", "penultimate_hidden_state")
MAX_DIM_VALUE = 2**31 - 1  # any tensor dimension the manifest can describe
MAX_EXPRESSION_LENGTH = 120
DEFAULT_VAE_SCALE_FACTOR = 8  # Stable Diffusion's VAE (three 2x downsamplings), when a manifest does not say


def size_problem(label: str, pixels: int, factor: int, patch: int = 1) -> str | None:
    """Why ``pixels`` cannot be an image side, or None: not a positive multiple of the VAE's factor, times a
    diffusion transformer's ``patch`` size (its latent sides are whole patches)."""
    step = factor * patch
    if pixels <= 0 or pixels % step:
        why = "the VAE's factor" if patch == 1 else f"the VAE's factor {factor} times the transformer's patch size {patch}"
        return f"{label} {pixels} is not a positive multiple of {step} ({why})"
    return None


# --- shape expressions ---------------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def eval_dim(expr: int | str, dims: Mapping[str, int]) -> int:
    """Evaluate one shape entry (an int, or +, -, *, //, cdiv over dim names) at concrete dims."""
    if isinstance(expr, int):
        return expr

    def visit(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return visit(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in dims:
                raise ShapeError(f"shape entry {expr!r} names dim {node.id!r}, which is not given")
            return int(dims[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](visit(node.left), visit(node.right))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "cdiv" and len(node.args) == 2:
            return _cdiv(visit(node.args[0]), visit(node.args[1]))
        raise ManifestError(f"shape entry {expr!r} is not an expression the manifest allows")

    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise ManifestError(f"shape entry {expr!r} is not an expression the manifest allows") from None
    return visit(tree)


# --- the schema ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Dim:
    """A symbolic dimension with the range the graphs accept and the size they are tuned for."""

    name: str  # one vocabulary everywhere: batch, latent_height, latent_width, text_len
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""

    name: str
    dtype: str  # numpy dtype name, one of DTYPES
    shape: tuple[int | str, ...]  # ints or dim expressions

    def resolve(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(eval_dim(entry, dims) for entry in self.shape)


@dataclass(frozen=True)
class CacheSpec:
    """One cross-attention output that planning emits and fidelity consumes."""

    name: str  # tensor name in both graphs
    module: str  # diffusers module path of the attn2 module
    tokens: str  # dim expression: spatial positions at the module's level
    channels: int


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the engine folder, never outside it
    sha256: str
    size: int


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: its file(s) and ordered IO."""

    kind: str  # "planning" | "fidelity" | "shallow" | a pipeline graph
    file: str  # the model file, relative path; its external data (if any) is listed in `files`
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    format: str = "onnx"

    def input(self, name: str) -> TensorSpec:
        """The input named ``name`` (KeyError naming the graph when it has none)."""
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(f"the {self.kind} graph has no input {name!r}")


@dataclass(frozen=True)
class EngineRecord:
    """Provenance of a built engine (TensorRT, AOTInductor): who built it, for what."""

    graph: str  # the GraphSpec kind it was built from
    backend: str
    file: str
    properties: dict[str, Any] = field(default_factory=dict)  # version, GPU, compute capability, precision


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    producer: dict[str, str]  # package -> version of what wrote the folder
    model: dict[str, Any]  # name, source, family, dtype
    scheduler_config: dict[str, Any]  # the model's own scheduler, diffusers config format
    fidelity_guidance: str  # "none" (batch B, no CFG after step n) or "cfg"
    dims: tuple[Dim, ...]
    graphs: dict[str, GraphSpec]
    caches: tuple[CacheSpec, ...]
    files: tuple[FileRecord, ...]
    engines: tuple[EngineRecord, ...] = ()
    pipeline: dict[str, Any] | None = None  # text-to-image parts; None for a UNet-only export
    # The UNet graphs' weights stored once: {"file": ..., "graphs": {kind: {initializer: [offset,
    # length, dtype, shape]}}}; the graphs' ONNX external data points at the same bytes.
    weights: dict[str, Any] | None = None
    # Adapters: {"fused": [{"file", "sha256", "scale"}] (fused at export), "targets": {kind: {"model":
    # "unet" | "text_encoder" | "text_encoder_2", "file": weights file, "weights": {model weight:
    # [[initializer, layout, offset, dtype, shape], ...]}, "unmapped": [model weight, ...]}}}; see lora.py.
    lora: dict[str, Any] | None = None
    # Deep-feature caching (DeepCache's cut) when the folder has a shallow graph: {"name": the
    # tensor fidelity emits and shallow takes, "branch", "block", "layer", "up_block", "up_layer",
    # "channels", "level"}; None for folders without one (and every folder written before it).
    deep_branch: dict[str, Any] | None = None
    # The calibrated default schedule (``cair-export calibrate``): {"steps": T it was chosen at,
    # "cache_step": n, "guidance_stop": m, "deep_interval": k, "skip_mode", "rule", "evidence"};
    # runs take it for whatever they leave unset (``Schedule.defaults``). None: not calibrated.
    schedule: dict[str, Any] | None = None
    # Planning and fidelity as one graph (``unet.onnx``; cair_export/core/switch.py): {"file",
    # "condition": its boolean input (true: fidelity), "cache_inputs": {cache: input name},
    # "deep_feature": the output shallow steps take, or None}. Its initializers are planning's, so
    # one session holds each weight once. None: only the two graphs (folders written before it).
    switch: dict[str, Any] | None = None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (``model.vae_scale_factor``; older manifests: Stable Diffusion's 8)."""
        return int(self.model.get("vae_scale_factor", DEFAULT_VAE_SCALE_FACTOR))

    @property
    def transformer(self) -> bool:
        """A diffusion transformer's folder (PixArt, Sana), not a UNet's: sizes in whole patches, the text's mask read."""
        return self.model.get("denoiser", "UNet2DConditionModel") != "UNet2DConditionModel"

    @property
    def patch_size(self) -> int:
        """Latent pixels per side of a diffusion transformer's patch (1 for UNets): sizes are whole patches."""
        if not self.transformer:
            return 1
        return int(self.model.get("unet_config", {}).get("patch_size", 1))

    @property
    def unet_graphs(self) -> dict[str, GraphSpec]:
        """The planning and fidelity graphs, the ones every backend runs (the rest belong to the pipeline)."""
        return {kind: self.graphs[kind] for kind in GRAPH_KINDS}

    @property
    def schedule_graphs(self) -> dict[str, GraphSpec]:
        """The UNet graphs of the whole schedule: planning, fidelity and, when exported, shallow."""
        return {kind: self.graphs[kind] for kind in GRAPH_KINDS + OPTIONAL_UNET_GRAPH_KINDS if kind in self.graphs}

    def engine_records(self, backend: str, what: str, where: str = "") -> dict[str, EngineRecord]:
        """The built ``backend`` engines by graph kind; refuses a folder lacking one for a UNet graph."""
        records = {record.graph: record for record in self.engines if record.backend == backend}
        missing = [kind for kind in self.unet_graphs if kind not in records]
        if missing:
            raise ManifestError(f"the engine folder has no {what} for {', '.join(missing)}; "
                                f"build them with `cair-export build ENGINE_DIR --backend {backend}`{where}")
        return records

    @property
    def controlnets(self) -> int:
        """ControlNets fused into the UNet graphs (``cair-export export --controlnet``): one control image input each."""
        return sum(spec.name.startswith("control_image_") for spec in self.graphs["planning"].inputs)

    @property
    def ip_adapter(self) -> bool:
        """True for an export with an IP-Adapter (``cair-export export --ip-adapter``): planning takes an image prompt."""
        return any(spec.name == "ip_image_embeds" for spec in self.graphs["planning"].inputs)

    def dim(self, name: str) -> Dim:
        for dim in self.dims:
            if dim.name == name:
                return dim
        raise ManifestError(f"the manifest declares no dim {name!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        def tensors(items):
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in items)

        return cls(
            schema_version=data["schema_version"],
            producer=dict(data["producer"]),
            model=dict(data["model"]),
            scheduler_config=dict(data["scheduler_config"]),
            fidelity_guidance=data["fidelity_guidance"],
            dims=tuple(Dim(**d) for d in data["dims"]),
            graphs={
                kind: GraphSpec(g["kind"], g["file"], tensors(g["inputs"]), tensors(g["outputs"]), g.get("format", "onnx"))
                for kind, g in data["graphs"].items()
            },
            caches=tuple(CacheSpec(**c) for c in data["caches"]),
            files=tuple(FileRecord(**f) for f in data["files"]),
            engines=tuple(EngineRecord(**e) for e in data.get("engines", ())),
            pipeline=data.get("pipeline"),
            weights=data.get("weights"),
            lora=data.get("lora"),
            deep_branch=data.get("deep_branch"),
            schedule=data.get("schedule"),
            switch=data.get("switch"),
        )


# --- reading and checking ------------------------------------------------------------------


def _shape_problems(manifest: Manifest) -> list[str]:
    """Every dim sane and every shape expression parsable, over known dims, and bounded at the dims' extremes."""
    problems = []
    for dim in manifest.dims:
        values = (dim.min, dim.opt, dim.max)
        if not all(is_integer(v) for v in values) \
                or not 1 <= dim.min <= dim.opt <= dim.max <= MAX_DIM_VALUE:
            problems.append(f"dim {dim.name} has min/opt/max {values}; expected integers 1 <= min <= opt <= max")
    if problems:
        return problems
    extremes = [{dim.name: getattr(dim, end) for dim in manifest.dims} for end in ("min", "max")]
    entries = [(f"{graph.kind} tensor {tensor.name}", entry) for graph in manifest.graphs.values()
               for tensor in graph.inputs + graph.outputs for entry in tensor.shape]
    entries += [(f"cache {cache.name} tokens", cache.tokens) for cache in manifest.caches]
    for where, entry in entries:
        if isinstance(entry, str) and len(entry) > MAX_EXPRESSION_LENGTH:
            problems.append(f"{where} has a shape expression of {len(entry)} characters (at most {MAX_EXPRESSION_LENGTH})")
            continue
        if isinstance(entry, bool) or not isinstance(entry, (int, str)):
            problems.append(f"{where} has shape entry {entry!r}; expected an integer or a dim expression")
            continue
        try:
            values = [eval_dim(entry, dims) for dims in extremes]
        except (ManifestError, ShapeError, ZeroDivisionError) as error:
            problems.append(f"{where}: {error}" if not isinstance(error, ZeroDivisionError)
                            else f"{where} shape entry {entry!r} divides by zero")
            continue
        if not all(0 <= value <= MAX_DIM_VALUE for value in values):
            problems.append(f"{where} shape entry {entry!r} gives {values} at the dims' min/max; "
                            f"expected 0..{MAX_DIM_VALUE}")
    return problems


def _pipeline_problems(manifest: Manifest) -> list[str]:
    """The text-to-image section: every field present, of its type, pointing at listed graphs and files."""
    pipeline = manifest.pipeline
    if pipeline is None:
        return []
    if not isinstance(pipeline, dict):
        return [f"the pipeline section is a {type(pipeline).__name__}, expected an object"]
    problems = []
    listed = {record.path for record in manifest.files}

    def graph(where: str, name: Any) -> None:
        if name not in manifest.graphs or name not in PIPELINE_GRAPH_KINDS:
            problems.append(f"pipeline {where} {name!r} is not one of the folder's pipeline graphs")

    def integer(where: str, value: Any, low: int) -> None:
        if not is_integer(value) or value < low:
            problems.append(f"pipeline {where} {value!r} must be an integer >= {low}")

    encoders = pipeline.get("text_encoders")
    if not isinstance(encoders, list) or not encoders or not all(isinstance(e, dict) for e in encoders):
        problems.append("pipeline text_encoders must be a non-empty list of objects")
        encoders = []
    for index, encoder in enumerate(encoders):
        where = f"text_encoders[{index}]"
        graph(f"{where}.graph", encoder.get("graph"))
        if encoder.get("tokenizer") not in listed:  # listed files are confined to the folder and checksummed
            problems.append(f"pipeline {where}.tokenizer {encoder.get('tokenizer')!r} is not among the listed files")
        integer(f"{where}.max_length", encoder.get("max_length"), 2)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key == "bos_token_id" and encoder.get("attention_mask") is True and encoder.get(key) is None:
                continue  # T5 has no start token
            integer(f"{where}.{key}", encoder.get(key), 0)
        if encoder.get("attention_mask", False) not in (True, False):
            problems.append(f"pipeline {where}.attention_mask must be true or false")
        if "instruction" in encoder and not (isinstance(encoder["instruction"], str)
                                             and encoder.get("attention_mask") is True):
            problems.append(f"pipeline {where}.instruction (text before every prompt, Sana's) must be a string, "
                            "on an encoder that reads its attention mask")
        if encoder.get("prompt_output") not in PROMPT_OUTPUTS:
            problems.append(f"pipeline {where}.prompt_output {encoder.get('prompt_output')!r} is not one of "
                            f"{', '.join(PROMPT_OUTPUTS)}")
    graph("vae_graph", pipeline.get("vae_graph"))
    if pipeline.get("vae_encoder_graph") is not None:  # optional: folders exported before image to image lack it
        graph("vae_encoder_graph", pipeline["vae_encoder_graph"])
    if pipeline.get("image_encoder_graph") is not None:  # IP-Adapter exports: the image prompt's encoder
        graph("image_encoder_graph", pipeline["image_encoder_graph"])
        processor = pipeline.get("image_processor")
        if not isinstance(processor, dict) or not is_integer(processor.get("shortest_edge")) or not (
                isinstance(processor.get("crop_size"), list) and len(processor["crop_size"]) == 2
                and all(is_integer(v) and v > 0 for v in processor["crop_size"])) or not all(
                isinstance(processor.get(key), list) and len(processor[key]) == 3
                and all(is_finite_number(v) for v in processor[key]) for key in ("image_mean", "image_std")):
            problems.append("pipeline image_processor must hold shortest_edge, crop_size [h, w], image_mean and "
                            "image_std (3 numbers each)")
    factor = pipeline.get("vae_scaling_factor")
    if not is_finite_number(factor) or factor <= 0:
        problems.append(f"pipeline vae_scaling_factor {factor!r} must be a positive finite number")
    if not isinstance(pipeline.get("force_zeros_for_empty_prompt"), bool):
        problems.append("pipeline force_zeros_for_empty_prompt must be true or false")
    pooled = pipeline.get("pooled_from")
    if pooled is not None and pooled not in [e.get("graph") for e in encoders]:
        problems.append(f"pipeline pooled_from {pooled!r} is not one of its text encoders")
    return problems


def _weights_problems(manifest: Manifest) -> list[str]:
    """The shared weights record: a listed file, known graphs, and every tensor inside the file."""
    weights = manifest.weights
    if weights is None:
        return []
    sizes = {record.path: record.size for record in manifest.files}
    if not isinstance(weights, dict) or weights.get("file") not in sizes or not isinstance(weights.get("graphs"), dict):
        return ["the weights section must name a listed file and map graphs to their tensors"]
    size, problems = sizes[weights["file"]], []
    for kind, tensors in weights["graphs"].items():
        if kind not in GRAPH_KINDS + OPTIONAL_UNET_GRAPH_KINDS or not isinstance(tensors, dict):
            problems.append(f"weights for {kind!r}, which is not a UNet graph")
            continue
        for name, entry in tensors.items():
            try:
                offset, length, dtype, shape = entry
                count = 1
                for dim in shape:
                    count *= int(dim)
                ok = (dtype in DTYPES and 0 <= int(offset) and int(offset) + int(length) <= size
                      and count * (2 if dtype in ("float16", "bfloat16") else np.dtype(dtype).itemsize) == int(length))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                problems.append(f"{kind} weight {name!r}: {entry!r} does not describe a tensor inside {weights['file']}")
                break
    return problems


LORA_LAYOUTS = ("same", "transposed")  # initializer = the model weight, or its transpose (MatMul)


def _lora_problems(manifest: Manifest) -> list[str]:
    """The adapter record: fused adapters described, every target inside a listed weights file."""
    lora = manifest.lora
    if lora is None:
        return []
    sizes = {record.path: record.size for record in manifest.files}
    if not isinstance(lora, dict) or not isinstance(lora.get("fused", []), list) \
            or not isinstance(lora.get("targets", {}), dict):
        return ["the lora section must hold a list of fused adapters and a map of targets"]
    problems = [f"fused adapter {entry!r} must have a file, a sha256 and a finite scale"
                for entry in lora.get("fused", [])
                if not isinstance(entry, dict) or not isinstance(entry.get("file"), str)
                or not isinstance(entry.get("sha256"), str) or not is_finite_number(entry.get("scale"))]
    for kind, graph in lora.get("targets", {}).items():
        if kind not in manifest.graphs or not isinstance(graph, dict) or graph.get("file") not in sizes \
                or not isinstance(graph.get("weights"), dict):
            problems.append(f"lora targets for {kind!r} must name a graph of the folder and a listed weights file")
            continue
        for weight, entries in graph["weights"].items():
            try:
                ok = all(layout in LORA_LAYOUTS and dtype == "float32" and 0 <= int(offset)
                         and int(offset) + 4 * int(np.prod([int(d) for d in shape])) <= sizes[graph["file"]]
                         for _name, layout, offset, dtype, shape in entries) and len(entries) > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                problems.append(f"lora target {kind} {weight!r}: {entries!r} does not describe float32 tensors inside "
                                f"{graph['file']}")
                break
    return problems


def _model_problems(manifest: Manifest) -> list[str]:
    """The model's numbers the runtime computes with: hand-edited ones are refused here, not met as a crash."""
    problems = []
    model, config = manifest.model, manifest.scheduler_config
    for where, value, low, high in (("model vae_scale_factor", model.get("vae_scale_factor", DEFAULT_VAE_SCALE_FACTOR), 1, 64),
                                    ("model cache_step_hint", model.get("cache_step_hint", 1), 1, 10**6),
                                    ("scheduler_config num_train_timesteps", config.get("num_train_timesteps", 1000),
                                     1, 10**6),
                                    ("scheduler_config steps_offset", config.get("steps_offset", 0), 0, 10**6)):
        if not is_integer(value) or not low <= value <= high:
            problems.append(f"{where} {value!r} must be an integer in {low}..{high}")
    for name in ("beta_start", "beta_end"):
        if name in config and not (is_finite_number(config[name]) and 0 < config[name] < 1):
            problems.append(f"scheduler_config {name} {config[name]!r} must be a number in (0, 1)")
    if not isinstance(model.get("dtype", "float32"), str):
        problems.append(f"model dtype {model.get('dtype')!r} must be a string")
    position = model.get("position_embedding")
    if position is not None and not (
            isinstance(position, dict) and all(is_integer(position.get(key)) and 0 < position[key] <= 1 << 16
                                               for key in ("width", "patch_size", "base_size"))
            and position["width"] % 4 == 0 and is_finite_number(position.get("interpolation_scale"))
            and position["interpolation_scale"] > 0):
        problems.append(f"model position_embedding {position!r} must hold width (a multiple of 4), patch_size, "
                        "base_size and a positive interpolation_scale")
    if not isinstance(model.get("denoiser", ""), str) or not isinstance(model.get("unet_config", {}), dict):
        problems.append("model denoiser must be a class name and model unet_config an object")
    elif manifest.transformer and not (is_integer(patch := model.get("unet_config", {}).get("patch_size", 1))
                                       and 0 < patch <= 64):
        problems.append(f"model unet_config patch_size {patch!r} must be an integer in 1..64")
    return problems


def _schema_problems(manifest: Manifest) -> list[str]:
    """What the dataclasses cannot say: required and known graphs, enumerations, shapes, the pipeline."""
    problems = [f"no {kind} graph" for kind in GRAPH_KINDS if kind not in manifest.graphs]
    known = GRAPH_KINDS + OPTIONAL_UNET_GRAPH_KINDS + PIPELINE_GRAPH_KINDS
    problems += [f"unknown graph {kind!r} (this cair-runtime knows {', '.join(known)})"
                 for kind in manifest.graphs if kind not in known]
    problems += _deep_branch_problems(manifest) + _schedule_problems(manifest) + _switch_problems(manifest)
    if manifest.fidelity_guidance not in FIDELITY_GUIDANCE:
        problems.append(f"fidelity_guidance {manifest.fidelity_guidance!r} is not one of {', '.join(FIDELITY_GUIDANCE)}")
    return problems + _model_problems(manifest) + _shape_problems(manifest) + _pipeline_problems(manifest) \
        + _weights_problems(manifest) + _lora_problems(manifest)


def _deep_branch_problems(manifest: Manifest) -> list[str]:
    """A shallow graph comes with a deep_branch section whose feature fidelity emits and shallow takes."""
    section, has_shallow = manifest.deep_branch, "shallow" in manifest.graphs
    if section is None and not has_shallow:
        return []
    if section is None or not has_shallow:
        return ["a shallow graph and a deep_branch section come together; the folder has only one of them"]
    keys = BLOCK_RANGE_KEYS if isinstance(section, dict) and section.get("kind") == "blocks" else DEEP_BRANCH_KEYS
    if not isinstance(section, dict) or any(key not in section for key in keys):
        return [f"the deep_branch section must be an object with {', '.join(keys)}"]
    name = section["name"]
    fidelity_outputs = [spec.name for spec in manifest.graphs["fidelity"].outputs] if "fidelity" in manifest.graphs else []
    if name not in fidelity_outputs or name not in [spec.name for spec in manifest.graphs["shallow"].inputs]:
        return [f"deep feature {name!r} must be a fidelity output and a shallow input"]
    guided = manifest.graphs.get("shallow_planning")
    if guided is not None:
        planning_outputs = [spec.name for spec in manifest.graphs["planning"].outputs]
        caches = {cache.name for cache in manifest.caches}
        if (name not in planning_outputs or name not in [spec.name for spec in guided.inputs]
                or not {spec.name for spec in guided.outputs[1:]} <= caches):
            return [f"the guided shallow graph must take deep feature {name!r}, which planning outputs, and output "
                    "caches only besides noise_pred"]
    return []


def _switch_problems(manifest: Manifest) -> list[str]:
    """The switch graph: a listed file, a condition input, one distinct input per cache, the deep feature."""
    section = manifest.switch
    if section is None:
        return []
    if not isinstance(section, dict):
        return ["the switch section must be an object with file, condition, cache_inputs, deep_feature"]
    problems = []
    if section.get("file") not in {record.path for record in manifest.files}:
        problems.append(f"switch graph file {section.get('file')!r} is not among the listed files")
    inputs, condition = section.get("cache_inputs"), section.get("condition")
    caches = {cache.name for cache in manifest.caches}
    if (not isinstance(condition, str) or not condition or not isinstance(inputs, dict) or set(inputs) != caches
            or not all(isinstance(name, str) and name for name in inputs.values())
            or len({*inputs.values(), condition}) != len(inputs) + 1):
        problems.append("the switch section must name a condition input and one distinct input per cache")
    deep = manifest.deep_branch.get("name") if isinstance(manifest.deep_branch, dict) else None
    if section.get("deep_feature") != deep:
        problems.append(f"the switch graph's deep feature {section.get('deep_feature')!r} must be the deep "
                        f"branch's {deep!r}")
    return problems


def _schedule_problems(manifest: Manifest) -> list[str]:
    """A calibrated schedule the folder can run (``Schedule``'s own checks: 1 <= n <= m <= T, k >= 1,
    a known skip mode; m > n only with per-half caches, k > 1 only with a shallow graph)."""
    section = manifest.schedule
    if section is None:
        return []
    if not isinstance(section, dict):
        return [f"the schedule section must be an object, not {type(section).__name__}"]
    try:
        Schedule.from_record(section).check_runs_on(manifest)
    except InvalidInputError as error:
        return [f"the calibrated schedule: {error}"]
    return []


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_file(folder: Path, relative: str) -> FileRecord:
    """Describe a file of an engine folder for the manifest."""
    path = folder / relative
    return FileRecord(relative, sha256_file(path), path.stat().st_size)


def _inside(folder: Path, relative: str) -> Path | None:
    """The file's path if ``relative`` stays inside ``folder``, else None."""
    if Path(relative).is_absolute():
        return None
    path = (folder / relative).resolve()
    return path if path.is_relative_to(folder.resolve()) else None


VERIFIED_NAME = ".cair-verified.json"  # what the last full verification saw: stat of every file
VERIFY_MODES = ("full", "fast", "size", "none")


def _stat_key(path: Path) -> list[int]:
    """What changes when a file is rewritten, truncated or replaced: size, inode, mtime and ctime
    (ctime cannot be set back by a user, unlike mtime)."""
    stat = path.stat()
    return [stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns]


def stamp_verified(folder: str | Path, manifest: Manifest) -> bool:
    """Record that every file of ``folder`` matches ``manifest`` as it is now on disk.

    Call it only right after the hashes were computed (export, build, ``cair-verify``). Later
    loads then skip re-hashing while no file's size, inode, mtime or ctime changed. Best effort:
    returns False where the folder is read-only (loads then hash every time, which is safe).
    """
    folder = Path(folder)
    record = {"manifest_sha256": sha256_file(folder / MANIFEST_NAME),
              "files": {r.path: _stat_key(folder / r.path) for r in manifest.files}}
    try:
        write_atomically(folder / VERIFIED_NAME, lambda file: file.write(json.dumps(record).encode()))
    except OSError:
        return False
    return True


def _stamp_matches(folder: Path, manifest: Manifest) -> bool:
    try:
        record = json.loads((folder / VERIFIED_NAME).read_text())
        return (record["manifest_sha256"] == sha256_file(folder / MANIFEST_NAME)
                and record["files"] == {r.path: _stat_key(folder / r.path) for r in manifest.files})
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_manifest(folder: str | Path, verify: str = "fast") -> Manifest:
    """Read and check an engine folder's manifest; report every problem at once.

    ``verify`` says how the files are checked against the manifest: ``"full"`` hashes every byte
    (sha256) and records what it saw (``stamp_verified``); ``"fast"`` (the default) does the
    same unless the files are exactly as the last full verification saw them (same size, inode,
    mtime and ctime), which skips gigabytes of hashing on every start yet catches truncation,
    rewriting and replacement; ``"size"`` checks presence and sizes only; ``"none"`` presence
    only (for tools about to rewrite the file list).
    """
    if verify not in VERIFY_MODES:
        raise InvalidInputError(f"verify mode {verify!r} is unknown; expected one of {', '.join(VERIFY_MODES)}")
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ManifestError(f"engine folder {folder} does not exist; export one with `cair-export export MODEL {folder}`")
    if not path.is_file():
        raise ManifestError(f"{folder} has no {MANIFEST_NAME}: it is not an engine folder, or its export did not finish")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ManifestError(f"{path} is not valid JSON ({error}); re-export the folder") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ManifestError(
            f"{path} has schema version {version!r}; this cair-runtime reads versions "
            f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}; re-export with a matching cair-export or upgrade cair-runtime"
        )
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ManifestError(f"{path} is malformed ({type(error).__name__}: {error}); re-export the folder") from None

    problems = _schema_problems(manifest)
    listed = {record.path for record in manifest.files}
    for graph in manifest.graphs.values():
        if graph.file not in listed:
            problems.append(f"{graph.kind} graph file {graph.file} is not among the listed files")
        for tensor in graph.inputs + graph.outputs:
            if tensor.dtype not in DTYPES:
                problems.append(f"{graph.kind} tensor {tensor.name} has unknown dtype {tensor.dtype!r}")
    present = []
    for record in manifest.files:
        target = _inside(folder, record.path)
        if target is None:
            problems.append(f"file {record.path!r} lies outside the engine folder")
        elif not target.is_file():
            problems.append(f"file {record.path} is missing")
        elif verify != "none" and target.stat().st_size != record.size:
            problems.append(f"file {record.path} has {target.stat().st_size} bytes, the manifest lists {record.size} "
                            "(truncated or replaced)")
        else:
            present.append((record, target))
    hashing = verify == "full" or (verify == "fast" and not _stamp_matches(folder, manifest))
    if hashing:
        problems += [f"file {record.path} does not match its sha256 (modified or corrupted)"
                     for record, target in present if sha256_file(target) != record.sha256]
    if problems:
        raise ManifestError(f"engine folder {folder} is not usable: " + "; ".join(dict.fromkeys(problems)) + "; re-export it")
    if hashing:
        stamp_verified(folder, manifest)
    return manifest
