"""Export a UNet as CAIR's planning and fidelity (and shallow) ONNX graphs: the steps in order.

Options are checked first (``check_export_config``); then, inside a ``folder_transaction`` (the
output appears whole or not at all), the graphs are traced, their weights shared, lowered to the
requested precision, checked against the torch model (``core.validation``), the switch graph
written and checked, the pipeline's text encoder and VAE graphs added, and the manifest written
last (``core.engine_manifest``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cair_export.core.deep_feature import deep_branch
from cair_export.core.engine_manifest import export_manifest, lora_targets, write_manifest
from cair_export.core.folder_transaction import check_output_dir, folder_transaction
from cair_export.core.graphs import (
    UNET_KINDS,
    CairGraph,
    GraphIO,
    ImageEncoderGraph,
    TextEncoderGraph,
    VaeDecoderGraph,
    VaeEncoderGraph,
    cache_specs,
    graph_dims,
    graph_specs,
    image_encoder_io,
    reads_attention_mask,
    make_inputs,
    make_token_inputs,
    text_encoder_io,
    vae_decoder_io,
    vae_encoder_io,
)
from cair_export.core.memory import release_unet_weights
from cair_export.core.models import LoadedModel
from cair_export.core.models.families import sana_instruction
from cair_export.core.onnx_io import SHARED_WEIGHTS, save_onnx, share_weights
from cair_export.core.reference import FIDELITY_GUIDANCE, CrossAttentionCache
from cair_export.core.switch import SwitchGraphError, write_switch_graph
from cair_export.core.validation import (
    ValidationReport,
    check_switch,
    compare_graph,
    dims_text,
    finish_validation,
    torch_outputs,
    validate_graphs,
)
from cair_export.core.verify import FP32_RELATIVE_TOLERANCE
from cair_runtime.backends.onnxruntime import make_session
from cair_runtime.errors import InvalidInputError, ValidationError
from cair_runtime.lora import check_lora_list, read_lora_file
from cair_runtime.manifest import Dim, Manifest, size_problem, stamp_verified

MIN_OPSET = 17  # LayerNormalization stays one op


@dataclass(frozen=True)
class ExportConfig:
    """What to export; the CLI's flags map onto these fields one to one."""

    height: int | None = None  # pixels the graphs are tuned for (opt); None = the model's native size
    width: int | None = None
    opset: int = MIN_OPSET
    fidelity_guidance: str = "cfg"  # "cfg": per-half caches (any guidance stop m); "none": merged, m = n only
    cache_step_hint: int = 5  # default n the runtime uses, for the default 25 steps
    max_batch: int = 4  # prompts per call the graphs accept (the graphs see 2x this in planning)
    validate: bool = True  # run every graph in onnxruntime against the torch module
    tolerance: float = FP32_RELATIVE_TOLERANCE  # max abs error / max abs reference value
    dtype: str = "fp32"  # "fp32" | "fp16" | "bf16": compute precision in the UNet graphs (fp32 islands); IO float32
    loras: tuple[tuple[str, float], ...] = ()  # (safetensors file, scale) adapters fused before tracing, in order
    deep_branch: int | None = 0  # DeepCache's cache_branch_id for the shallow graphs; None: no deep caching
    max_prompt_chunks: int = 4  # longest prompt, in text-encoder windows (75 tokens each): the text axis's max
    controlnets: tuple[str, ...] = ()  # ControlNets fused into the UNet graphs: folders, or tiny[:SEED] (tests)
    ip_adapter: str | None = None  # IP-Adapter safetensors file, or tiny[:SEED] (tests)
    image_encoder: str | None = None  # its CLIP vision encoder folder; None: image_encoder/ beside the file


def supported_opsets() -> range:
    """The opsets both torch's TorchScript exporter and the installed onnx know, from ``MIN_OPSET``."""
    import onnx
    from torch.onnx import _constants  # private, but the one place torch states its exporter's newest opset

    newest = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", MIN_OPSET)
    return range(MIN_OPSET, min(newest, onnx.defs.onnx_opset_version()) + 1)


MAX_EXPORT_SIDE = 4096  # px; SDXL's native size is 1024
MAX_PROMPT_CHUNKS = 16  # 1,200 tokens: far beyond what a prompt holds, while the graphs' text axis stays bounded


