"""DeepCache's cut of a diffusers UNet: the deep feature a full evaluation keeps, the shallow evaluation.

Port of DeepCache's ``DeepCacheSDHelper`` (PyPI ``DeepCache`` 0.1.1, ``extension/deepcache.py``;
Ma et al. 2024). A branch id ``b`` names ``cache_block_id = b // 3`` (a down block, mirrored by an
up block) and ``cache_layer_id = b % 3`` (a layer inside it). Between full steps the helper
replays every module below the branch and recomputes the rest: conv_in and the time embedding,
down blocks ``< block``, the first ``layer`` layers of down block ``block``, the mirrored up
block's last ``layer + 1`` layers (and its upsampler), every later up block, conv_out. The only
replayed tensor the recomputed part reads is the hidden state entering the mirrored up block's
first recomputed layer: the *deep feature*. Here it is an explicit input, so the shallow step is a
static graph.

Diffusion transformers have no skip branch; their cut (``BlockRange``) replays the residual of a middle
range of blocks between freshly computed outer ones, and the same graphs and schedules carry it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from cair_export.core.denoiser import predict_noise
from cair_runtime.errors import InvalidInputError

DEEP_FEATURE = "deep_feature"  # graph tensor name: fidelity's extra output, shallow's input


@dataclass(frozen=True)
class DeepBranch:
    """Where DeepCache cuts the UNet, and the deep feature it keeps there."""

    branch: int  # DeepCache's cache_branch_id
    block: int  # cache_block_id = branch // 3: down block index (up block ``up_block`` mirrors it)
    layer: int  # cache_layer_id = branch % 3: down layers recomputed; the up block recomputes layer + 1
    up_block: int  # diffusers index of the mirrored up block: len(up_blocks) - 1 - block
    up_layer: int  # first recomputed layer of that up block: len(its resnets) - 1 - layer
    channels: int  # the deep feature's channels
    level: int  # its spatial level: (B, channels, cdiv(latent_height, 2**level), cdiv(latent_width, 2**level))

    def source(self, unet: torch.nn.Module) -> torch.nn.Module:
        """The module whose output is the deep feature in a full evaluation."""
        if self.up_layer > 0:
            up = unet.up_blocks[self.up_block]
            layers = getattr(up, "attentions", None) or up.resnets
            return layers[self.up_layer - 1]
        return unet.up_blocks[self.up_block - 1] if self.up_block > 0 else unet.mid_block

    def as_dict(self) -> dict[str, int | str]:
        return {"name": DEEP_FEATURE, "branch": self.branch, "block": self.block, "layer": self.layer,
                "up_block": self.up_block, "up_layer": self.up_layer, "channels": self.channels, "level": self.level}


@dataclass(frozen=True)
class BlockRange:
    """A diffusion transformer's cut: the middle blocks ``start..stop-1`` whose residual a full evaluation keeps.

    The analogue of DeepCache's branch for a plain stack of blocks (Delta-DiT's residual cache): replaying the
    middle range's *output* would drop the fresh features of the blocks before it, so the deep feature is its
    residual (output minus input), (B, tokens, width). Branch ``b`` keeps the ``b + 1`` outermost blocks at each
    end, as DeepCache's branch 0 keeps the UNet's outermost layer.
    """

    branch: int
    start: int  # first replayed block
    stop: int  # one past the last replayed block
    channels: int  # the transformer's width
    level: int  # log2(patch size): tokens = latent pixels / patch_size**2

    def as_dict(self) -> dict[str, int | str]:
        return {"name": DEEP_FEATURE, "kind": "blocks", "branch": self.branch, "start": self.start, "stop": self.stop,
                "channels": self.channels, "level": self.level}


def block_range(model: torch.nn.Module, branch: int) -> BlockRange:
    """A transformer's cut for branch ``b``: blocks ``b + 1 .. N - b - 2`` replayed; at least one of them."""
    blocks = len(model.transformer_blocks)
    start, stop = branch + 1, blocks - branch - 1
    if stop <= start:
        raise InvalidInputError(f"deep branch {branch} keeps {branch + 1} blocks at each end of this transformer's "
                                f"{blocks}, leaving none to replay; use a branch in 0..{(blocks - 3) // 2}"
                                if blocks >= 3 else f"this transformer has {blocks} blocks: too few to replay a middle "
                                "range (export with --deep-branch none)", field="deep_branch")
    width = model.transformer_blocks[0].norm1.normalized_shape[0]
    return BlockRange(branch, start, stop, width, int(model.config.patch_size).bit_length() - 1)


