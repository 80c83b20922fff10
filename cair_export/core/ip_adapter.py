"""IP-Adapter in the torch reference and the export: an image prompt through decoupled cross-attention.

IP-Adapter (diffusers' ``IPAdapterAttnProcessor2_0``) adds to every ``attn2`` a second attention
over a few image tokens: ``out = to_out(attn(q, text) + scale * attn(q, to_k_ip(ip), to_v_ip(ip)))``,
the tokens projected from a CLIP vision encoder's ``image_embeds`` (``ImageProjection``). Because
the term lives inside the cross-attention module, CAIR's cache at step n holds the combined output:
after n a step needs neither the image tokens nor the adapter's K/V, and the fidelity graph is the
plain model's.

The semantics are diffusers' (``IPAdapterMixin.load_ip_adapter`` and the pipelines'
``prepare_ip_adapter_image_embeds``): the unconditional half's image embedding is zeros, before the
projection; ``scale`` multiplies the image term (``set_ip_adapter_scale``). Plain IP-Adapter
(``image_proj.proj``: 4 tokens) with one image; Plus / FaceID variants are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from cair_runtime.errors import InvalidInputError

TINY = "tiny"  # ``tiny`` or ``tiny:SEED``: a seeded adapter and CLIP vision encoder (tiny presets, tests)
TOKENS = 4  # image tokens of a plain IP-Adapter's ImageProjection
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class IPAdapter:
    """An IP-Adapter applied to a UNet, with the image encoder and preprocessing it expects."""

    source: str  # the spec it was loaded from: a safetensors file or tiny[:SEED]
    image_embed_dim: int  # width of the image encoder's image_embeds, the adapter's input
    image_encoder: Any = None  # transformers CLIPVisionModelWithProjection (None: counting MACs only)
    image_processor: dict[str, Any] | None = None  # CLIP preprocessing (cair_runtime.images.clip_pixels' spec)
    sha256: str | None = None  # the adapter file's digest; None for a tiny one
    tokens: int = TOKENS

    def manifest_record(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "tokens": self.tokens,
                "image_embed_dim": self.image_embed_dim, "projection": "ImageProjection",
                "image_processor": self.image_processor}


def _error(message: str) -> InvalidInputError:
    return InvalidInputError(message, field="ip_adapter")


def read_ip_adapter(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """An IP-Adapter safetensors file as diffusers' state dict: ``{"image_proj": ..., "ip_adapter": ...}``.

    Pickles (``.bin``/``.pt``/``.ckpt`` or pickle bytes) are refused, as are missing, truncated or
    non-finite files and adapters this export does not take (Plus, FaceID), each with one line.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise _error(f"IP-Adapter {path} does not exist; give a .safetensors file (e.g. ip-adapter_sd15.safetensors)")
    with open(path, "rb") as handle:
        head = handle.read(9)  # safetensors: an 8-byte header length, then the JSON header's "{"
    pickled = head[8:9] != b"{" and head[:2] in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
    if path.suffix in _PICKLE_SUFFIXES or pickled:  # torch.save writes a zip (PK) or a bare pickle (0x80)
        raise _error(f"IP-Adapter {path} is a pickle; cair-export reads safetensors only: convert it in a trusted "
                     "environment (safetensors.torch.save_file)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise _error(f"cannot read IP-Adapter {path} ({str(error).splitlines()[0]}); the file is truncated or not "
                     "safetensors") from None
    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in tensors.items():
        group, _, name = key.partition(".")
        if group not in state or not name:
            raise _error(f"IP-Adapter {path} has a tensor {key!r}; an IP-Adapter holds image_proj.* and "
                         "ip_adapter.* tensors only")
        if not torch.isfinite(value).all():
            raise _error(f"IP-Adapter {path}: tensor {key!r} holds NaN or infinite values")
        state[group][name] = value.float()
    if "proj.weight" not in state["image_proj"]:
        kind = "Plus" if "latents" in state["image_proj"] else "FaceID or another variant"
        raise _error(f"IP-Adapter {path} is an IP-Adapter {kind} (no image_proj.proj.weight); only plain IP-Adapters "
                     "(ip-adapter_sd15, ip-adapter_sdxl) are supported")
    return state