def check_export_config(model: LoadedModel, config: ExportConfig) -> tuple[int, int]:
    """Validate user options; return the (height, width) in pixels."""
    check_export_options(config)
    factor = model.vae_scale_factor
    native = model.unet.config.sample_size * factor
    height = native if config.height is None else config.height
    width = native if config.width is None else config.width
    patch = model.unet.config.patch_size if model.is_transformer else 1  # latent pixels in whole patches
    for label, value in (("height", height), ("width", width)):
        problem = size_problem(label, value, factor, patch)
        if problem:
            step = factor * patch
            raise InvalidInputError(f"{problem}; try {max(step, round(value / step) * step)}")
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
    if not isinstance(config.max_prompt_chunks, int) or not 1 <= config.max_prompt_chunks <= MAX_PROMPT_CHUNKS:
        raise InvalidInputError(f"max prompt chunks {config.max_prompt_chunks!r} must be 1 to {MAX_PROMPT_CHUNKS} "
                                "(1: prompts truncated to one text-encoder window)", field="max_prompt_chunks")
    if config.deep_branch is not None and (not isinstance(config.deep_branch, int) or config.deep_branch < 0):
        raise InvalidInputError(f"deep branch {config.deep_branch!r} must be a non-negative integer "
                                "(DeepCache's cache_branch_id: 3 * block + layer)", field="deep_branch")
    if config.ip_adapter is None:
        if config.image_encoder is not None:
            raise InvalidInputError("--image-encoder is the IP-Adapter's; give --ip-adapter too", field="image_encoder")
    else:
        from cair_export.core.ip_adapter import TINY, read_ip_adapter

        if config.controlnets:
            raise InvalidInputError("an IP-Adapter and ControlNets in one export are not supported yet; export "
                                    "with one of them", field="ip_adapter")
        if config.ip_adapter != TINY and not config.ip_adapter.startswith(TINY + ":"):
            read_ip_adapter(config.ip_adapter)  # a pickle, a truncated file, a Plus adapter: before any model loads


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
    """Shapes other than the trace shape: the opt size at batch 1, and batch 2 at a smaller, non-square size
    with a two-window text (where the export takes long prompts).

    The second checks the dynamic batch, latent and text axes at about a quarter of the opt size's cost
    (for SDXL at 1024 px a batch-2 planning check at the opt size is four 1024 px UNet evaluations).
    """
    by_name = {dim.name: dim for dim in dims}
    opt = {dim.name: dim.opt for dim in dims}
    height, width, text = by_name["latent_height"], by_name["latent_width"], by_name["text_len"]
    small = dict(opt, batch=min(2, by_name["batch"].max), latent_height=height.min,
                 latent_width=min(width.min + up_factor, width.max), text_len=min(2 * text.opt, text.max))
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


UNET_FILES = tuple(f"{kind}.onnx" for kind in UNET_KINDS) + (SHARED_WEIGHTS,)


def _share_unet_weights(work: Path, files: list[str]) -> tuple[list[str], dict[str, Any]]:
    """One copy of the UNet's weights on disk: the graphs point into one file (docs/weights_once.md)."""
    graph_files = {kind: sorted(f for f in files if f.startswith((f"{kind}.onnx", f".{kind}-raw/")))
                   for kind in UNET_KINDS}
    shared, weights = share_weights(work, {kind: names for kind, names in graph_files.items() if names})
    raw = tuple(f".{kind}-raw/" for kind in UNET_KINDS)
    return [f for f in files if not f.startswith(UNET_FILES + raw)] + shared, weights


