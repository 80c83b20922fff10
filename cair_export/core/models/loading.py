"""Load a model by preset name or from a local diffusers folder, offline, from safetensors only."""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cair_export.assets import SHIPPED_MODELS, asset_path
from cair_export.core.models.families import TRANSFORMERS, is_transformer, sana_instruction
from cair_export.core.models.presets import PRESETS, SCHEDULER_SD15, TINY_DC_AE, TINY_VAE, TINY_WORDS, Preset
from cair_export.core.sizes import vae_scale_factor
from cair_runtime.errors import InvalidInputError
from cair_runtime.manifest import DEFAULT_VAE_SCALE_FACTOR

_WEIGHTS = "diffusion_pytorch_model.safetensors"
_SHARDED_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_PICKLES = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json", "pytorch_model.bin")
_SDXL_PIPELINES = ("StableDiffusionXLPipeline",)


@dataclass
class TextEncoder:
    """One text encoder with its tokenizer."""

    model: Any  # transformers CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel (PixArt) or Gemma2Model (Sana)
    tokenizer: Any  # transformers CLIPTokenizer, T5TokenizerFast or GemmaTokenizer (fast: has backend_tokenizer)


@dataclass
class LoadedModel:
    """A UNet ready to export, its pipeline parts when it has them, and what the manifest needs."""

    name: str  # preset name or the folder's name
    source: str  # "preset", "shipped" (a model inside the package) or the folder path
    family: str  # "sd15" | "sd21" | "sdxl" | "pixart-sigma" | "sana": conventions the model follows
    unet: Any  # the denoiser, eval mode, fp32: a diffusers UNet2DConditionModel or diffusion transformer
    scheduler_config: dict[str, Any]  # the model's own scheduler, diffusers config format
    vae_scale_factor: int = DEFAULT_VAE_SCALE_FACTOR  # pixels per latent pixel
    text_len: int = 77  # tokens the text encoder takes
    # Whole pipelines (tiny presets, pipeline folders) also have these; UNet-only models do not.
    text_encoders: list[TextEncoder] = field(default_factory=list)
    vae: Any = None  # diffusers AutoencoderKL, or AutoencoderDC (Sana)
    force_zeros_for_empty_prompt: bool = False  # SDXL: zero negative embeddings when no negative prompt
    source_sha256: str | None = None  # digest of a folder model's files, to tell a changed model from its export
    controlnets: tuple[Any, ...] = ()  # diffusers ControlNetModels exported with the UNet (load_controlnet)
    ip_adapter: Any = None  # cair_export.core.ip_adapter.IPAdapter applied to the UNet (load_ip_adapter)

    @property
    def added_conditions(self) -> bool:
        """True when the UNet takes SDXL's ``text_embeds``/``time_ids``."""
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    @property
    def is_transformer(self) -> bool:
        """A diffusion transformer (PixArt, Sana) rather than a UNet: patches, no down/up blocks."""
        return is_transformer(self.unet)

    @property
    def folder(self) -> Path | None:
        """The local folder the model was read from; None for a preset (built in memory)."""
        return model_folder(self.name if self.source in ("preset", "shipped") else self.source)

    @property
    def has_pipeline(self) -> bool:
        return bool(self.text_encoders) and self.vae is not None

    def diffusers_pipeline(self):
        """The equivalent diffusers pipeline (the reference for text-to-image)."""
        from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PixArtSigmaPipeline,
                               PNDMScheduler, SanaPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline)

        if not self.has_pipeline:
            raise InvalidInputError(f"model {self.name} is a UNet alone; it has no text encoder or VAE")
        classes = {cls.__name__: cls
                   for cls in (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler)}
        scheduler = classes.get(self.scheduler_config.get("_class_name"), DDIMScheduler).from_config(
            self.scheduler_config)
        first = self.text_encoders[0]
        if self.family == "sana":
            pipe = SanaPipeline(tokenizer=first.tokenizer, text_encoder=first.model, vae=self.vae,
                                transformer=self.unet, scheduler=scheduler)
        elif self.family == "pixart-sigma":
            pipe = PixArtSigmaPipeline(tokenizer=first.tokenizer, text_encoder=first.model, vae=self.vae,
                                       transformer=self.unet, scheduler=scheduler)
        elif self.family == "sdxl":
            second = self.text_encoders[1]
            pipe = StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=first.model, text_encoder_2=second.model, tokenizer=first.tokenizer,
                tokenizer_2=second.tokenizer, unet=self.unet, scheduler=scheduler,
                force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)
        else:
            pipe = StableDiffusionPipeline(
                vae=self.vae, text_encoder=first.model, tokenizer=first.tokenizer, unet=self.unet,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def load_model(name_or_path: str, device: str = "cpu", with_pipeline: bool = False) -> LoadedModel:
    """Return a preset (``tiny-sd21``, ``sd21``, ...) or a local pipeline/UNet folder.

    ``device="meta"`` builds the UNet without allocating weights (for counting MACs).
    ``with_pipeline`` also loads text encoder(s), tokenizer(s) and VAE where the model has them.
    """
    if name_or_path in PRESETS:
        return _build_preset(PRESETS[name_or_path], device, with_pipeline)
    if name_or_path in SHIPPED_MODELS:
        path = asset_path(name_or_path)
        if not (path / "model_index.json").is_file():
            raise InvalidInputError(f"the shipped model {name_or_path!r} is missing from {path}; reinstall cair-export")
        model = _load_folder(path, device, with_pipeline)
        model.name, model.source = name_or_path, "shipped"
        return model
    path = Path(name_or_path)
    if not path.is_dir():
        raise InvalidInputError(
            f"model {name_or_path!r} is neither a preset ({', '.join([*PRESETS, *SHIPPED_MODELS])}) nor a folder; "
            "pass a preset name or a local diffusers pipeline or UNet folder"
        )
    return _load_folder(path, device, with_pipeline)


def model_folder(name_or_path: str) -> Path | None:
    """The local folder ``load_model(name_or_path)`` reads; None for a preset (built in memory)."""
    if name_or_path in PRESETS:
        return None
    if name_or_path in SHIPPED_MODELS:
        return asset_path(name_or_path)
    return Path(name_or_path)


def load_exported_model(model_info: dict[str, Any], device: str = "cpu") -> LoadedModel:
    """The model an engine folder was exported from, from its manifest's ``model`` entry."""
    source = model_info.get("source")
    return load_model(model_info["name"] if source in ("preset", "shipped") else str(source), device)


# --- presets -------------------------------------------------------------------------------


def _build_preset(preset: Preset, device: str, with_pipeline: bool) -> LoadedModel:
    import diffusers

    with torch.device(device):
        torch.manual_seed(preset.seed)
        unet = getattr(diffusers, preset.denoiser)(**preset.unet_config)
    model = LoadedModel(preset.name, "preset", preset.family, unet.eval(), dict(preset.scheduler_config),
                        vae_scale_factor=preset.vae_scale_factor, text_len=preset.text_len)
    if with_pipeline and preset.text_encoders and device != "meta":
        _build_tiny_pipeline(model, preset)
    return model


def _build_tiny_pipeline(model: LoadedModel, preset: Preset) -> None:
    """Seeded tiny tokenizer(s), text encoder(s) and VAE with the release's conventions."""
    from diffusers import AutoencoderDC, AutoencoderKL

    kind = preset.text_encoders[0].kind
    if kind == "t5":
        model.text_encoders.append(_tiny_t5(preset))
    elif kind == "gemma2":
        model.text_encoders.append(_tiny_gemma2(preset))
    else:
        _tiny_clip_encoders(model, preset)
    torch.manual_seed(preset.seed + 10)
    if preset.family == "sana":
        model.vae = AutoencoderDC(**TINY_DC_AE, scaling_factor=preset.vae_scaling_factor).eval()
    else:
        model.vae = AutoencoderKL(**TINY_VAE, scaling_factor=preset.vae_scaling_factor).eval()
    model.force_zeros_for_empty_prompt = preset.family == "sdxl"


def _tiny_t5(preset: Preset) -> TextEncoder:
    """A seeded tiny T5 v1.1 encoder (gated GELU, as PixArt's T5-XXL) and its tokenizer."""
    from transformers import T5Config, T5EncoderModel

    from cair_export.core.models.tokenizer import write_t5_tokenizer

    spec = preset.text_encoders[0]
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = write_t5_tokenizer(Path(folder), list(TINY_WORDS), model_max_length=preset.text_len)
    config = T5Config(vocab_size=len(tokenizer), d_model=spec.hidden_size, d_kv=8, d_ff=64, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False, use_cache=False, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(preset.seed + 1)
    return TextEncoder(T5EncoderModel(config).eval(), tokenizer)


def _tiny_gemma2(preset: Preset) -> TextEncoder:
    """A seeded tiny Gemma-2 (Sana's text encoder: a decoder-only LLM's last hidden state) and its tokenizer,
    which knows the words of Sana's instruction as well as the captions', so the instruction is as many
    tokens as a real vocabulary makes it (about a hundred and fifty), not a character each."""
    import re

    from transformers import Gemma2Config, Gemma2Model

    from cair_export.core.models.tokenizer import write_gemma_tokenizer

    spec = preset.text_encoders[0]
    instruction = sorted(set(re.findall(r"[a-z]+", " ".join(sana_instruction()).lower())) - set(TINY_WORDS))
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = write_gemma_tokenizer(Path(folder), [*TINY_WORDS, *instruction], model_max_length=preset.text_len)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                          max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=False)
    torch.manual_seed(preset.seed + 1)
    return TextEncoder(Gemma2Model(config).eval(), tokenizer)


def _tiny_clip_encoders(model: LoadedModel, preset: Preset) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from cair_export.core.models.tokenizer import write_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer(Path(folder), list(TINY_WORDS), model_max_length=model.text_len)
        base_tokenizer = CLIPTokenizer.from_pretrained(folder)
        for index, spec in enumerate(preset.text_encoders):
            tokenizer = CLIPTokenizer.from_pretrained(folder, pad_token=spec.pad_token)
            config = CLIPTextConfig(
                vocab_size=len(base_tokenizer), hidden_size=spec.hidden_size, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=model.text_len,
                hidden_act=spec.hidden_act, projection_dim=spec.hidden_size,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
            torch.manual_seed(preset.seed + 1 + index)
            cls = CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel
            model.text_encoders.append(TextEncoder(cls(config).eval(), tokenizer))


# --- folders -------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"{path} is not readable JSON ({error}); is the model folder complete?") from None
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path} holds {type(data).__name__}, expected a JSON object")
    return data


def _check_safetensors(folder: Path, weights: str = _WEIGHTS, sharded: str = _SHARDED_INDEX) -> None:
    if (folder / weights).is_file() or (folder / sharded).is_file():
        return
    pickles = [name for name in _PICKLES if (folder / name).is_file()]
    if pickles:
        raise InvalidInputError(
            f"{folder} has only a pickle checkpoint ({pickles[0]}); cair-export loads safetensors only. "
            "Convert it first, e.g. UNet2DConditionModel.from_pretrained(dir).save_pretrained(dir, "
            "safe_serialization=True) in a trusted environment"
        )
    raise InvalidInputError(f"{folder} has no {weights}; the model folder is incomplete")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def names_a_transformer(name_or_path: str) -> bool:
    """Whether ``load_model(name_or_path)`` would give a diffusion transformer, read without loading it (a preset's
    family, a pipeline folder's index); False where the answer needs the model (``load_model`` then says why)."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path].family in {family for family, _ in _TRANSFORMER_PIPELINES.values()}
    folder = model_folder(name_or_path)
    try:
        return "transformer" in json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _load_folder(path: Path, device: str, with_pipeline: bool) -> LoadedModel:
    from diffusers import UNet2DConditionModel

    index = None
    if (path / "model_index.json").is_file():  # a whole pipeline folder
        index = _read_json(path / "model_index.json")
        if "transformer" in index:
            return _load_transformer_folder(path, index, device, with_pipeline)
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
    _check_safetensors(unet_dir)
    unet = _unet_from_config(config, unet_dir / "config.json")
    if device != "meta":  # meta: counting only, the architecture without weights
        unet = _from_pretrained(UNet2DConditionModel, unet_dir)
    sdxl = unet.config.addition_embed_type == "text_time" or (index or {}).get("_class_name") in _SDXL_PIPELINES
    family = "sdxl" if sdxl else ("sd21" if scheduler_config.get("prediction_type") == "v_prediction" else "sd15")
    model = LoadedModel(
        path.name, str(path), family, unet.to(device).eval(), scheduler_config,
        vae_scale_factor=_vae_scale_factor(path), text_len=_text_len(path), source_sha256=folder_digest(path),
    )
    if with_pipeline and index is not None and device != "meta":
        _load_pipeline_parts(model, path, index)
    return model


# Diffusion-transformer pipelines: their family, and the transformers classes of their text encoders.
_TRANSFORMER_PIPELINES = {"PixArtSigmaPipeline": ("pixart-sigma", "T5EncoderModel"),
                          "SanaPipeline": ("sana", "Gemma2Model")}
_PIPELINE_TEXT_LEN = 300  # PixArt-Sigma's and Sana's max_sequence_length


def _load_transformer_folder(path: Path, index: dict[str, Any], device: str, with_pipeline: bool) -> LoadedModel:
    """A PixArt-Sigma or Sana pipeline folder: the transformer, and with ``with_pipeline`` its text encoder,
    tokenizer and VAE (or DC-AE), from safetensors."""
    import diffusers

    pipeline = index.get("_class_name")
    if pipeline not in _TRANSFORMER_PIPELINES:
        raise InvalidInputError(f"{path} holds a {pipeline}; the diffusion-transformer pipelines cair-export takes are "
                                f"{', '.join(_TRANSFORMER_PIPELINES)}")
    family, encoder_class = _TRANSFORMER_PIPELINES[pipeline]
    folder = path / "transformer"
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    if config.get("_class_name") not in TRANSFORMERS:
        raise InvalidInputError(f"{folder}/config.json does not describe a {' or '.join(TRANSFORMERS)}; "
                                "is the pipeline folder complete?")
    if config.get("guidance_embeds") or config.get("use_additional_conditions"):
        raise InvalidInputError(f"{folder}: guidance-distilled (Sana Sprint) and resolution-conditioned transformers "
                                "are not supported yet")
    _check_safetensors(folder)
    cls = getattr(diffusers, config["_class_name"])
    if device == "meta":
        with torch.device("meta"):
            transformer = cls.from_config(config)
    else:
        transformer = _from_pretrained(cls, folder)
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    vae_config = _read_json(path / "vae" / "config.json") if (path / "vae" / "config.json").is_file() else {}
    blocks = vae_config.get("encoder_block_out_channels", vae_config.get("block_out_channels"))
    model = LoadedModel(path.name, str(path), family, transformer.to(device).eval(),
                        _read_json(scheduler_file) if scheduler_file.is_file() else {},
                        vae_scale_factor=vae_scale_factor(blocks), text_len=_PIPELINE_TEXT_LEN,
                        source_sha256=folder_digest(path))
    if with_pipeline and device != "meta" and all((path / part).is_dir() for part in ("text_encoder", "tokenizer", "vae")):
        import transformers
        from transformers import AutoTokenizer

        _check_safetensors(path / "text_encoder", "model.safetensors", "model.safetensors.index.json")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        except (OSError, ValueError) as error:
            raise InvalidInputError(f"cannot load the tokenizer from {path / 'tokenizer'}: {_first_line(error)}") from None
        encoder = _from_pretrained(getattr(transformers, encoder_class), path / "text_encoder")
        model.text_encoders.append(TextEncoder(encoder, tokenizer))
        _check_safetensors(path / "vae")
        vae_class = getattr(diffusers, vae_config.get("_class_name", "AutoencoderKL"))
        model.vae = _from_pretrained(vae_class, path / "vae", torch_dtype=torch.float32)
    return model


def _unet_from_config(config: dict[str, Any], path: Path) -> Any:
    """The UNet a config describes, on the meta device (no weights): a nonsense field fails here, naming the file."""
    from diffusers import UNet2DConditionModel

    sample_size = config.get("sample_size")
    if not (isinstance(sample_size, int) and sample_size > 0):
        raise InvalidInputError(f"{path}: sample_size {sample_size!r} is not a positive whole number (latent pixels); "
                                "fix the file or re-download the model")
    try:
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(config)
    except Exception as error:  # diffusers raises whatever a bad field trips over (TypeError, ZeroDivisionError...)
        raise InvalidInputError(f"{path} does not describe a UNet2DConditionModel ({_first_line(error)}); "
                                "fix the file or re-download the model") from None


def _from_pretrained(cls: Any, folder: Path, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` from a local safetensors folder, without the libraries' loading chatter."""
    from transformers.utils import logging as transformers_logging

    if cls.__module__.startswith("diffusers"):
        # Without accelerate diffusers falls back to this anyway, with a warning on every load.
        kwargs.setdefault("low_cpu_mem_usage", False)
    progress_bar = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # "Loading weights" bars, one per text encoder
    try:
        return cls.from_pretrained(folder, use_safetensors=True, local_files_only=True, **kwargs).eval()
    except (OSError, ValueError, RuntimeError, TypeError) as error:
        raise InvalidInputError(f"cannot load {cls.__name__} from {folder}: {_first_line(error)}") from None
    finally:
        if progress_bar:
            transformers_logging.enable_progress_bar()


def _load_pipeline_parts(model: LoadedModel, path: Path, index: dict[str, Any]) -> None:
    """Text encoder(s), tokenizer(s) and VAE of a pipeline folder, when all are present."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    names = [("text_encoder", "tokenizer")] + ([("text_encoder_2", "tokenizer_2")] if model.family == "sdxl" else [])
    if not all((path / part).is_dir() for pair in names for part in pair) or not (path / "vae").is_dir():
        return  # a UNet-only export; the manifest says so
    for encoder_dir, tokenizer_dir in names:
        _check_safetensors(path / encoder_dir, "model.safetensors", "model.safetensors.index.json")
        class_name = index.get(encoder_dir, [None, "CLIPTextModel"])[1]
        cls = CLIPTextModelWithProjection if class_name == "CLIPTextModelWithProjection" else CLIPTextModel
        try:
            tokenizer = CLIPTokenizer.from_pretrained(path / tokenizer_dir, local_files_only=True)
        except (OSError, ValueError) as error:
            raise InvalidInputError(f"cannot load the tokenizer from {path / tokenizer_dir}: {_first_line(error)}") from None
        model.text_encoders.append(TextEncoder(_from_pretrained(cls, path / encoder_dir), tokenizer))
    _check_safetensors(path / "vae")
    model.vae = _from_pretrained(AutoencoderKL, path / "vae", torch_dtype=torch.float32)
    model.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", model.family == "sdxl"))


def folder_digest(path: Path) -> str:
    """sha256 over a model folder's configs, vocabularies and safetensors (names and contents)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".txt", ".safetensors")):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _vae_scale_factor(path: Path) -> int:
    config = path / "vae" / "config.json"
    if not config.is_file():
        return DEFAULT_VAE_SCALE_FACTOR  # a UNet folder alone: Stable Diffusion's VAE
    return vae_scale_factor(_read_json(config).get("block_out_channels", [0, 0, 0, 0]))


def _text_len(path: Path) -> int:
    for config, key in (("tokenizer/tokenizer_config.json", "model_max_length"),
                        ("text_encoder/config.json", "max_position_embeddings")):
        value = _read_json(path / config).get(key) if (path / config).is_file() else None
        if isinstance(value, int) and 0 < value < 100_000:
            return value
    return 77