def _cross_attention_paths(unet: torch.nn.Module) -> list[str]:
    """The cross-attention modules in diffusers' ``attn_processors`` order, which numbers an adapter's K/V
    1, 3, 5, ... (the self-attention between)."""
    return [name.removesuffix(".processor") for name in unet.attn_processors if not name.endswith("attn1.processor")]


def check_ip_adapter(unet: torch.nn.Module, state: dict[str, dict[str, torch.Tensor]], image_embed_dim: int,
                     source: str) -> None:
    """The adapter fits the UNet and the image encoder: one line naming the first mismatch."""
    sites = _cross_attention_paths(unet)
    cross = unet.config.cross_attention_dim
    projection = state["image_proj"]["proj.weight"]
    if projection.shape != (TOKENS * cross, image_embed_dim):
        raise _error(f"IP-Adapter {source} projects {projection.shape[1]}-wide image embeddings to "
                     f"{projection.shape[0] // TOKENS}-wide tokens; this UNet's cross-attention is {cross} wide and its "
                     f"image encoder gives {image_embed_dim}: the adapter was trained for another model")
    keys = {key.split(".")[0] for key in state["ip_adapter"]}
    if len(keys) != len(sites):
        raise _error(f"IP-Adapter {source} has K/V for {len(keys)} cross-attention modules, the UNet {len(sites)}: "
                     "the adapter was trained for another model")


