"""ControlNet in the torch reference: what the residuals are at each step, as diffusers defines them.

A ControlNet (diffusers' ``ControlNetModel``) is a copy of the UNet's encoder that reads a control
image and adds one residual to each of the UNet's skip connections and to its mid block. Its own
transformer blocks have cross-attention (``attn2``) like the UNet's: CAIR caches those at step n
too (``CrossAttentionCache(..., controlnets=...)``), so after n a ControlNet step costs its
convolutions and self-attention only, the control image still acting on every step.

The semantics are those of diffusers' ``StableDiffusion(XL)ControlNetPipeline``:

- ``control_guidance_start/end``: net j acts at step i (of E evaluations) unless ``i / E < start_j``
  or ``(i + 1) / E > end_j`` (``controlnet_keep``); outside, its scale is 0 and it still runs;
- ``guess_mode``: the residuals are scaled by ``logspace(-1, 0, R)`` (shallow to deep) on top of the
  conditioning scale, and on guided steps only the conditional half receives them (diffusers runs
  the net on that half alone; here it runs on both and the unconditional half's residuals are
  zeroed, the same numbers);
- several nets: their residuals are summed (``MultiControlNetModel``).

Nothing here runs at deployment: the runtime gets the same from the exported graphs.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from cair_runtime.control import ControlRequest
from cair_runtime.errors import InvalidInputError


def control_residuals(controlnets: Sequence[torch.nn.Module], images: Sequence[torch.Tensor],
                      request: ControlRequest, keep: Sequence[float], latent_input: torch.Tensor,
                      timestep: Any, context: torch.Tensor | None, conditions: dict[str, torch.Tensor] | None,
                      guided: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The summed down and mid residuals of every net for one evaluation at the batch of ``latent_input``.

    ``images[j]``: net j's control image (B, C, H, W) in [0, 1], repeated here to the evaluation's
    batch; ``context`` None on fidelity steps (the nets' ``attn2`` replay their caches).
    """
    batch = latent_input.shape[0]
    down, mid = None, None
    for net, image, scale, keep_j in zip(controlnets, images, request.scales, keep):
        control = image.repeat(batch // image.shape[0], 1, 1, 1) if image.shape[0] != batch else image
        samples, middle = net(latent_input, timestep, encoder_hidden_states=context, controlnet_cond=control,
                              conditioning_scale=scale * keep_j, guess_mode=request.guess_mode,
                              added_cond_kwargs=conditions, return_dict=False)
        if request.guess_mode and guided:  # only the conditional half (the second) gets them
            samples = [torch.cat([torch.zeros_like(s.chunk(2)[1]), s.chunk(2)[1]]) for s in samples]
            middle = torch.cat([torch.zeros_like(middle.chunk(2)[1]), middle.chunk(2)[1]])
        if down is None:
            down, mid = list(samples), middle
        else:
            down, mid = [a + b for a, b in zip(down, samples)], mid + middle
    return down, mid


def check_controlnet(unet: torch.nn.Module, net: torch.nn.Module) -> None:
    """A ControlNet fits a UNet when its encoder mirrors the UNet's: refuse one that does not, naming why."""
    fields = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type")
    for name in fields:
        ours, theirs = unet.config.get(name), net.config.get(name)
        if ours is not None and theirs is not None and tuple(ours if isinstance(ours, (list, tuple)) else [ours]) \
                != tuple(theirs if isinstance(theirs, (list, tuple)) else [theirs]):
            raise InvalidInputError(f"the ControlNet's {name} is {theirs}, the UNet's {ours}: it was trained for "
                                    "another model", field="controlnet")


TINY = "tiny"  # ``tiny`` or ``tiny:SEED``: a seeded ControlNet for the UNet (tiny presets, tests)


def load_controlnet(spec: str, unet: torch.nn.Module) -> torch.nn.Module:
    """A ControlNet for ``unet``: ``tiny[:SEED]`` (seeded, ``tiny_controlnet``) or a diffusers
    ``ControlNetModel`` folder (``config.json`` and safetensors weights; pickles are refused). The
    spec is kept on the module (``cair_source``) for the manifest."""
    from pathlib import Path

    if spec == TINY or spec.startswith(TINY + ":"):
        seed = spec.partition(":")[2] or "100"
        if not seed.isdigit():
            raise InvalidInputError(f"ControlNet {spec!r}: the seed after 'tiny:' must be a whole number",
                                    field="controlnet")
        net = tiny_controlnet(unet, int(seed))
    else:
        folder = Path(spec)
        if not (folder / "config.json").is_file():
            raise InvalidInputError(f"ControlNet {spec!r} is not a diffusers ControlNetModel folder (no config.json); "
                                    "give a folder, or tiny[:SEED]", field="controlnet")
        if not any(folder.glob("*.safetensors")):
            raise InvalidInputError(f"ControlNet {spec!r} has no .safetensors weights; cair-export reads safetensors "
                                    "only (convert pickled weights in a trusted environment)", field="controlnet")
        from diffusers import ControlNetModel

        net = ControlNetModel.from_pretrained(folder, use_safetensors=True).eval()
    check_controlnet(unet, net)
    net.cair_source = spec
    return net


def controlnet_architecture(spec: str, unet: torch.nn.Module) -> torch.nn.Module:
    """A ControlNet's architecture on the meta device (no weights), for counting MACs: ``unet`` (the
    one ``ControlNetModel.from_unet`` derives, as published ControlNets are), ``tiny[:SEED]``, or a
    ControlNetModel folder's ``config.json``."""
    from pathlib import Path

    from diffusers import ControlNetModel

    with torch.device("meta"):
        if spec == "unet":
            net = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
        elif spec == TINY or spec.startswith(TINY + ":"):
            net = ControlNetModel.from_unet(unet, load_weights_from_unet=False,
                                            conditioning_embedding_out_channels=(8, 16, 16, 16))
        else:
            if not (Path(spec) / "config.json").is_file():
                raise InvalidInputError(f"ControlNet {spec!r} is not a ControlNetModel folder (no config.json); give "
                                        "a folder, 'unet' or tiny[:SEED]", field="controlnet")
            net = ControlNetModel.from_config(ControlNetModel.load_config(spec))
    check_controlnet(unet, net)
    return net.eval()


def tiny_controlnet(unet: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A seeded ControlNet for a tiny UNet: the UNet's encoder architecture with its own random weights.

    diffusers initialises the zero convolutions (the residual outputs and the conditioning
    embedding's last conv) to zero, which would make every residual exactly 0 and every test of
    them vacuous: they are drawn at random here (N(0, 1/fan_in) weights, small biases). The
    conditioning embedding's convolutions are drawn He-style (N(0, 2/fan_in), zero biases): with
    PyTorch's default init two control images give embeddings 1e-4 apart, too little to test.
    """
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Three stride-2 convs between these widths: the control image is downsampled 8x, the VAE's factor.
        net = ControlNetModel.from_unet(unet, load_weights_from_unet=False,
                                        conditioning_embedding_out_channels=(8, 16, 16, 16))
        for conv in net.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.normal_(conv.weight, std=(2 / conv.weight[0].numel()) ** 0.5)
                torch.nn.init.zeros_(conv.bias)
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            torch.nn.init.normal_(conv.weight, std=conv.weight[0].numel() ** -0.5)
            torch.nn.init.normal_(conv.bias, std=0.05)
    return net.eval()