def _export_pipeline_parts(model: LoadedModel, work: Path, dims: tuple[Dim, ...], config: ExportConfig,
                           report: ValidationReport | None, progress: Callable[[str], None]):
    """Text encoder(s), VAE decoder and encoder and tokenizer(s) beside the UNet graphs, validated like them;
    returns the pipeline section, the graphs' IO and every file written (external data included)."""
    opt = {dim.name: dim.opt for dim in dims}
    text_dims = [dict(opt, batch=1), dict(opt, batch=2)]
    kinds = {"sdxl": "stable-diffusion-xl", "pixart-sigma": "pixart-sigma", "sana": "sana"}
    pipeline = {"type": kinds.get(model.family, "stable-diffusion"),
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
            "prompt_output": "penultimate_hidden_state" if model.family == "sdxl" else "last_hidden_state",
            # T5 (PixArt), Gemma-2 (Sana): one window of max_length tokens, the padding mask read by the model too.
            **({"attention_mask": True} if reads_attention_mask(encoder.model) else {}),
            # Sana: the "complex human instruction" its pipeline puts before every prompt by default.
            **({"instruction": "\n".join(sana_instruction())} if model.family == "sana" else {})})
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
            compare_graph(graph, make_session(work / f"{kind}.onnx"), text_dims, tokens, report, config.tolerance,
                          progress)
        ios[kind] = io

    io = vae_decoder_io(model.vae, model.vae_scale_factor)
    graph = VaeDecoderGraph(model.vae, io)
    progress("exporting vae_decoder graph")
    trace = dict(opt, batch=1, latent_height=opt["latent_height"] + 1)
    files += _export_onnx(graph, io, make_inputs(io, trace, 0), work, config.opset)
    wide = dict(opt, batch=2, latent_width=opt["latent_width"] + 2)
    if report is not None:
        compare_graph(graph, make_session(work / "vae_decoder.onnx"), [dict(opt, batch=1), wide],
                      lambda io, dims, seed: make_inputs(io, dims, seed), report, config.tolerance, progress)
    ios["vae_decoder"] = io

    # The VAE encoder, for image to image: small (SD's is 34M parameters, 4% of the pipeline), so always; but
    # not Sana's DC-AE: diffusers has no Sana image-to-image pipeline.
    if hasattr(model.vae, "quant_conv"):
        io = vae_encoder_io(model.vae, model.vae_scale_factor)
        graph = VaeEncoderGraph(model.vae, io)
        progress("exporting vae_encoder graph")
        files += _export_onnx(graph, io, make_inputs(io, trace, 0), work, config.opset)
        if report is not None:
            compare_graph(graph, make_session(work / "vae_encoder.onnx"), [dict(opt, batch=1), wide],
                          lambda io, dims, seed: make_inputs(io, dims, seed), report, config.tolerance, progress)
        ios["vae_encoder"] = io
    else:
        pipeline["vae_encoder_graph"] = None
    if model.ip_adapter is not None:  # IP-Adapter's image encoder: once per call, for the image prompt
        io = image_encoder_io(model.ip_adapter.image_encoder)
        graph = ImageEncoderGraph(model.ip_adapter.image_encoder, io)
        progress("exporting image_encoder graph")
        files += _export_onnx(graph, io, make_inputs(io, dict(opt, batch=1), 0), work, config.opset)
        if report is not None:
            compare_graph(graph, make_session(work / "image_encoder.onnx"), [dict(opt, batch=1), dict(opt, batch=2)],
                          lambda io, dims, seed: make_inputs(io, dims, seed), report, config.tolerance, progress)
        ios["image_encoder"] = io
        pipeline["image_encoder_graph"] = "image_encoder"
        pipeline["image_processor"] = model.ip_adapter.image_processor
    files += [encoder["tokenizer"] for encoder in pipeline["text_encoders"]]
    return pipeline, ios, files, text_weights


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
    if model.is_transformer and (config.controlnets or config.ip_adapter is not None or config.loras):
        raise InvalidInputError(f"{model.name} is a diffusion transformer: ControlNets, IP-Adapters and LoRA "
                                "adapters are exported with UNets only so far; drop those options")
    check_output_dir(out_dir, overwrite, model.folder)
    if config.controlnets:
        import dataclasses

        from cair_export.core.controlnet import load_controlnet

        model = dataclasses.replace(model, controlnets=tuple(load_controlnet(spec, model.unet)
                                                             for spec in config.controlnets))
    if config.ip_adapter is not None:
        import dataclasses

        from cair_export.core.ip_adapter import load_ip_adapter

        if not model.has_pipeline:
            raise InvalidInputError(f"model {model.name} is a UNet alone; an IP-Adapter export needs a whole "
                                    "pipeline (text encoder, VAE) to run images from", field="ip_adapter")
        # Applied to the UNet in place (its attention processors and image projection).
        model = dataclasses.replace(model, ip_adapter=load_ip_adapter(config.ip_adapter, model.unet,
                                                                      config.image_encoder))
    with folder_transaction(out_dir, overwrite, model.folder) as work:
        manifest = _export_into(model, work, config, height, width, progress, release_unet)
    progress(f"wrote {out_dir}")
    return manifest


def _lower_unet_graphs(work: Path, config: ExportConfig, ios: dict[str, GraphIO], shapes: list[dict[str, int]],
                       expected: dict | None, report: ValidationReport | None, files: list[str],
                       progress: Callable[[str], None]) -> tuple[list[str], dict[str, Any]]:
    """Rewrite the fp32 UNet graphs in ``config.dtype``, share their weights again, and check them against
    the fp32 torch outputs at the dtype's tolerance (into ``report``); ``precision.json`` records the
    conversion and that check."""
    from cair_export.core.precision import DTYPES, lower_exported_graphs
    from cair_export.core.verify import TOLERANCES

    lowered, lowering = lower_exported_graphs(ios, work, config.dtype, progress)
    (work / SHARED_WEIGHTS).unlink()  # the fp32 weights: the lowered graphs hold their own now
    files, weights = _share_unet_weights(work, [f for f in files if not f.startswith(UNET_FILES)] + lowered)
    if report is not None:
        name, tolerance = DTYPES[config.dtype], TOLERANCES[config.dtype]
        checks = ValidationReport()
        executors = validate_graphs(ios, work, shapes, expected, tolerance, progress, checks, weights,
                                    label=f"{name} ", executor="auto" if config.dtype == "bf16" else "onnxruntime")
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


