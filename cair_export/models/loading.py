"""Load a model by preset name or from a local diffusers folder, offline, from safetensors only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cair_export.models.presets import PRESETS, SCHEDULER_SD15
from cair_runtime.errors import InvalidInputError

_WEIGHTS = "diffusion_pytorch_model.safetensors"
_SHARDED_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_PICKLES = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json", "pytorch_model.bin")


@dataclass
class LoadedModel:
    """A UNet ready to export, with what the manifest needs to describe it."""

    name: str  # preset name or the folder's name
    source: str  # "preset" or the folder path
    family: str  # "sd15" | "sd21" | "sdxl": conventions the model follows
    unet: Any  # diffusers UNet2DConditionModel, eval mode, fp32
    scheduler_config: dict[str, Any]  # the model's own scheduler, diffusers config format
    vae_scale_factor: int = 8  # pixels per latent pixel
    text_len: int = 77  # tokens the text encoder takes

    @property
    def added_conditions(self) -> bool:
        """True when the UNet takes SDXL's ``text_embeds``/``time_ids``."""
        return self.unet.config.addition_embed_type == "text_time"


def load_model(name_or_path: str, device: str = "cpu") -> LoadedModel:
    """Return a preset (``tiny-sd21``, ``sd21``, ...) or a local pipeline/UNet folder.

    ``device="meta"`` builds presets without allocating weights (for counting MACs).
    """
    if name_or_path in PRESETS:
        return _build_preset(name_or_path, device)
    path = Path(name_or_path)
    if not path.is_dir():
        raise InvalidInputError(
            f"model {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a folder; "
            "pass a preset name or a local diffusers pipeline or UNet folder"
        )
    return _load_folder(path, device)


def _build_preset(name: str, device: str) -> LoadedModel:
    from diffusers import UNet2DConditionModel

    preset = PRESETS[name]
    with torch.device(device):
        torch.manual_seed(preset.seed)
        unet = UNet2DConditionModel(**preset.unet_config)
    return LoadedModel(name, "preset", preset.family, unet.eval(), dict(preset.scheduler_config))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"{path} is not readable JSON ({error}); is the model folder complete?") from None
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path} holds {type(data).__name__}, expected a JSON object")
    return data


def _load_folder(path: Path, device: str) -> LoadedModel:
    from diffusers import UNet2DConditionModel

    if (path / "model_index.json").is_file():  # a whole pipeline folder
        _read_json(path / "model_index.json")
        unet_dir = path / "unet"
        scheduler_file = path / "scheduler" / "scheduler_config.json"
        scheduler_config = _read_json(scheduler_file) if scheduler_file.is_file() else dict(SCHEDULER_SD15)
    elif (path / "config.json").is_file():  # a UNet folder alone: assume SD's scheduler
        unet_dir = path
        scheduler_config = dict(SCHEDULER_SD15)
    else:
        raise InvalidInputError(
            f"{path} has neither model_index.json (a diffusers pipeline folder) nor config.json (a UNet folder)"
        )
    if not (unet_dir / "config.json").is_file():
        raise InvalidInputError(f"{unet_dir}/config.json is missing; the pipeline folder has no UNet")
    config = _read_json(unet_dir / "config.json")
    class_name = config.get("_class_name")
    if class_name != "UNet2DConditionModel":
        raise InvalidInputError(
            f"{unet_dir} holds a {class_name}, which has no cross-attention; "
            "CAIR needs a text-conditioned UNet2DConditionModel"
        )
    if not ((unet_dir / _WEIGHTS).is_file() or (unet_dir / _SHARDED_INDEX).is_file()):
        pickles = [name for name in _PICKLES if (unet_dir / name).is_file()]
        if pickles:
            raise InvalidInputError(
                f"{unet_dir} has only a pickle checkpoint ({pickles[0]}); cair-export loads safetensors only. "
                "Convert it first, e.g. UNet2DConditionModel.from_pretrained(dir).save_pretrained(dir, "
                "safe_serialization=True) in a trusted environment"
            )
        raise InvalidInputError(f"{unet_dir} has no {_WEIGHTS}; the model folder is incomplete")
    if device == "meta":  # counting only: the architecture, no weights read
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
    else:
        unet = _load_unet_weights(unet_dir)
    family = "sdxl" if unet.config.addition_embed_type == "text_time" else (
        "sd21" if scheduler_config.get("prediction_type") == "v_prediction" else "sd15"
    )
    return LoadedModel(
        path.name, str(path), family, unet.to(device).eval(), scheduler_config,
        vae_scale_factor=_vae_scale_factor(path), text_len=_text_len(path),
    )


def _load_unet_weights(unet_dir: Path):
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel.from_pretrained(
            unet_dir, use_safetensors=True, local_files_only=True, torch_dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InvalidInputError(f"cannot load the UNet from {unet_dir}: {first_line}") from None


def _vae_scale_factor(path: Path) -> int:
    config = path / "vae" / "config.json"
    if not config.is_file():
        return 8  # a UNet folder alone: Stable Diffusion's VAE
    return 2 ** (len(_read_json(config).get("block_out_channels", [0, 0, 0, 0])) - 1)


def _text_len(path: Path) -> int:
    for config, key in (("tokenizer/tokenizer_config.json", "model_max_length"),
                        ("text_encoder/config.json", "max_position_embeddings")):
        value = _read_json(path / config).get(key) if (path / config).is_file() else None
        if isinstance(value, int) and 0 < value < 100_000:
            return value
    return 77
