"""Train the embedded `shapes` text-to-image model and its attribute classifier from scratch.

Stages (all by default, in this order; each writes its part so a later stage can run alone):

1. data        seeded procedural images + captions (`cair_export.lab.shapes.data`), made once
2. vae         AutoencoderKL, 64x64 RGB <-> 16x16x4 latents (trained on 32x32 crops, then full images)
3. decoder     the VAE decoder fine-tuned on full images, encoder frozen (latents do not change)
4. classifier  CNN naming shape, colour, background, size and position (quality evaluation)
5. unet        UNet2DConditionModel with cross-attention + CLIPTextModel, trained jointly on the
               epsilon objective with caption dropout for classifier-free guidance

Each stage seeds itself (seed + stage offset), so `--stages unet` after the earlier stages gives the
same weights as one run of all stages. The UNet's learning rate is constant after warm-up and the
pipeline (EMA weights) is written every `--save-every` steps: a run stopped at a save equals a run
with `--unet-steps` set to that step.

Outputs: a StableDiffusionPipeline folder in cair_export/lab/assets/shapes/ and the classifier in
cair_export/lab/assets/shapes_classifier/. Measured wall time of the shipped run (docs/shapes_quality.md):
about 100 min stage by stage on 2 shared CPU cores (VAE 41, decoder 12, classifier 3, UNet 46). On
a CPU shared with other work, `--threads 1` can be many times faster than 2 (OpenMP threads waiting
on each other). Examples:

    PYTHONPATH=. python scripts/train_shapes.py --threads 1
    PYTHONPATH=. python scripts/train_shapes.py --unet-steps 200 --out /tmp/pilot/shapes \
        --classifier-out /tmp/pilot/classifier                                      # quick pilot
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from cair_export.assets import asset_path
from cair_export.lab.shapes import classifier as shape_classifier
from cair_export.lab.shapes import data
from cair_export.core.models.tokenizer import write_tokenizer



@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # seeds data, initialisation and every random draw
    threads: int = 2  # torch CPU threads
    out: Path = asset_path("shapes")  # pipeline folder
    classifier_out: Path = asset_path("shapes_classifier")  # classifier folder
    stages: str = "vae,decoder,classifier,unet"  # comma-separated subset to run, in this order
    num_images: int = 30000  # training images generated once, shared by all stages
    pair_fraction: float = 0.2  # share of two-object scenes
    caption_drop: float = 0.1  # chance of leaving size / position / background out of a caption
    text_len: int = 32  # tokenizer model_max_length = text encoder positions
    # VAE
    vae_steps: int = 500  # steps on random 32x32 crops
    vae_full_steps: int = 50  # then steps on full 64x64 images (mid-block attention sees 16x16)
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6  # as Stable Diffusion's VAE: almost a plain autoencoder
    # VAE decoder fine-tuning (encoder frozen, so the latents the UNet learns stay the same)
    decoder_steps: int = 600
    decoder_batch: int = 16
    decoder_lr: float = 5e-4
    # classifier
    classifier_steps: int = 800
    classifier_batch: int = 64
    classifier_lr: float = 3e-3
    # UNet + text encoder
    unet_steps: int = 5000
    unet_images: int = 15000  # the first this many images are encoded to latents for the UNet
    unet_batch: int = 32
    unet_lr: float = 1e-3  # constant after warm-up, so a run stopped at step k equals --unet-steps k
    unet_warmup: int = 100  # linear warm-up steps
    save_every: int = 250  # write the pipeline (EMA weights) every this many UNet steps
    cfg_drop: float = 0.1  # chance of training on the empty prompt (classifier-free guidance)
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023); 0 disables
    ema_decay: float = 0.998  # EMA of UNet and text-encoder weights; the EMA is what ships
    log_every: int = 50


# --- model definitions ----------------------------------------------------------------------


def make_vae() -> AutoencoderKL:
    # Three levels: 64x64 image -> 16x16x4 latent (vae_scale_factor 4).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=data.IMAGE_SIZE,
    )


def make_text_encoder(tokenizer: CLIPTokenizer, text_len: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=text_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_unet() -> UNet2DConditionModel:
    # Cross-attention at the 8x8 and 4x4 levels and in the mid block; the 16x16 level is
    # convolution only (cheap on CPU, and the prompt's attributes are global or coarse).
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(24, 48, 64),  # narrow: CPU compute, not parameters, is the limit
        layers_per_block=1,
        cross_attention_dim=64,  # = text encoder hidden size
        attention_head_dim=4,  # diffusers' legacy name: the number of heads
        norm_num_groups=8,
    )


def make_scheduler() -> DDIMScheduler:
    # Stable Diffusion's noise schedule and epsilon prediction.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


# --- helpers --------------------------------------------------------------------------------


class Progress:
    """Prints step, running mean loss, speed and time left every `every` steps."""

    def __init__(self, name: str, total: int, every: int):
        self.name, self.total, self.every = name, total, every
        self.start = time.time()
        self.losses: list[float] = []

    def update(self, step: int, loss: float, extra: str = "") -> None:
        self.losses.append(loss)
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            elapsed = time.time() - self.start
            left = elapsed / (step + 1) * (self.total - step - 1)
            print(
                f"[{self.name}] step {step + 1}/{self.total} loss {np.mean(self.losses):.4f} "
                f"{elapsed / (step + 1):.2f}s/step elapsed {elapsed / 60:.1f}m left {left / 60:.1f}m {extra}",
                flush=True,
            )
            self.losses = []


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay from 1 to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a module's parameters (decay warmed up as in diffusers)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema_p, p in zip(self.shadow.parameters(), module.parameters()):
            ema_p.lerp_(p, 1 - decay)


# --- stages ---------------------------------------------------------------------------------


def train_vae(cfg: TrainConfig, images: torch.Tensor, gen: torch.Generator) -> AutoencoderKL:
    """Reconstruction (L1 + MSE) + tiny KL; first on 32x32 crops (4x cheaper), then full images."""
    vae = make_vae()
    print(f"[vae] {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters", flush=True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    total = cfg.vae_steps + cfg.vae_full_steps
    progress = Progress("vae", total, cfg.log_every)
    vae.train()
    for step in range(total):
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * lr_factor(step, total, 100)
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=gen)
        x = images[idx]  # (B, 3, 64, 64) in [-1, 1]
        if step < cfg.vae_steps:  # one random 32x32 window per batch
            oy, ox = torch.randint(0, data.IMAGE_SIZE - 32 + 1, (2,), generator=gen).tolist()
            x = x[:, :, oy : oy + 32, ox : ox + 32]
        else:
            x = x[: cfg.vae_batch // 4]  # full images cost 4x: keep the step time
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        progress.update(step, loss.item())
    return vae.eval()


def finetune_decoder(cfg: TrainConfig, vae: AutoencoderKL, images: torch.Tensor, gen: torch.Generator) -> AutoencoderKL:
    """Sharpen the decoder on full images with the encoder frozen (latents unchanged)."""
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    progress = Progress("decoder", cfg.decoder_steps, cfg.log_every)
    vae.train()
    for step in range(cfg.decoder_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.decoder_lr * lr_factor(step, cfg.decoder_steps, 50)
        x = images[torch.randint(len(images), (cfg.decoder_batch,), generator=gen)]  # (B, 3, 64, 64)
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        progress.update(step, loss.item())
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (N, 4, 16, 16) of every training image."""
    means, stds = [], []
    for start in range(0, len(images), 256):
        posterior = vae.encode(images[start : start + 256]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random blur and noise, so the classifier also judges the softer generated images."""
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    amount = torch.rand(len(x), 1, 1, 1, generator=gen)
    x = torch.lerp(x, blurred, amount)
    noise = torch.randn(x.shape, generator=gen) * 0.08 * torch.rand(len(x), 1, 1, 1, generator=gen)
    return x + noise


def classifier_dataset(count: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Single-object images, plus one-object views of pair images, with their labels."""
    singles, _, single_scenes = data.generate(count, seed, pair_fraction=0.0)
    pairs, _, pair_scenes = data.generate(count // 4, seed + 1, pair_fraction=1.0)
    views, view_scenes = [], []
    for i, (image, scene) in enumerate(zip(pairs, pair_scenes)):
        index = i % 2  # alternate which object is kept
        views.append(data.single_object_view(image, scene, index))
        view_scenes.append(data.Scene((scene.objects[index],), scene.background))
    images = np.concatenate([singles, np.stack(views)])
    labels = shape_classifier.labels_of(list(single_scenes) + view_scenes)
    return shape_classifier.to_tensor(images), labels


def train_classifier(cfg: TrainConfig, gen: torch.Generator) -> shape_classifier.ShapeClassifier:
    """Cross-entropy summed over the five heads, on fresh generator images (own seed)."""
    x, labels = classifier_dataset(16000, cfg.seed + 1000)
    model = shape_classifier.ShapeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.classifier_lr, weight_decay=1e-4)
    progress = Progress("classifier", cfg.classifier_steps, cfg.log_every)
    model.train()
    for step in range(cfg.classifier_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.classifier_lr * lr_factor(step, cfg.classifier_steps, 50)
        idx = torch.randint(len(x), (cfg.classifier_batch,), generator=gen)
        logits = model(_augment(x[idx], gen))
        loss = sum(F.cross_entropy(logits[name], labels[name][idx]) for name in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.update(step, loss.item())
    model.eval()
    # Held-out check on a fresh seeded batch (clean images, as the test does).
    test_images, _, test_scenes = data.generate(2000, cfg.seed + 2000, pair_fraction=0.0)
    predicted = shape_classifier.classify(model, test_images)
    for name in shape_classifier.HEADS:
        truth = [getattr(s.objects[0], name) if name != "background" else s.background for s in test_scenes]
        accuracy = np.mean([p[name] == t for p, t in zip(predicted, truth)])
        print(f"[classifier] fresh-batch accuracy {name}: {accuracy:.4f}", flush=True)
    return model


def train_unet(
    cfg: TrainConfig,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    images: torch.Tensor,
    captions: list[str],
    gen: torch.Generator,
) -> None:
    """Epsilon-prediction diffusion loss on VAE latents; text encoder trained jointly.

    The EMA weights are written as the pipeline every `save_every` steps and at the end.
    """
    scheduler = make_scheduler()
    latent_mean, latent_std = encode_latents(vae, images)
    scaling = 1.0 / latent_mean.std().item()  # unit-variance latents, as SD's 0.18215
    vae.register_to_config(scaling_factor=scaling)
    print(f"[unet] latents {tuple(latent_mean.shape)}, scaling_factor {scaling:.4f}", flush=True)

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=cfg.text_len, truncation=True, return_tensors="pt").input_ids

    ids = tokenize(captions)  # (N, text_len)
    empty_ids = tokenize([""])  # the unconditional prompt, as the pipeline builds it
    text_encoder = make_text_encoder(tokenizer, cfg.text_len)
    unet = make_unet()
    print(
        f"[unet] UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M parameters",
        flush=True,
    )
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    ema_unet, ema_text = EMA(unet, cfg.ema_decay), EMA(text_encoder, cfg.ema_decay)
    alphas_cumprod = scheduler.alphas_cumprod  # (1000,)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    progress = Progress("unet", cfg.unet_steps, cfg.log_every)
    unet.train()
    text_encoder.train()
    for step in range(cfg.unet_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.unet_lr * min(1.0, (step + 1) / cfg.unet_warmup)
        idx = torch.randint(len(images), (cfg.unet_batch,), generator=gen)
        eps_latent = torch.randn(latent_mean[idx].shape, generator=gen)
        latents = (latent_mean[idx] + latent_std[idx] * eps_latent) * scaling  # (B, 4, 16, 16)
        batch_ids = ids[idx].clone()
        dropped = torch.rand(cfg.unet_batch, generator=gen) < cfg.cfg_drop
        batch_ids[dropped] = empty_ids[0]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        text = text_encoder(batch_ids).last_hidden_state  # (B, text_len, 64)
        pred = unet(noisy, t, encoder_hidden_states=text).sample
        loss_per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if cfg.min_snr_gamma > 0:  # epsilon target: weight min(SNR, gamma) / SNR
            loss_per = loss_per * torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]
        loss = loss_per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.update(unet)
        ema_text.update(text_encoder)
        progress.update(step, loss.item(), f"grad {grad_norm:.2f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.unet_steps:
            save_pipeline(cfg.out, vae, tokenizer, ema_unet.shadow, ema_text.shadow, cfg.text_len)
            print(f"[unet] saved EMA weights of step {step + 1} to {cfg.out}", flush=True)


def save_pipeline(
    out: Path,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    text_len: int,
) -> None:
    """Write the StableDiffusionPipeline folder (safetensors, no safety checker)."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    write_tokenizer(out / "tokenizer", data.caption_vocabulary(), text_len)  # our files, not save_pretrained's re-export


# --- main -----------------------------------------------------------------------------------


def parse_args() -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(TrainConfig):
        kind = Path if field.type in ("Path", Path) else type(field.default)
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=field.default)
    return TrainConfig(**vars(parser.parse_args()))


def seeded(seed: int) -> torch.Generator:
    """Seed torch's global RNG (model initialisation) and return a generator for the stage's draws.

    Each stage has its own seed, so running stages separately gives the same result as one run.
    """
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def main() -> None:
    cfg = parse_args()
    stages = set(cfg.stages.split(","))
    if unknown := stages - {"vae", "decoder", "classifier", "unet"}:
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}; expected some of vae,decoder,classifier,unet")
    torch.set_num_threads(cfg.threads)
    start = time.time()
    print(f"config: {json.dumps(dataclasses.asdict(cfg), default=str)}", flush=True)

    tokenizer = write_tokenizer(cfg.out / "tokenizer", data.caption_vocabulary(), cfg.text_len)
    if stages & {"vae", "decoder", "unet"}:
        raw, captions, _ = data.generate(cfg.num_images, cfg.seed, cfg.pair_fraction, cfg.caption_drop)
        images = torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, 64, 64)
        print(f"[data] {len(captions)} images in {time.time() - start:.0f}s, e.g. {captions[:3]}", flush=True)

    if "vae" in stages:
        vae = train_vae(cfg, images, seeded(cfg.seed))
        vae.save_pretrained(cfg.out / "vae", safe_serialization=True)
    if "decoder" in stages:
        vae = AutoencoderKL.from_pretrained(cfg.out / "vae")
        vae = finetune_decoder(cfg, vae, images, seeded(cfg.seed + 3))
        vae.save_pretrained(cfg.out / "vae", safe_serialization=True)
    if "classifier" in stages:
        model = train_classifier(cfg, seeded(cfg.seed + 1))
        shape_classifier.save_classifier(model, cfg.classifier_out)
    if "unet" in stages:
        vae = AutoencoderKL.from_pretrained(cfg.out / "vae").eval()
        count = cfg.unet_images  # encoding costs a VAE forward per image: not all of them
        train_unet(cfg, vae, tokenizer, images[:count], captions[:count], seeded(cfg.seed + 2))
    print(f"done in {(time.time() - start) / 60:.1f} min; wrote {cfg.out}", flush=True)


if __name__ == "__main__":
    main()
