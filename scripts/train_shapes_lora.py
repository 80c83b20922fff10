"""Train the shipped LoRA for `shapes`: a "negative" style (every colour inverted, 255 - pixel).

The base model stays as it is; the adapter (rank 4 on the UNet's attention, feed-forward and
resnet convolutions) learns to draw the same scenes with inverted colours for the same captions,
so base vs adapter images differ at a glance. Data are the base model's own synthetic scenes
(`cair_export.lab.shapes.data`), inverted; the loss is the base model's epsilon objective on VAE
latents with 10% caption dropout (classifier-free guidance keeps working).

Writes `cair_export/lab/assets/shapes_lora/negative.safetensors` in diffusers' layout
(`save_lora_weights`, alpha in its metadata) and, with `--grid`, `docs/lora_shapes.png`: base vs
adapter through the torch-free runtime, swapping the adapter in and out of one exported engine.

    PYTHONPATH=.:runtime python scripts/train_shapes_lora.py --threads 1 --grid
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cair_export.assets import asset_path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
PROMPTS = ["a large red circle on a white background", "a small blue square on a yellow background",
           "a large green triangle on a black background", "a large purple star on a white background"]


def train(args: argparse.Namespace) -> Path:
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from cair_export.lab.shapes.data import generate

    torch.manual_seed(args.seed)
    pipe = StableDiffusionPipeline.from_pretrained(str(asset_path("shapes")), safety_checker=None)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=TARGETS)
    inject_adapter_in_model(config, unet)
    params = [p for name, p in unet.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)

    images, captions, _ = generate(args.images, seed=args.seed, caption_drop=0.3)
    negative = torch.from_numpy(255 - images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, 64, 64)
    with torch.no_grad():
        latents = torch.cat([vae.encode(negative[i:i + 256]).latent_dist.mean
                             for i in range(0, len(negative), 256)]) * vae.config.scaling_factor
        ids = tokenizer(captions + [""], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        text = torch.cat([text_encoder(ids[i:i + 256]).last_hidden_state for i in range(0, len(ids), 256)])
    empty, text = text[-1], text[:-1]
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas = scheduler.alphas_cumprod
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    unet.train()
    for step in range(args.steps):
        index = torch.randint(len(latents), (args.batch,), generator=gen)
        context = text[index].clone()
        context[torch.rand(args.batch, generator=gen) < 0.1] = empty
        noise = torch.randn(latents[index].shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(unet(a.sqrt() * latents[index] + (1 - a).sqrt() * noise, t, context).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    StableDiffusionPipeline.save_lora_weights(str(out.parent), unet_lora_layers=state, weight_name=out.name,
                                              unet_lora_adapter_metadata=meta, safe_serialization=True)
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB) in {time.perf_counter() - started:.0f} s")
    return out


def grid(lora: Path, engine: Path, out: Path) -> None:
    """Base (top row) vs adapter (bottom row), one exported engine, the adapter swapped at run time."""
    from PIL import Image

    from cair_export.lab.engines import ensure_engine
    from cair_runtime.text2image import CairText2Image

    folder = ensure_engine("shapes", engine)
    runtime = CairText2Image(folder)
    rows = [runtime(PROMPTS, num_inference_steps=25, cache_step=5, seed=0, loras=loras).images
            for loras in ([], [(lora, 1.0)])]
    image = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    Image.fromarray(image).save(out)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(asset_path("shapes_lora") / "negative.safetensors"))
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--grid", action="store_true", help="also write docs/lora_shapes.png (base vs adapter)")
    parser.add_argument("--engine", default="/tmp/cair-shapes-lora-engine",
                        help="exported shapes engine for --grid (exported there on first use)")
    parser.add_argument("--skip-training", action="store_true", help="only the grid, from --out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lora = Path(args.out) if args.skip_training else train(args)
    if args.grid:
        grid(lora, Path(args.engine), ROOT / "docs/lora_shapes.png")


if __name__ == "__main__":
    main()