def tiny_image_encoder(seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A seeded CLIP vision encoder (32 px images, 32-wide embeddings) and its preprocessing."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                              num_attention_heads=4, projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(config).eval()
    return encoder, clip_processor_spec({}, config.image_size)


def tiny_ip_adapter_state(unet: torch.nn.Module, image_embed_dim: int, seed: int
                          ) -> dict[str, dict[str, torch.Tensor]]:
    """A seeded plain IP-Adapter for ``unet`` in diffusers' layout, weights N(0, 1/fan_in)."""
    cross = unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * shape[-1] ** -0.5

    state = {"image_proj": {"proj.weight": draw(TOKENS * cross, image_embed_dim), "proj.bias": draw(TOKENS * cross),
                            "norm.weight": 1 + 0.1 * draw(cross), "norm.bias": 0.1 * draw(cross)},
             "ip_adapter": {}}
    for index, path in enumerate(_cross_attention_paths(unet)):
        for name in ("to_k_ip", "to_v_ip"):
            state["ip_adapter"][f"{2 * index + 1}.{name}.weight"] = draw(
                unet.get_submodule(path).to_out[0].out_features, cross)
    return state


def clip_processor_spec(config: dict[str, Any], image_size: int = 224) -> dict[str, Any]:
    """CLIP preprocessing from a ``preprocessor_config.json`` (CLIPImageProcessor's fields; missing sizes are
    the encoder's ``image_size``, the mean and deviation OpenAI CLIP's)."""
    size = config.get("size", {"shortest_edge": image_size})
    crop = config.get("crop_size", {"height": image_size, "width": image_size})
    shortest = size.get("shortest_edge") if isinstance(size, dict) else size
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    return {"shortest_edge": int(shortest), "crop_size": [int(crop["height"]), int(crop["width"])],
            "image_mean": [float(v) for v in config.get("image_mean", [0.48145466, 0.4578275, 0.40821073])],
            "image_std": [float(v) for v in config.get("image_std", [0.26862954, 0.26130258, 0.27577711])],
            "resample": "bicubic"}


def _image_encoder_folder(folder: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    import json

    from transformers import CLIPVisionModelWithProjection

    from cair_export.core.models.loading import _from_pretrained

    if not (folder / "config.json").is_file():
        raise _error(f"no image encoder at {folder} (a CLIPVisionModelWithProjection folder, as IP-Adapter releases "
                     "ship in image_encoder/): give --image-encoder FOLDER")
    if not any(folder.glob("*.safetensors")):
        raise _error(f"the image encoder {folder} has no .safetensors weights; cair-export reads safetensors only")
    encoder = _from_pretrained(CLIPVisionModelWithProjection, folder)
    processor = folder / "preprocessor_config.json"
    config = json.loads(processor.read_text()) if processor.is_file() else {}
    return encoder, clip_processor_spec(config, encoder.config.image_size)


def load_ip_adapter(spec: str, unet: torch.nn.Module, image_encoder: str | None = None) -> IPAdapter:
    """Apply an IP-Adapter to ``unet`` (in place: diffusers' ``_load_ip_adapter_weights``) and return it
    with its image encoder: ``tiny[:SEED]``, or a safetensors file with the encoder in ``image_encoder``
    (default: the ``image_encoder`` folder beside the file, as the h94/IP-Adapter release lays it out)."""
    if spec == TINY or spec.startswith(TINY + ":"):
        seed = spec.partition(":")[2] or "200"
        if not seed.isdigit():
            raise _error(f"IP-Adapter {spec!r}: the seed after 'tiny:' must be a whole number")
        encoder, processor = tiny_image_encoder(int(seed) + 1)
        state, digest = tiny_ip_adapter_state(unet, encoder.config.projection_dim, int(seed)), None
    else:
        state = read_ip_adapter(spec)
        digest = hashlib.sha256(Path(spec).read_bytes()).hexdigest()
        encoder, processor = _image_encoder_folder(Path(image_encoder) if image_encoder else
                                                   Path(spec).parent / "image_encoder")
    check_ip_adapter(unet, state, encoder.config.projection_dim, spec)
    unet._load_ip_adapter_weights([state])
    return IPAdapter(spec, encoder.config.projection_dim, encoder, processor, digest)


# The CLIP vision encoders published IP-Adapters read: ViT-H/14 (SD-1.5) and ViT-bigG/14 (SDXL).
PUBLISHED_IMAGE_EMBED_DIM = {"sd15": 1024, "sd21": 1024, "sdxl": 1280}


def ip_adapter_architecture(unet: torch.nn.Module, family: str) -> IPAdapter:
    """A plain IP-Adapter applied to a meta-device UNet (shapes only), for counting MACs; the image
    embedding as wide as the published adapters' encoder for the model family."""
    dim = PUBLISHED_IMAGE_EMBED_DIM[family]
    with torch.device("meta"):
        state = tiny_ip_adapter_state(unet, dim, 0)
    unet._load_ip_adapter_weights([state])
    return IPAdapter("architecture", dim)


def ip_processors(unet: torch.nn.Module) -> list[Any]:
    """The UNet's IP-Adapter attention processors (unwrapping CAIR's caching processor)."""
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

    found = []
    for module in unet.modules():
        if isinstance(module, Attention):
            processor = getattr(module.processor, "inner", module.processor)
            if isinstance(processor, IPAdapterAttnProcessor2_0):
                found.append(processor)
    return found


@contextlib.contextmanager
def adapter_scale(unet: torch.nn.Module, scale: float | torch.Tensor) -> Iterator[None]:
    """Every IP processor's scale set to ``scale`` (diffusers' ``set_ip_adapter_scale``), restored on exit;
    a tensor scale becomes a graph input when traced."""
    processors = ip_processors(unet)
    saved = [processor.scale for processor in processors]
    try:
        for processor in processors:
            processor.scale = [scale]
        yield
    finally:
        for processor, value in zip(processors, saved):
            processor.scale = value


@contextlib.contextmanager
def image_projection_removed(unet: torch.nn.Module) -> Iterator[None]:
    """The UNet without its image projection, for steps whose cross-attention replays its cache: it
    then needs no image embedding (and a traced graph holds no projection weights)."""
    projection = unet.encoder_hid_proj
    unet.encoder_hid_proj = None
    try:
        yield
    finally:
        unet.encoder_hid_proj = projection


def image_conditions(image_embeds: torch.Tensor, guided: bool) -> dict[str, list[torch.Tensor]]:
    """``added_cond_kwargs`` entries for (B, D) image embeddings: guided, the unconditional half zeros first."""
    if guided:
        image_embeds = torch.cat([torch.zeros_like(image_embeds), image_embeds])
    return {"image_embeds": [image_embeds.unsqueeze(1)]}  # one adapter, one image each row
