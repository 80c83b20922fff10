"""The CAIR graphs: their IO described once, as data, and the torch modules that trace them.

planning and fidelity always; ``shallow`` and ``shallow_planning`` (DeepCache's cut,
``core.deep_feature``: its step after n, on the caches, and before n, guided and reading the text)
when the export names a deep branch: fidelity and planning then also emit the deep feature the
shallow graphs take.

``graph_specs`` is the single description of every graph's inputs and outputs. Export (input
names, dynamic axes), validation (inputs at several shapes), the manifest and the runtime's
buffers are all derived from it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from cair_export.core.deep_feature import DEEP_FEATURE, BlockRange, DeepBranch, recorded_deep_feature, shallow_unet
from cair_export.core.ip_adapter import adapter_scale, image_projection_removed
from cair_export.core.models import LoadedModel
from cair_export.core.models.families import reads_positions
from cair_export.core.denoiser import predict_noise
from cair_export.core.reference import CrossAttentionCache, CrossAttentionSite
from cair_runtime.manifest import CacheSpec, Dim, TensorSpec

TIME_IDS = 6  # SDXL: original size (2), crop top-left (2), target size (2)
POSITION_EMBEDDING = "pos_embed"  # a diffusion transformer's position embedding input
# The UNet graphs, in the order each one's handoff check needs the one before.
UNET_KINDS = ("planning", "fidelity", "shallow", "shallow_planning")


@dataclass(frozen=True)
class GraphIO:
    kind: str  # "planning" | "fidelity" | "shallow" | "shallow_planning"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def _side(name: str, level: int) -> str:
    # Each stride-2 downsampling conv (padding 1) maps x to ceil(x / 2).
    return name if level == 0 else f"cdiv({name},{2**level})"


def cache_specs(sites: list[CrossAttentionSite]) -> tuple[CacheSpec, ...]:
    return tuple(CacheSpec(site.name, site.module, f"{_side('latent_height', site.level)}*"
                                                   f"{_side('latent_width', site.level)}", site.channels)
                 for site in sites)


def shallow_caches(caches: tuple[CacheSpec, ...], branch: DeepBranch | BlockRange) -> tuple[CacheSpec, ...]:
    """The caches of the cross-attention modules the shallow graph computes (outside the branch)."""
    def kept(module: str) -> bool:
        parts = module.split(".")  # e.g. up_blocks.2.attentions.1.transformer_blocks.0.attn2
        if isinstance(branch, BlockRange):  # transformer_blocks.7.attn2
            return not branch.start <= int(parts[1]) < branch.stop
        if parts[0] == "mid_block":
            return False
        block, layer = int(parts[1]), int(parts[3])
        if parts[0] == "down_blocks":
            return block < branch.block or (block == branch.block and layer < branch.layer)
        return block > branch.up_block or (block == branch.up_block and layer >= branch.up_layer)

    return tuple(cache for cache in caches if kept(cache.module))


def graph_dims(model: LoadedModel, height: int, width: int, max_batch: int,
               prompt_chunks: int = 1) -> tuple[Dim, ...]:
    """Symbolic dims with min/opt/max; latent sizes from half to twice the chosen pixel size; the
    text from one text-encoder window to ``prompt_chunks`` of them (long prompts, encoded in chunks)."""
    latent_height, latent_width = height // model.vae_scale_factor, width // model.vae_scale_factor
    patch = model.unet.config.patch_size if model.is_transformer else 1  # a transformer's sides: whole patches
    if model.is_transformer:
        prompt_chunks = 1  # T5 reads one window (PixArt-Sigma: 300 tokens); CLIP's 75-token chunks do not apply

    def half(side: int) -> int:
        return max(patch, side // 2 // patch * patch)

    return (
        Dim("batch", 1, 1, max_batch),
        Dim("latent_height", half(latent_height), latent_height, latent_height * 2),
        Dim("latent_width", half(latent_width), latent_width, latent_width * 2),
        Dim("text_len", model.text_len, model.text_len, model.text_len * prompt_chunks),
    )


def graph_specs(model: LoadedModel, caches: tuple[CacheSpec, ...], fidelity_guidance: str,
                branch: DeepBranch | BlockRange | None = None) -> dict[str, GraphIO]:
    """Ordered inputs and outputs of the planning and fidelity graphs, and of the shallow one with a ``branch``.

    With fidelity CFG the fidelity and shallow graphs run at batch 2B until the guidance stop and at
    B after it (the runtime merges the halves); their shapes say ``2*batch``, the longer phase.
    """
    config = model.unet.config
    fidelity_batch = "2*batch" if fidelity_guidance == "cfg" else "batch"
    # A diffusion transformer reads the text encoder's states (its caption projection is inside the graph)
    # and their mask, and predicts noise in the latent channels (a learned sigma is dropped inside).
    text_width = config.caption_channels if model.is_transformer else config.cross_attention_dim
    out_channels = config.in_channels if model.is_transformer else config.out_channels

    def latent(name: str, batch: str, channels: int) -> TensorSpec:
        return TensorSpec(name, "float32", (batch, channels, "latent_height", "latent_width"))

    def added(batch: str) -> tuple[TensorSpec, ...]:
        if not model.added_conditions:
            return ()
        pooled = config.projection_class_embeddings_input_dim - TIME_IDS * config.addition_time_embed_dim
        return (TensorSpec("text_embeds", "float32", (batch, pooled)),
                TensorSpec("time_ids", "float32", (batch, TIME_IDS)))

    def cache_tensors(batch: str) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(c.name, "float32", (batch, c.tokens, c.channels)) for c in caches)

    def control(batch: str) -> tuple[TensorSpec, ...]:
        """ControlNet inputs: each net's control image at the pixel size, and the factor on every residual
        of every net for each row (``cair_runtime.control.residual_scales``)."""
        if not model.controlnets:
            return ()
        factor = model.vae_scale_factor
        images = tuple(TensorSpec(f"control_image_{j}", "float32", (batch, net.config.conditioning_channels,
                                                                   f"{factor}*latent_height", f"{factor}*latent_width"))
                       for j, net in enumerate(model.controlnets))
        residuals = len(model.controlnets[0].controlnet_down_blocks) + 1
        return (*images, TensorSpec("control_scales", "float32", (batch, len(model.controlnets), residuals)))

    def image_prompt() -> tuple[TensorSpec, ...]:
        """IP-Adapter: the CLIP image embedding of each row (zeros in the unconditional half) and the
        adapter's scale; planning only: fidelity replays cross-attention outputs that include the image term."""
        if model.ip_adapter is None:
            return ()
        return (TensorSpec("ip_image_embeds", "float32", ("2*batch", model.ip_adapter.image_embed_dim)),
                TensorSpec("ip_adapter_scale", "float32", (1,)))

    def deep_feature(batch: str) -> tuple[TensorSpec, ...]:
        if branch is None:
            return ()
        if isinstance(branch, BlockRange):  # (B, tokens, width): the middle blocks' residual
            tokens = f"{_side('latent_height', branch.level)}*{_side('latent_width', branch.level)}"
            return (TensorSpec(DEEP_FEATURE, "float32", (batch, tokens, branch.channels)),)
        # (B, C_b, h_b, w_b): the hidden state entering the branch's up layer
        return (TensorSpec(DEEP_FEATURE, "float32", (batch, branch.channels, _side("latent_height", branch.level),
                                                     _side("latent_width", branch.level))),)

    timestep = TensorSpec("timestep", "float32", (1,))
    def position() -> tuple[TensorSpec, ...]:
        """A transformer's 2D sin-cos position embedding of the patch grid, given by the caller
        (``cair_runtime.positions``): the module recomputes it from Python ints at other sizes, which a
        trace would freeze at the trace size."""
        if not reads_positions(model.unet):
            return ()
        patch = config.patch_size
        tokens = f"{_side('latent_height', patch.bit_length() - 1)}*{_side('latent_width', patch.bit_length() - 1)}"
        width = config.num_attention_heads * config.attention_head_dim
        return (TensorSpec(POSITION_EMBEDDING, "float32", (1, tokens, width)),)

    text = TensorSpec("encoder_hidden_states", "float32", ("2*batch", "text_len", text_width))
    # A transformer's text states (T5's, Gemma-2's) come with their padding mask (1 keep, 0 drop), read by the
    # cross-attention only.
    text_mask = ((TensorSpec("encoder_attention_mask", "float32", ("2*batch", "text_len")),)
                 if model.is_transformer else ())
    planning = GraphIO(
        "planning",
        inputs=(latent("sample", "2*batch", config.in_channels), timestep, *position(), text, *text_mask,
                *added("2*batch"), *control("2*batch"), *image_prompt()),
        # Caches come out already merged to batch B (or per half with fidelity CFG); with a branch,
        # the deep feature too, for the guided shallow steps.
        outputs=(latent("noise_pred", "2*batch", out_channels), *cache_tensors(fidelity_batch),
                 *deep_feature("2*batch")),
    )
    deep = deep_feature(fidelity_batch)
    fidelity = GraphIO(
        "fidelity",
        inputs=(latent("sample", fidelity_batch, config.in_channels), timestep, *position(),
                *cache_tensors(fidelity_batch), *added(fidelity_batch), *control(fidelity_batch)),
        outputs=(latent("noise_pred", fidelity_batch, out_channels), *deep),
    )
    if branch is None:
        return {"planning": planning, "fidelity": fidelity}
    if model.controlnets or model.ip_adapter is not None:
        raise ValueError("the shallow graphs do not take ControlNets or IP-Adapters yet (export without a deep branch)")
    kept = {cache.name for cache in shallow_caches(caches, branch)}
    shallow = GraphIO(
        "shallow",
        inputs=(latent("sample", fidelity_batch, config.in_channels), timestep, *position(), *deep,
                *(spec for spec in cache_tensors(fidelity_batch) if spec.name in kept), *added(fidelity_batch)),
        outputs=(latent("noise_pred", fidelity_batch, out_channels),),
    )
    # DeepCache's own shallow step, before n: guided, the text read by the modules outside the
    # branch, whose caches it writes (the others keep the last full planning step's).
    shallow_planning = GraphIO(
        "shallow_planning",
        # The text only where a module outside the branch reads it (else the exporter drops the input).
        inputs=(latent("sample", "2*batch", config.in_channels), timestep, *position(),
                *((text, *text_mask) if kept else ()), *deep_feature("2*batch"), *added("2*batch")),
        outputs=(latent("noise_pred", "2*batch", out_channels),
                 *(spec for spec in cache_tensors(fidelity_batch) if spec.name in kept)),
    )
    return {"planning": planning, "fidelity": fidelity, "shallow": shallow, "shallow_planning": shallow_planning}