def _export_into(model: LoadedModel, work: Path, config: ExportConfig, height: int, width: int,
                 progress: Callable[[str], None], release_unet: bool = False) -> Manifest:
    fused = ()
    if config.loras:
        from cair_export.core.lora import fuse_loras

        progress(f"fusing {len(config.loras)} LoRA adapter(s)")
        fused = fuse_loras(model, config.loras)
    unet = model.unet.eval()
    dims = graph_dims(model, height, width, config.max_batch, config.max_prompt_chunks)
    if model.is_transformer:  # every size a whole number of patches; the trace at the smallest
        up_factor = unet.config.patch_size
        trace = {**{dim.name: dim.min for dim in dims}, "batch": 1}
    else:
        up_factor = 2 ** (len(unet.config.block_out_channels) - 1)
        trace = _trace_dims(dims, up_factor)
    shapes = _validation_dims(dims, up_factor)
    files: list[str] = []
    report = ValidationReport() if config.validate else None
    expected = None
    if model.is_transformer and config.deep_branch is not None and len(unet.transformer_blocks) < 3:
        progress("no shallow graphs: this transformer has too few blocks to replay a middle range")
        config = dataclasses.replace(config, deep_branch=None)
    branch = None if config.deep_branch is None else deep_branch(unet, config.deep_branch)
    if (model.controlnets or model.ip_adapter is not None) and branch is not None:
        progress("no shallow graphs: deep-feature caching does not take ControlNets or IP-Adapters yet")
        branch = None
    with CrossAttentionCache(unet, config.fidelity_guidance, model.controlnets) as cache:
        caches = cache_specs(cache.sites)
        ios = graph_specs(model, caches, config.fidelity_guidance, branch)
        graphs = {kind: CairGraph(unet, cache, io, branch, model.controlnets) for kind, io in ios.items()}
        for kind, graph in graphs.items():
            progress(f"exporting {kind} graph (trace at {dims_text(trace)}, opset {config.opset})")
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
        if branch is not None and not model.is_transformer:  # the run-time LoRA map: UNets only
            from cair_export.core.deep_feature import shallow_module_paths

            shallow_paths = shallow_module_paths(unet, branch)
    if release_unet:
        release_unet_weights(model, progress)
    files, weights = _share_unet_weights(work, files)  # before validation, which then maps them once
    if config.dtype != "fp32":  # the fp32 graphs are an intermediate: validated as shipped, after lowering
        files, weights = _lower_unet_graphs(work, config, unet_ios, shapes, expected, report, files, progress)
    elif report is not None:
        validate_graphs(unet_ios, work, shapes, expected, config.tolerance, progress, report, weights)
    # The switch graph's fidelity steps read every input but the text (and a transformer's text mask); ControlNet
    # and IP-Adapter graphs have more planning-only inputs.
    plain = not model.controlnets and model.ip_adapter is None
    switch = _write_switch(work, caches, branch, config, progress) if plain else None
    if switch is not None:
        files.append(switch["file"])
    pipeline, text_weights = None, {}
    if model.has_pipeline:
        pipeline, pipeline_ios, pipeline_files, text_weights = _export_pipeline_parts(model, work, dims, config,
                                                                                      report, progress)
        ios.update(pipeline_ios)
        files += pipeline_files  # graphs with their external data, if any, and the tokenizers
    if report is not None:
        files.append(finish_validation(report, work, progress))
    manifest = export_manifest(
        model, work, dtype=config.dtype, cache_step_hint=config.cache_step_hint,
        fidelity_guidance=config.fidelity_guidance, dims=dims, ios=ios, caches=caches, files=files,
        pipeline=pipeline, weights=weights,
        lora={"fused": list(fused), "targets": lora_targets(model, unet_digests, work, weights, text_weights, caches,
                                                              shallow_paths)},
        deep_branch=None if branch is None else branch.as_dict(), switch=switch)
    if switch is not None:  # at the trace size, the smallest: which kernels run does not depend on the size
        manifest = check_switch(work, manifest, unet_ios, trace, progress)
    write_manifest(work, manifest)
    for path in work.rglob("*"):  # some writers create files private (0600); engine files are ordinary
        path.chmod(0o755 if path.is_dir() else 0o644)
    stamp_verified(work, manifest)  # just hashed: the runtime's first load need not hash again
    return manifest