def deep_branch(unet: torch.nn.Module, branch: int) -> DeepBranch | BlockRange:
    """DeepCache's branch id -> the cut in this UNet (or a transformer's block range); a branch the model lacks
    is refused."""
    if isinstance(branch, bool) or not isinstance(branch, int) or branch < 0:
        raise InvalidInputError(f"deep branch {branch!r} must be a non-negative integer (DeepCache's cache_branch_id)",
                                field="deep_branch")
    if hasattr(unet, "transformer_blocks"):
        return block_range(unet, branch)
    block, layer = branch // 3, branch % 3
    blocks = len(unet.down_blocks)
    if block >= blocks:
        raise InvalidInputError(f"deep branch {branch} names down block {block}; this UNet has {blocks} "
                                f"(use a branch in 0..{3 * blocks - 1})", field="deep_branch")
    up_block = len(unet.up_blocks) - 1 - block
    up_layers = len(unet.up_blocks[up_block].resnets)
    if layer >= up_layers:
        raise InvalidInputError(f"deep branch {branch} names layer {layer} of block {block}, whose up block has "
                                f"{up_layers} layers; use a branch b with b % 3 < {up_layers}", field="deep_branch")
    up_layer = up_layers - 1 - layer
    if up_layer > 0:
        channels = unet.up_blocks[up_block].resnets[up_layer - 1].out_channels
    elif up_block > 0:
        channels = unet.up_blocks[up_block - 1].resnets[-1].out_channels
    else:
        channels = unet.config.block_out_channels[-1]
    deepest = len(unet.config.block_out_channels) - 1
    return DeepBranch(branch, block, layer, up_block, up_layer, channels, deepest - up_block)


@contextlib.contextmanager
def recorded_deep_feature(unet: torch.nn.Module, branch: DeepBranch | BlockRange) -> Iterator[list[torch.Tensor]]:
    """Within the block, each UNet evaluation appends its deep feature to the yielded list (a transformer's: the
    residual of its middle blocks)."""
    recorded: list[torch.Tensor] = []
    if isinstance(branch, BlockRange):
        entering: list[torch.Tensor] = []
        blocks = unet.transformer_blocks
        handles = [blocks[branch.start].register_forward_pre_hook(lambda module, args: entering.append(args[0])),
                   blocks[branch.stop - 1].register_forward_hook(
                       lambda module, args, output: recorded.append(output - entering.pop()))]
    else:
        def hook(module, args, output):
            recorded.append(output[0] if isinstance(output, tuple) else output)

        handles = [branch.source(unet).register_forward_hook(hook)]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


class _AddResidual(torch.nn.Module):
    """Stands in for a transformer's middle blocks: the block call's hidden state plus the kept residual."""

    def __init__(self, residual: torch.Tensor):
        super().__init__()
        self.residual = residual

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states + self.residual


@contextlib.contextmanager
def middle_blocks_replayed(model: torch.nn.Module, branch: BlockRange, residual: torch.Tensor) -> Iterator[None]:
    """The transformer with its blocks ``start..stop-1`` replaced by adding ``residual``: its own forward (embeddings,
    the outer blocks, the output head) runs the shallow evaluation."""
    blocks = model.transformer_blocks
    model.transformer_blocks = torch.nn.ModuleList([*blocks[:branch.start], _AddResidual(residual),
                                                    *blocks[branch.stop:]])
    try:
        yield
    finally:
        model.transformer_blocks = blocks


