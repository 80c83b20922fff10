"""An engine folder's ``manifest.json``: the model record, an export's manifest assembled from its parts,
and the one function that writes it.

Every writer of a manifest (the ONNX export, TensorRT and AOTInductor builds, calibration) goes
through ``write_manifest``; the ONNX export and the AOTInductor-only folders describe their model
with the one ``model_record``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cair_export.core.graphs import UNET_KINDS, GraphIO
from cair_export.core.models import LoadedModel
from cair_export.core.models.families import patch_embedding, reads_positions
from cair_export.core.precision import DTYPES
from cair_runtime.files import write_atomically
from cair_runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, Dim, GraphSpec, Manifest, record_file


def model_record(model: LoadedModel, dtype: str = "fp32", cache_step_hint: int = 5) -> dict[str, Any]:
    """The manifest's ``model`` section: what was exported, in which compute precision (``"fp32"`` ...)."""
    return {"name": model.name, "source": model.source, "family": model.family, "dtype": DTYPES[dtype],
            "vae_scale_factor": model.vae_scale_factor, "cache_step_hint": cache_step_hint,
            "source_sha256": model.source_sha256,
            "denoiser": type(model.unet).__name__,  # UNet2DConditionModel or a transformer class (unet_config's)
            "unet_config": json.loads(json.dumps(dict(model.unet.config), default=str)),
            **({"controlnets": [{"source": getattr(net, "cair_source", None),
                                 "conditioning_channels": net.config.conditioning_channels,
                                 "config": json.loads(json.dumps(dict(net.config), default=str))}
                                for net in model.controlnets]} if model.controlnets else {}),
            **({"ip_adapter": model.ip_adapter.manifest_record()} if model.ip_adapter is not None else {}),
            **({"position_embedding": position_record(model.unet)} if reads_positions(model.unet) else {})}


def position_record(transformer: torch.nn.Module) -> dict[str, Any]:
    """What ``cair_runtime.positions.position_embedding`` needs for a transformer's patch grid."""
    embed = patch_embedding(transformer)
    return {"width": int(embed.proj.out_channels), "patch_size": int(embed.patch_size),
            "base_size": int(embed.base_size), "interpolation_scale": float(embed.interpolation_scale)}


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Replace ``folder/manifest.json`` in one step (``write_atomically``: a temporary file beside it, then a rename)."""
    write_atomically(folder / MANIFEST_NAME, lambda file: file.write(manifest.to_json().encode()))


def export_manifest(model: LoadedModel, work: Path, *, dtype: str, cache_step_hint: int, fidelity_guidance: str,
                    dims: tuple[Dim, ...], ios: dict[str, GraphIO], caches, files: list[str],
                    pipeline: dict[str, Any] | None, weights: dict[str, Any], lora: dict[str, Any],
                    deep_branch: dict[str, Any] | None, switch: dict[str, Any] | None) -> Manifest:
    """The manifest of an ONNX export in ``work``: every file listed with its sha256, graph ``<kind>.onnx``."""
    return Manifest(
        schema_version=SCHEMA_VERSION,
        producer=_producer(),
        model=model_record(model, dtype, cache_step_hint),
        scheduler_config=model.scheduler_config,
        fidelity_guidance=fidelity_guidance,
        dims=dims,
        graphs={kind: GraphSpec(kind, f"{kind}.onnx", io.inputs, io.outputs) for kind, io in ios.items()},
        caches=caches,
        files=tuple(record_file(work, name) for name in files),
        pipeline=pipeline,
        weights=weights,
        lora=lora,
        deep_branch=deep_branch,
        switch=switch,
    )


def _producer() -> dict[str, str]:
    import diffusers
    import onnx

    from cair_export import __version__
    return {"cair-export": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "onnx": onnx.__version__}


def lora_targets(model: LoadedModel, unet_digests: dict | None, work: Path, weights: dict[str, Any],
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
                                    skip={"planning": (), "fidelity": cached, "shallow": cached + below_branch,
                                          "shallow_planning": below_branch}[kind])
               for kind in UNET_KINDS if kind in weights["graphs"]}
    for index, encoder in enumerate(model.text_encoders):
        kind = "text_encoder" if index == 0 else f"text_encoder_{index + 1}"
        targets[kind] = weight_targets(weight_digests(encoder.model), work, text_weights[kind]["graphs"][kind],
                                       text_weights[kind]["file"], kind)
    return targets
