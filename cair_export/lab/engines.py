"""Export once, then reuse: the engine folders the demo, the evaluation and the benchmarks run on."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from cair_export.core.export import ExportConfig, export_model
from cair_export.core.models import LoadedModel, load_model
from cair_runtime.errors import CairError
from cair_runtime.manifest import Manifest, load_manifest


def stale_reason(manifest: Manifest, model: LoadedModel, config: ExportConfig, with_pipeline: bool) -> str | None:
    """Why an existing export does not serve ``model`` under ``config`` (None: it does).

    It must come from the same model files (sha256 of the folder, ``None`` for code-built presets),
    hold the pipeline parts (VAE encoder included) when they are wanted, have the requested fidelity guidance and
    deep branch, take ``config.max_batch`` prompts per call and be tuned for the requested size.
    """
    if manifest.model.get("source_sha256") != model.source_sha256:
        return "the model changed since it was exported"
    if with_pipeline and manifest.pipeline is None:
        return "it holds no text encoder and VAE"
    if with_pipeline and manifest.pipeline.get("vae_encoder_graph") is None:
        return "it holds no VAE encoder (exported before image to image)"
    if manifest.fidelity_guidance != config.fidelity_guidance:
        return f"it was exported with fidelity guidance {manifest.fidelity_guidance!r}, not {config.fidelity_guidance!r}"
    branch = None if manifest.deep_branch is None else manifest.deep_branch.get("branch")
    if branch != config.deep_branch:
        return f"its deep branch is {branch}, not {config.deep_branch}"
    if manifest.controlnets != len(config.controlnets):
        return f"it holds {manifest.controlnets} ControlNet(s), not {len(config.controlnets)}"
    if manifest.dim("batch").max < config.max_batch:
        return f"it takes at most {manifest.dim('batch').max} prompts per call, not {config.max_batch}"
    factor = model.vae_scale_factor
    for name, pixels in (("latent_height", config.height), ("latent_width", config.width)):
        if pixels is not None and manifest.dim(name).opt != pixels // factor:
            return f"it is tuned for {manifest.dim(name).opt * factor} px, not {pixels}"
    return None


def ensure_engine(model: str, folder: Path, config: ExportConfig = ExportConfig(), with_pipeline: bool = True,
                  progress: Callable[[str], None] = print) -> Path:
    """``folder``, exported from ``model`` on first use and reused while ``stale_reason`` finds nothing."""
    loaded = load_model(model, with_pipeline=with_pipeline)
    try:
        reason = stale_reason(load_manifest(folder), loaded, config, with_pipeline)
    except CairError:  # nothing there yet: export; export_model refuses to replace a broken folder
        reason = ""
    if reason is None:
        progress(f"reusing {folder}")
        return folder
    if reason:
        progress(f"re-exporting {folder}: {reason}")
    progress(f"exporting {model} to {folder} (once; later runs reuse it)")
    export_model(loaded, folder, config, overwrite=True, progress=progress)
    return folder