def shallow_unet(unet: torch.nn.Module, branch: DeepBranch | BlockRange, sample: torch.Tensor, timestep: torch.Tensor,
                 deep_feature: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                 added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One shallow evaluation: ``noise_pred`` from the blocks outside the branch and the kept ``deep_feature``.

    The preamble and the block calls follow diffusers' ``UNet2DConditionModel.forward`` (no
    ControlNet, adapters, masks or FreeU); the partial blocks run their layers as the blocks' own
    forwards do. Cross-attention goes through the installed processors, so CAIR's replayed caches
    apply (``encoder_hidden_states`` is then None). A transformer's (``BlockRange``): its own forward with the
    middle blocks replaced by the kept residual; ``added_cond_kwargs`` are then ``predict_noise``'s conditions
    (the text mask).
    """
    if isinstance(branch, BlockRange):
        with middle_blocks_replayed(unet, branch, deep_feature):
            return predict_noise(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs)
    forward_upsample_size = any(dim % 2 ** unet.num_upsamplers != 0 for dim in sample.shape[-2:])
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs)
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    if encoder_hidden_states is not None:
        encoder_hidden_states = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    context = {"encoder_hidden_states": encoder_hidden_states}

    def layer(block: torch.nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        hidden = block.resnets[index](hidden, emb)
        if getattr(block, "attentions", None):
            hidden = block.attentions[index](hidden, **context, return_dict=False)[0]
        return hidden

    hidden = unet.conv_in(sample)
    skips = (hidden,)
    for down in unet.down_blocks[:branch.block]:
        extra = context if getattr(down, "has_cross_attention", False) else {}
        hidden, res = down(hidden_states=hidden, temb=emb, **extra)
        skips += res
    down = unet.down_blocks[branch.block]
    for index in range(min(branch.layer, len(down.resnets))):  # the first `layer` layers of the cut block
        hidden = layer(down, index, hidden)
        skips += (hidden,)

    hidden = deep_feature  # (B, channels, ...): what the replayed modules below the branch produced
    for position in range(branch.up_block, len(unet.up_blocks)):
        up = unet.up_blocks[position]
        first = branch.up_layer if position == branch.up_block else 0
        count = len(up.resnets) - first
        res, skips = skips[-count:], skips[:-count]
        upsample_size = skips[-1].shape[2:] if forward_upsample_size and position < len(unet.up_blocks) - 1 else None
        if first == 0:
            extra = context if getattr(up, "has_cross_attention", False) else {}
            hidden = up(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size,
                        **extra)
            continue
        for index in range(first, len(up.resnets)):  # the cut up block's last layers, as its forward runs them
            hidden, res = torch.cat([hidden, res[-1]], dim=1), res[:-1]
            hidden = layer(up, index, hidden)
        for upsampler in up.upsamplers or ():
            hidden = upsampler(hidden, upsample_size)

    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)


def shallow_module_paths(unet: torch.nn.Module, branch: DeepBranch) -> frozenset[str]:
    """Paths of the Linear and Conv2d modules a shallow evaluation runs (the rest lie below the branch).

    Found by running one shallow evaluation at the smallest latent size with forward hooks (zeros
    in; a one-token context, so cross-attention runs as it would without CAIR's caches): the
    run-time LoRA map looks for these weights, and only these, among the shallow graph's.
    """
    paths = {module: path for path, module in unet.named_modules()
             if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
    ran: set[str] = set()
    hooks = [module.register_forward_hook(lambda module, args, output: ran.add(paths[module])) for module in paths]
    parameter = next(unet.parameters())
    zeros = lambda *shape: torch.zeros(*shape, device=parameter.device, dtype=parameter.dtype)  # noqa: E731
    config, size = unet.config, 2 ** unet.num_upsamplers
    level = 2 ** branch.level
    added = None
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": zeros(1, pooled), "time_ids": zeros(1, 6)}
    try:
        with torch.no_grad():
            shallow_unet(unet, branch, zeros(1, config.in_channels, size, size), zeros(1),
                         zeros(1, branch.channels, -(-size // level), -(-size // level)),
                         zeros(1, 1, config.cross_attention_dim), added)
    finally:
        for hook in hooks:
            hook.remove()
    return frozenset(ran)
