"""Built-in models that need no download.

``tiny-*`` presets are seeded random-init UNets (and diffusion transformers) small enough to export
in seconds, with the topology features of the release they are named after. ``sd15``/``sd21``/``sdxl``
``pixart-sigma``, ``sana`` (1.6B) and ``sana-600m`` are the published architectures (their ``config.json``, in ``arch/``) with random
weights, for cost and speed measurement.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

# The schedulers the public releases ship (their scheduler_config.json), shared betas.
_SD_BETAS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
SCHEDULER_SD15 = {
    "_class_name": "PNDMScheduler",
    **_SD_BETAS,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}
SCHEDULER_SD21 = {
    "_class_name": "DDIMScheduler",
    **_SD_BETAS,
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "set_alpha_to_one": False,
}
# PixArt-Sigma's scheduler_config.json: DPM-Solver++ on the linear betas of its training.
SCHEDULER_PIXART_SIGMA = {
    "_class_name": "DPMSolverMultistepScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}
# Sana's scheduler_config.json: Flow-DPM-Solver, DPM-Solver++ on flow-matching sigmas shifted by 3.
SCHEDULER_SANA = {
    "_class_name": "DPMSolverMultistepScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "flow_prediction",
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "final_sigmas_type": "zero",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}
SCHEDULER_SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    **_SD_BETAS,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}


@dataclass(frozen=True)
class TextEncoderSpec:
    """A tiny text encoder: its kind, width and the tokenizer conventions of the release."""

    hidden_size: int  # = the part of the UNet's context width it provides
    kind: str = "clip"  # "clip" (CLIPTextModel) | "t5" (T5EncoderModel, PixArt's) | "gemma2" (Gemma2Model, Sana's)
    with_projection: bool = False  # CLIPTextModelWithProjection (SDXL's second encoder): pooled text_embeds
    pad_token: str = "<|endoftext|>"  # OpenAI CLIP pads with EOS; OpenCLIP (SD-2.x, SDXL's 2nd) with "!"
    hidden_act: str = "quick_gelu"


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "sd15" | "sd21" | "sdxl" | "pixart-sigma" | "sana": which release's conventions the model follows
    unet_config: dict[str, Any]  # the denoiser's keyword arguments (a UNet2DConditionModel's unless said)
    scheduler_config: dict[str, Any]  # the model's own scheduler, diffusers config format
    description: str = ""
    seed: int = 0  # torch seed for the random init, so every build is identical
    # Tiny presets are whole pipelines: text encoder(s) and a VAE besides the UNet.
    text_encoders: tuple[TextEncoderSpec, ...] = ()
    vae_scaling_factor: float = 0.18215  # SD-1.x/2.x; SDXL's VAE (and PixArt's) uses 0.13025
    denoiser: str = "UNet2DConditionModel"  # or "PixArtTransformer2DModel", "SanaTransformer2DModel"
    text_len: int = 77  # the text encoder's window; PixArt-Sigma's and Sana's pipelines read 300 tokens
    vae_scale_factor: int = 8  # pixels per latent pixel: 8 for SD's VAE, 32 for Sana's DC-AE


# The tiny presets' tokenizer vocabulary: the `shapes` captions' words (cair_export.lab.shapes.data's
# caption_vocabulary, checked equal by a test), so tiny and shipped models tokenise alike.
TINY_WORDS = ("a", "above", "at", "background", "below", "black", "blue", "bottom", "center", "circle", "cross",
              "gray", "green", "in", "large", "left", "of", "on", "orange", "purple", "red", "right", "small",
              "square", "star", "the", "top", "triangle", "white", "yellow")

def _arch(name: str, part: str = "unet") -> dict[str, Any]:
    text = resources.files("cair_export.core.models.arch").joinpath(f"{name}-{part}.json").read_text()
    config = json.loads(text)
    config.pop("_class_name", None)
    return config


_TINY_COMMON = {
    "sample_size": 8,  # latent 8x8 = 64 px
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "norm_num_groups": 8,
}

_TINY_SD15 = {
    **_TINY_COMMON,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,  # CLIP ViT-L/14 width, as SD-1.5
    "attention_head_dim": 8,
    "use_linear_projection": False,  # conv proj_in/proj_out, as SD-1.5
}

_TINY_SD21 = {
    **_TINY_SD15,
    "cross_attention_dim": 1024,  # OpenCLIP ViT-H/14 width, as SD-2.1
    "attention_head_dim": (2, 4, 8),  # per-level heads, as SD-2.1's [5, 10, 20, 20]
    "use_linear_projection": True,
    "upcast_attention": True,
}

_TINY_SDXL = {
    **_TINY_COMMON,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 2048,  # CLIP-L (768) + OpenCLIP bigG (1280) penultimate states
    "attention_head_dim": (2, 4, 8),
    "use_linear_projection": True,
    "transformer_layers_per_block": (1, 1, 2),  # deeper levels get more layers, as [1, 2, 10]
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 1280 + 6 * 8,  # pooled text_embeds + 6 time_ids
}

# PixArt-Sigma's transformer in small: patch 2 (tokens = latent pixels / 4), adaLN-single, attn2 reading T5.
_TINY_PIXART_SIGMA = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 8,  # learned sigma: the pipeline keeps the first 4 channels
    "patch_size": 2,
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "cross_attention_dim": 32,
    "caption_channels": 32,  # the T5 encoder's width
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "use_additional_conditions": False,  # Sigma: no resolution/aspect embedding
    "interpolation_scale": 1,
}

# Sana's linear diffusion transformer in small: patch 1, ReLU linear self-attention, Mix-FFN (GLUMBConv),
# no position embedding, attn2 reading the caption projection of Gemma-2's states (RMS-normed).
_TINY_SANA = {
    "sample_size": 8,
    "in_channels": 8,
    "out_channels": 8,
    "patch_size": 1,
    "num_layers": 4,  # a middle range to replay between the outer blocks (the deep-feature cut)
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_cross_attention_heads": 2,
    "cross_attention_head_dim": 16,
    "cross_attention_dim": 32,
    "caption_channels": 32,  # the Gemma-2 encoder's width
    "mlp_ratio": 2.5,
}

# Tiny DC-AE (Sana's deep-compression autoencoder): six levels (32x, as Sana's), the last three with
# EfficientViT (ReLU linear attention) blocks, RMS norms in the decoder, as dc-ae-f32c32-sana-1.0.
TINY_DC_AE = {
    "in_channels": 3,
    "latent_channels": 8,
    "attention_head_dim": 8,
    "encoder_block_types": ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    "decoder_block_types": ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    "encoder_block_out_channels": (8, 8, 16, 16, 16, 16),
    "decoder_block_out_channels": (8, 8, 16, 16, 16, 16),
    "encoder_layers_per_block": (1, 1, 1, 1, 1, 1),
    "decoder_layers_per_block": (1, 1, 1, 1, 1, 1),
    "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "upsample_block_type": "interpolate",
    "downsample_block_type": "Conv",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
}

# Tiny VAE: four levels (8x, as SD's), a few channels.
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
}

PRESETS: dict[str, Preset] = {
    "tiny-sd15": Preset("tiny-sd15", "sd15", _TINY_SD15, SCHEDULER_SD15,
                        description="seeded tiny SD-1.5-style pipeline (epsilon, conv projection)",
                        text_encoders=(TextEncoderSpec(768),)),
    "tiny-sd21": Preset("tiny-sd21", "sd21", _TINY_SD21, SCHEDULER_SD21,
                        description="seeded tiny SD-2.1-style pipeline (v-prediction, linear projection)",
                        text_encoders=(TextEncoderSpec(1024, pad_token="!", hidden_act="gelu"),)),
    "tiny-sdxl": Preset("tiny-sdxl", "sdxl", _TINY_SDXL, SCHEDULER_SDXL,
                        description="seeded tiny SDXL-style pipeline (two text encoders, text_time conditioning)",
                        text_encoders=(TextEncoderSpec(768),
                                       TextEncoderSpec(1280, with_projection=True, pad_token="!", hidden_act="gelu")),
                        vae_scaling_factor=0.13025),
    "tiny-pixart-sigma": Preset("tiny-pixart-sigma", "pixart-sigma", _TINY_PIXART_SIGMA, SCHEDULER_PIXART_SIGMA,
                                description="seeded tiny PixArt-Sigma-style pipeline (diffusion transformer, T5)",
                                text_encoders=(TextEncoderSpec(32, kind="t5"),), vae_scaling_factor=0.13025,
                                denoiser="PixArtTransformer2DModel", text_len=300),
    "tiny-sana": Preset("tiny-sana", "sana", _TINY_SANA, SCHEDULER_SANA,
                        description="seeded tiny Sana-style pipeline (linear diffusion transformer, Gemma-2, DC-AE)",
                        text_encoders=(TextEncoderSpec(32, kind="gemma2"),), vae_scaling_factor=0.41407,
                        denoiser="SanaTransformer2DModel", text_len=300, vae_scale_factor=32),
    "sd15": Preset("sd15", "sd15", _arch("sd15"), SCHEDULER_SD15,
                   description="SD-1.5 UNet architecture, random weights (512 px)"),
    "sd21": Preset("sd21", "sd21", _arch("sd21"), SCHEDULER_SD21,
                   description="SD-2.1 UNet architecture, random weights (768 px, v-prediction)"),
    "sdxl": Preset("sdxl", "sdxl", _arch("sdxl"), SCHEDULER_SDXL,
                   description="SDXL base UNet architecture, random weights (1024 px)"),
    "pixart-sigma": Preset("pixart-sigma", "pixart-sigma",
                           _arch("pixart-sigma", "transformer"), SCHEDULER_PIXART_SIGMA,
                           description="PixArt-Sigma XL/2 transformer architecture, random weights (1024 px)",
                           denoiser="PixArtTransformer2DModel", vae_scaling_factor=0.13025, text_len=300),
    "sana": Preset("sana", "sana", _arch("sana", "transformer"), SCHEDULER_SANA,
                   description="Sana 1.6B linear transformer architecture, random weights (1024 px, DC-AE 32x)",
                   denoiser="SanaTransformer2DModel", vae_scaling_factor=0.41407, text_len=300, vae_scale_factor=32),
    "sana-600m": Preset("sana-600m", "sana", _arch("sana-600m", "transformer"), SCHEDULER_SANA,
                        description="Sana 0.6B linear transformer architecture, random weights (1024 px, DC-AE 32x)",
                        denoiser="SanaTransformer2DModel", vae_scaling_factor=0.41407, text_len=300,
                        vae_scale_factor=32),
}