def make_inputs(io: GraphIO, dims: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs at concrete dims: normal tensors, timesteps in the training range."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in io.inputs:
        shape = spec.resolve(dims)
        if spec.name == "timestep":
            inputs[spec.name] = rng.uniform(1, 999, size=shape).astype(np.float32)
        elif spec.name == "time_ids":  # plausible sizes and crops, in pixels
            inputs[spec.name] = rng.choice([0.0, 64.0, 512.0, 1024.0], size=shape).astype(np.float32)
        elif spec.name.startswith("control_image_"):  # pixels / 255
            inputs[spec.name] = rng.uniform(0, 1, size=shape).astype(np.float32)
        elif spec.name == "control_scales":  # conditioning scales, some off (0)
            inputs[spec.name] = (rng.uniform(0, 2, size=shape) * rng.integers(0, 2, size=shape)).astype(np.float32)
        elif spec.name == "encoder_attention_mask":  # a prompt's tokens, then padding; at least one token
            lengths = rng.integers(1, shape[1] + 1, size=shape[0])
            inputs[spec.name] = (np.arange(shape[1])[None] < lengths[:, None]).astype(np.float32)
        elif spec.name == "ip_adapter_scale":
            inputs[spec.name] = rng.uniform(0.2, 1.5, size=shape).astype(np.float32)
        else:
            inputs[spec.name] = rng.standard_normal(shape, dtype=np.float32)
    return inputs


@contextlib.contextmanager
def traceable_transformer(model: torch.nn.Module, position: torch.Tensor) -> Iterator[None]:
    """A transformer whose patch embedding adds ``position`` (1, tokens, width) instead of computing it, traced
    without shape-dependent branches."""
    embed = model.pos_embed

    def forward(latent: torch.Tensor) -> torch.Tensor:
        latent = embed.proj(latent).flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, tokens, width)
        if embed.layer_norm:
            latent = embed.norm(latent)
        return latent + position

    embed.forward = forward
    projection = model.proj_out
    # The transformer squeezes the projection's (B, tokens, C) output at axis 1; on a dynamic token count the
    # exporter traces that as an If (squeeze only if 1), which OpenVINO cannot compile. One more axis of size 1
    # makes it a plain Squeeze of that axis: the same values.
    projection.forward = lambda hidden: type(projection).forward(projection, hidden).unsqueeze(1)
    try:
        yield
    finally:
        del embed.forward, projection.forward  # the classes' own again


