"""LoRA at export: fuse adapters with diffusers' own loader before tracing, and record where each
model weight ended up in the graphs, so the runtime can swap adapters without re-exporting."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from cair_export.core.models import LoadedModel
from cair_runtime.errors import InvalidInputError, MissingDependencyError
from cair_runtime.lora import check_lora_list, file_sha256, read_lora_file


def fuse_loras(model: LoadedModel, loras: Sequence[tuple[str | Path, float]]) -> list[dict[str, Any]]:
    """Fuse ``loras`` ((path, scale), in order) into ``model``'s UNet and text encoder(s), in place.

    Reads the diffusers and kohya layouts through diffusers (``load_lora_weights``,
    ``set_adapters``, ``fuse_lora``, then ``unload_lora_weights``, which keeps the fused weights).
    Returns the manifest's record of each adapter: file name, sha256, scale.
    """
    checked = check_lora_list(list(loras))
    if not checked:
        return []
    for path, _scale in checked:
        read_lora_file(path)  # a truncated or inconsistent file, or NaN/inf values: one error before diffusers reads it
    if not model.has_pipeline:
        raise InvalidInputError(f"--lora needs a whole pipeline (text encoder, UNet, VAE); {model.name} is a UNet "
                                "alone", field="loras")
    try:
        import peft  # noqa: F401 - diffusers' LoRA loading needs it
    except ImportError:
        raise MissingDependencyError("fusing LoRA adapters needs peft: pip install 'cair-export[lora]'") from None
    pipe = model.diffusers_pipeline()
    for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if encoder is not None:
            # diffusers hands text encoder adapters to transformers' ``load_adapter``, which refuses the
            # peft this environment has (transformers 5.24 asks for peft >= 0.22; the registry's newest is
            # 0.21.2). Same steps, through peft itself; diffusers' key conversion and fusing stay its own.
            encoder.load_adapter = functools.partial(_load_text_encoder_adapter, encoder)
    names = [f"adapter_{index}" for index in range(len(checked))]
    for name, (path, _scale) in zip(names, checked):
        try:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name, use_safetensors=True)
        except (ValueError, KeyError, RuntimeError, OSError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise InvalidInputError(f"diffusers cannot load LoRA {path}: {reason}", field="loras") from None
    loaded = set(pipe.get_list_adapters().get("unet", [])) | {a for v in pipe.get_list_adapters().values() for a in v}
    missing = [str(path) for name, (path, _) in zip(names, checked) if name not in loaded]
    if missing:
        raise InvalidInputError(f"LoRA {missing[0]} matched no module of {model.name} (keys do not match the model)",
                                field="loras")
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in checked])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()  # drops the LoRA layers, keeps the fused weights
    _check_fused_weights(pipe, checked)
    return [{"file": path.name, "sha256": file_sha256(path), "scale": scale} for path, scale in checked]


def _check_fused_weights(pipe: Any, checked: Sequence[tuple[Path, float]]) -> None:
    """Fused weights that overflowed (large values or scales) would export a model that draws black images."""
    for label in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, label, None)
        for name, parameter in ([] if module is None else module.named_parameters()):
            if not bool(torch.isfinite(parameter).all()):
                scales = ", ".join(f"{path.name}:{scale:g}" for path, scale in checked)
                raise InvalidInputError(f"fusing LoRA {scales} makes {label} weight {name} NaN or infinite (float32 "
                                        "overflow): the adapters' values or scales are too large; use smaller scales",
                                        field="loras")


def _load_text_encoder_adapter(model: torch.nn.Module, adapter_name: str, adapter_state_dict: dict, peft_config: Any,
                               **_options: Any) -> None:
    """What transformers' ``PeftAdapterMixin.load_adapter`` does with a state dict: inject, load, record."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    inject_adapter_in_model(peft_config, model, adapter_name=adapter_name)
    result = set_peft_model_state_dict(model, adapter_state_dict, adapter_name=adapter_name)
    unexpected = [key for key in getattr(result, "unexpected_keys", []) if "lora_" in key]
    if unexpected:
        raise ValueError(f"{len(unexpected)} LoRA keys match no module of the text encoder, e.g. {unexpected[0]}")
    model._hf_peft_config_loaded = True
    model.peft_config = {**getattr(model, "peft_config", {}), adapter_name: peft_config}


def _digest(array: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).digest()


def weight_digests(module: torch.nn.Module) -> dict[str, list[tuple[str, tuple, bytes]]]:
    """Each LoRA-able weight (``Linear``, ``Conv2d``) of ``module`` -> (layout, shape, sha256) of its bytes
    as the graph may store them: ``same``, and ``transposed`` for 2-D weights (MatMul). Taken before
    the export releases the torch UNet."""
    digests = {}
    for path, layer in module.named_modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            weight = layer.weight.detach().to(torch.float32).numpy()
            forms = [("same", weight)] + ([("transposed", weight.T)] if weight.ndim == 2 else [])
            digests[f"{path}.weight"] = [(layout, array.shape, _digest(array)) for layout, array in forms]
    return digests


def weight_targets(digests: dict[str, list[tuple[str, tuple, bytes]]], folder: Path, record: dict[str, list],
                   file: str, model: str, skip: Iterable[str] = ()) -> dict[str, Any]:
    """Where each weight of ``digests`` (``weight_digests``) lies among a graph's initializers.

    ``record`` is the graph's initializer name -> ``[offset, length, dtype, shape]`` in ``file``.
    Weights are found by content: the TorchScript exporter stores Linear weights transposed for
    MatMul under its own names (``onnx::MatMul_123``), so names alone do not tell. A weight found
    nowhere, or whose bytes another weight shares (ambiguous), is listed as ``unmapped``: the
    runtime then refuses adapters touching it instead of changing the wrong tensor. Modules under
    ``skip`` (the fidelity graph's cross-attention) are not expected in the graph.
    """
    data = np.memmap(folder / file, dtype=np.uint8, mode="r")
    by_content: dict[tuple, list[list]] = {}
    for name, (offset, length, dtype, shape) in record.items():
        if dtype == "float32":
            key = (tuple(shape), hashlib.sha256(data[offset:offset + length]).digest())
            by_content.setdefault(key, []).append([name, offset, dtype, list(shape)])
    del data
    skip = tuple(skip)
    found: dict[str, list[list]] = {}
    owners: dict[tuple, set[str]] = {}  # content -> the weights that have it
    unmapped = []
    for weight, forms in digests.items():
        path = weight.removesuffix(".weight")
        if any(path == s or path.startswith(s + ".") for s in skip):
            continue
        entries = []
        for layout, shape, digest in forms:
            owners.setdefault((tuple(shape), digest), set()).add(weight)
            entries += [[name, layout, offset, dtype, shape_] for name, offset, dtype, shape_
                        in by_content.get((tuple(shape), digest), [])]
        if entries:
            found[weight] = entries
        else:
            unmapped.append(weight)
    shared = {w for weights in owners.values() if len(weights) > 1 for w in weights}
    for weight in sorted(shared & set(found)):
        del found[weight]
        unmapped.append(weight)
    return {"model": model, "file": file, "weights": found, "unmapped": sorted(unmapped)}