def text_mask(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformer's text padding mask, as ``predict_noise`` takes it (none for UNets)."""
    return {"encoder_attention_mask": named["encoder_attention_mask"]} if "encoder_attention_mask" in named else {}


class CairGraph(torch.nn.Module):
    """The UNet as one CAIR graph, with positional inputs in ``io`` order (for tracing)."""

    def __init__(self, unet: torch.nn.Module, cache: CrossAttentionCache, io: GraphIO,
                 branch: DeepBranch | BlockRange | None = None, controlnets: tuple[torch.nn.Module, ...] = ()):
        super().__init__()
        self.unet, self.cache, self.io, self.branch = unet, cache, io, branch
        # Fused with the UNet, as NVIDIA's TensorRT demo does: one graph a step, the nets' attn2 cached
        # with the UNet's, every weight in the same shared file.
        self.controlnets = torch.nn.ModuleList(controlnets)
        self.input_names = [spec.name for spec in io.inputs]
        self.num_caches = len(cache.sites)

    def _residuals(self, named: dict[str, torch.Tensor], context: torch.Tensor | None,
                   added: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        """Every net at scale 1, each residual times its ``control_scales`` factor per row, summed over nets."""
        if not len(self.controlnets):
            return {}
        down, mid = None, None
        factors = named["control_scales"]  # (rows, nets, residuals)
        for j, net in enumerate(self.controlnets):
            samples, middle = net(named["sample"], named["timestep"], encoder_hidden_states=context,
                                  controlnet_cond=named[f"control_image_{j}"], added_cond_kwargs=added,
                                  return_dict=False)
            samples = [s * factors[:, j, r].reshape(-1, 1, 1, 1) for r, s in enumerate(samples)]
            middle = middle * factors[:, j, -1].reshape(-1, 1, 1, 1)
            down = samples if down is None else [a + b for a, b in zip(down, samples)]
            mid = middle if mid is None else mid + middle
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    @contextlib.contextmanager
    def _image_prompt(self, named: dict[str, torch.Tensor]) -> Iterator[dict[str, Any]]:
        """IP-Adapter: planning gets the image embedding as ``added_cond_kwargs`` entries and the scale as an
        input; a graph without them runs the UNet without its image projection. No IP-Adapter: nothing."""
        if getattr(self.unet, "encoder_hid_proj", None) is None:
            yield {}
        elif "ip_image_embeds" in named:
            scale = named["ip_adapter_scale"]  # an input of the traced graph
            with adapter_scale(self.unet, 1.0 if scale.is_meta else scale):  # meta: counting MACs, no values
                yield {"image_embeds": [named["ip_image_embeds"].unsqueeze(1)]}
        else:
            with image_projection_removed(self.unet):
                yield {}

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = dict(zip(self.input_names, inputs))
        if POSITION_EMBEDDING in named:
            with traceable_transformer(self.unet, named[POSITION_EMBEDDING]):
                return self._forward(named)
        return self._forward(named)

    def _forward(self, named: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        added = {key: named[key] for key in ("text_embeds", "time_ids") if key in named} or None
        if self.io.kind == "planning":
            self.cache.mode = "record"
            if self.branch is None:
                residuals = self._residuals(named, named["encoder_hidden_states"], added)
                with self._image_prompt(named) as image:
                    conditions = {**(added or {}), **image, **text_mask(named)} or None
                    noise_pred = predict_noise(self.unet, named["sample"], named["timestep"],
                                               named["encoder_hidden_states"], conditions, **residuals)
                return (noise_pred, *self.cache.values)
            with recorded_deep_feature(self.unet, self.branch) as recorded:
                noise_pred = predict_noise(self.unet, named["sample"], named["timestep"],
                                           named["encoder_hidden_states"], {**(added or {}), **text_mask(named)} or None)
            return (noise_pred, *self.cache.values, recorded[-1])
        if self.io.kind == "shallow_planning":
            self.cache.mode = "record"
            outputs = {spec.name for spec in self.io.outputs}
            noise_pred = shallow_unet(self.unet, self.branch, named["sample"], named["timestep"], named[DEEP_FEATURE],
                                      named.get("encoder_hidden_states"), {**(added or {}), **text_mask(named)} or None)
            return (noise_pred, *(value for site, value in zip(self.cache.sites, self.cache.values)
                                  if site.name in outputs))
        self.cache.mode = "replay"
        # The shallow graph takes only the caches of the modules it computes; the others stay None.
        self.cache.values = [named.get(site.name) for site in self.cache.sites]
        # No text input: every attn2 returns its cache, so encoder_hidden_states is never read.
        if self.io.kind == "shallow":
            return (shallow_unet(self.unet, self.branch, named["sample"], named["timestep"], named[DEEP_FEATURE],
                                 None, added),)
        if self.branch is None:
            residuals = self._residuals(named, None, added)
            with self._image_prompt(named):  # without the image projection: no image embedding to read
                return (predict_noise(self.unet, named["sample"], named["timestep"], None, added, **residuals),)
        with recorded_deep_feature(self.unet, self.branch) as recorded:
            noise_pred = predict_noise(self.unet, named["sample"], named["timestep"], None, added)
        return noise_pred, recorded[-1]


# --- the rest of the pipeline: text encoder(s) and VAE decoder, as diffusers runs them -----------


def reads_attention_mask(encoder: torch.nn.Module) -> bool:
    """A text encoder called with its tokens' mask: T5 (PixArt) and Gemma-2 (Sana), not CLIP."""
    return encoder.config.model_type in ("t5", "gemma2")


def text_encoder_io(kind: str, encoder: torch.nn.Module) -> GraphIO:
    """CLIP: ``input_ids`` -> last and penultimate hidden states, and the pooled embedding. T5 (PixArt),
    Gemma-2 (Sana): ``input_ids`` and their ``attention_mask`` (1 token, 0 padding) -> last hidden state."""
    config = encoder.config
    if reads_attention_mask(encoder):
        width = config.d_model if config.model_type == "t5" else config.hidden_size
        return GraphIO(kind, inputs=(TensorSpec("input_ids", "int64", ("batch", "text_len")),
                                     TensorSpec("attention_mask", "int64", ("batch", "text_len"))),
                       outputs=(TensorSpec("last_hidden_state", "float32", ("batch", "text_len", width)),))
    pooled = config.projection_dim if hasattr(encoder, "text_projection") else config.hidden_size
    hidden = ("batch", "text_len", config.hidden_size)
    return GraphIO(
        kind,
        inputs=(TensorSpec("input_ids", "int64", ("batch", "text_len")),),
        outputs=(TensorSpec("last_hidden_state", "float32", hidden),  # SD-1.x/2.x prompt embeddings
                 TensorSpec("penultimate_hidden_state", "float32", hidden),  # SDXL's (hidden_states[-2])
                 TensorSpec("pooled", "float32", ("batch", pooled))),  # SDXL text_embeds (2nd encoder)
    )


def vae_decoder_io(vae: torch.nn.Module, scale_factor: int) -> GraphIO:
    """Scaled latents (already divided by the VAE's scaling factor) -> image in [-1, 1]."""
    return GraphIO(
        "vae_decoder",
        inputs=(TensorSpec("latent_sample", "float32", ("batch", vae.config.latent_channels, "latent_height",
                                                        "latent_width")),),
        # DC-AE has one channel count for images in and out
        outputs=(TensorSpec("sample", "float32", ("batch", getattr(vae.config, "out_channels", vae.config.in_channels),
                                                  f"{scale_factor}*latent_height",
                                                  f"{scale_factor}*latent_width")),),
    )


def vae_encoder_io(vae: torch.nn.Module, scale_factor: int) -> GraphIO:
    """Image in [-1, 1] -> the mean and standard deviation of the VAE's latent distribution (unscaled).

    Both moments, so the runtime can take diffusers' ``retrieve_latents`` sample (``mean + std * noise``
    from the image's generator) or its mode (the mean).
    """
    latent = ("batch", vae.config.latent_channels, "latent_height", "latent_width")
    return GraphIO(
        "vae_encoder",
        inputs=(TensorSpec("sample", "float32", ("batch", vae.config.in_channels, f"{scale_factor}*latent_height",
                                                 f"{scale_factor}*latent_width")),),
        outputs=(TensorSpec("latent_mean", "float32", latent), TensorSpec("latent_std", "float32", latent)),
    )


def make_token_inputs(io: GraphIO, dims: dict[str, int], seed: int, vocab_size: int, eos: int, pad: int):
    """Seeded token ids shaped like a tokenizer's: BOS ... EOS, then padding."""
    rng = np.random.default_rng(seed)
    batch, length = io.inputs[0].resolve(dims)
    ids = np.full((batch, length), pad, dtype=np.int64)
    t5 = len(io.inputs) > 1  # T5: no start token, an attention mask over the tokens and EOS
    mask = np.zeros((batch, length), dtype=np.int64)
    for row in range(batch):
        words = int(rng.integers(1, length - 1))
        if t5:
            ids[row, :words] = rng.integers(3, vocab_size, size=words)  # past <pad>, </s>, <unk>
            ids[row, words] = eos
            mask[row, :words + 1] = 1
        else:
            ids[row, 0] = vocab_size - 2  # BOS sits just before EOS in CLIP's vocabulary layout
            ids[row, 1:words + 1] = rng.integers(0, vocab_size - 2, size=words)
            ids[row, words + 1] = eos
    return {"input_ids": ids, "attention_mask": mask} if t5 else {"input_ids": ids}


class TextEncoderGraph(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module, io: GraphIO):
        super().__init__()
        self.encoder, self.io = encoder.eval(), io  # eval: T5's dropout off
        self.input_names = [spec.name for spec in io.inputs]

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if attention_mask is not None:  # T5 or Gemma-2, as PixArt's and Sana's pipelines call them
            return (self.encoder(input_ids, attention_mask=attention_mask).last_hidden_state,)
        output = self.encoder(input_ids, output_hidden_states=True)
        pooled = output.text_embeds if hasattr(output, "text_embeds") else output.pooler_output
        return output.last_hidden_state, output.hidden_states[-2], pooled


@contextlib.contextmanager
def nonnegative_movedim() -> Iterator[None]:
    """``Tensor.movedim`` with its dims made non-negative: the TorchScript ONNX exporter writes a negative dim
    into a Transpose's perm, which ONNX refuses, and Sana's DC-AE moves channels to -1 around its RMS norms."""
    original = torch.Tensor.movedim

    def movedim(tensor: torch.Tensor, source: int, destination: int) -> torch.Tensor:
        return original(tensor, source % tensor.dim(), destination % tensor.dim())

    torch.Tensor.movedim = movedim
    try:
        yield
    finally:
        torch.Tensor.movedim = original


class VaeDecoderGraph(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module, io: GraphIO):
        super().__init__()
        self.vae, self.io = vae, io
        self.input_names = ["latent_sample"]

    def forward(self, latent_sample: torch.Tensor) -> tuple[torch.Tensor]:
        with nonnegative_movedim():
            return (self.vae.decode(latent_sample, return_dict=False)[0],)


class VaeEncoderGraph(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module, io: GraphIO):
        super().__init__()
        self.vae, self.io = vae, io
        self.input_names = ["sample"]

    def forward(self, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        distribution = self.vae.encode(sample, return_dict=False)[0]  # DiagonalGaussianDistribution (logvar clamped)
        return distribution.mean, distribution.std


def image_encoder_io(encoder: torch.nn.Module) -> GraphIO:
    """IP-Adapter's CLIP vision encoder: preprocessed pixels -> the projected ``image_embeds``."""
    config = encoder.config
    return GraphIO(
        "image_encoder",
        inputs=(TensorSpec("pixel_values", "float32", ("batch", config.num_channels, config.image_size,
                                                       config.image_size)),),
        outputs=(TensorSpec("image_embeds", "float32", ("batch", config.projection_dim)),),
    )


class ImageEncoderGraph(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module, io: GraphIO):
        super().__init__()
        self.encoder, self.io = encoder, io
        self.input_names = ["pixel_values"]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.encoder(pixel_values).image_embeds,)
