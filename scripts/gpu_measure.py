"""GPU latency: baseline (n = T) against CAIR (n = 5, 10) for torch eager, torch CAIR and AOTInductor.

For a lent GPU machine (PyTorch with CUDA; no TensorRT, no onnxruntime-gpu, no network). Random
weights of the published architecture (preset ``sd21``) at 512x512, 25 DDIM steps, fp16:

- (a) ``eager``: the plain diffusers loop (UNet with CFG at batch 2B every step), the baseline users run
  (``cair_denoise(cache_step=None)``);
- (b) ``torch-cair``: the torch reference ``cair_denoise`` at n = T, 5, 10;
- (c) ``aoti``: the runtime (``CairEngine(backend="aoti")``) over AOTInductor packages compiled here
  with static shapes (batch 1, 512x512), at n = T, 5, 10;
- (d) deep-feature caching (DeepCache's cut on top of CAIR's): ``aoti-kK`` the same packages plus DeepCache's shallow graph
  (branch ``--deep-branch``) at n = the first cache step and deep interval K (``--deep-intervals``,
  default 3), and ``torch-cair-kK`` the torch reference of that schedule.

After one warm-up each, the configurations run alternately ``--repeats`` rounds, so drift hits
them alike; the table gives median latency, speed-up over the same method's n = T and over (a),
and the MAC bound of ``cair_export.core.macs`` (conv+linear convention). JSON goes to ``--json``,
rewritten after every stage so an interrupted run keeps what it measured.

    python scripts/gpu_measure.py --json docs/gpu-measure.json                  # the GPU run (~5-8 min on an H100)
    python scripts/gpu_measure.py --model tiny-sd21 --size 64 --device cpu --dtype fp32 \\
        --steps 6 --cache-steps 2,3 --repeats 1 --json /tmp/measure.json      # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cair_export.cli import int_list

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def log(message: str) -> None:
    print(f"[gpu_measure] {message}", file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd21", help="preset (default sd21: the published architecture)")
    parser.add_argument("--size", type=int, default=512, help="square size in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps T (default 25)")
    parser.add_argument("--cache-steps", type=int_list, default=(5, 10), help="CAIR cache steps n, comma-separated (default 5,10)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--dtype", choices=tuple(TORCH_DTYPES), default="fp16", help="UNet precision (default fp16)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up (default 5)")
    parser.add_argument("--deep-intervals", type=int_list, default=(3,),
                        help="deep intervals k at n = the first cache step, comma-separated (default 3; '' skips)")
    parser.add_argument("--deep-branch", type=int, default=0, help="DeepCache's branch of the shallow graph (default 0)")
    parser.add_argument("--skip-aoti", action="store_true", help="measure (a), (b) and torch (d) only")
    parser.add_argument("--work-dir", help="where the AOTInductor folder goes (default: a temporary folder); "
                        "a folder compiled there before is reused")
    parser.add_argument("--compile-only", action="store_true", help="compile the AOTInductor folder and stop")
    parser.add_argument("--max-concurrency", type=int, help="AOTInductor runners per package (default: the runtime's)")
    parser.add_argument("--json", required=True, help="write the results here")
    args = parser.parse_args(argv)

    from diffusers import DDIMScheduler

    from cair_export.deploy.aoti import QUICK_CPU_COMPILE, export_aoti_folder
    from cair_export.core.macs import count_graph_macs, generation_macs
    from cair_export.core.models import load_model
    from cair_export.core.reference import cair_denoise
    from cair_runtime.pipeline import CairEngine

    started_all = time.perf_counter()
    device, dtype = args.device, TORCH_DTYPES[args.dtype]
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_measure: error: --device cuda but torch sees no GPU; use --device cpu for a smoke test",
              file=sys.stderr)
        return 2
    cache_steps = list(args.cache_steps)
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    results: dict = {"model": args.model, "size": args.size, "steps": args.steps, "cache_steps": cache_steps,
                     "device": device, "gpu": gpu, "dtype": args.dtype, "torch": torch.__version__,
                     "guidance_scale": args.guidance_scale, "repeats": args.repeats, "timings": {}}
    out = Path(args.json)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")

    # MAC bound (meta device: no weights allocated).
    deep_intervals = [k for k in args.deep_intervals if k > 1]
    deep_n = cache_steps[0] if cache_steps else args.steps
    branch = args.deep_branch if deep_intervals else None
    per_graph = count_graph_macs(load_model(args.model, device="meta"), args.size, args.size, deep_branch_id=branch)
    results["mac_bound"] = {n: generation_macs(per_graph, args.steps, n)["conv_linear"]["speedup_bound"]
                            for n in cache_steps}
    results["deep"] = {"cache_step": deep_n, "branch": branch, "intervals": deep_intervals, "mac_bound": {
        k: generation_macs(per_graph, args.steps, deep_n, deep_interval=k)["conv_linear"]["speedup_bound"]
        for k in deep_intervals}}

    log(f"building {args.model} ({args.dtype}) on {gpu}")
    model = load_model(args.model)
    unet = model.unet.eval().to(device=device, dtype=dtype)
    latent = args.size // model.vae_scale_factor
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((2, 1, model.text_len, unet.config.cross_attention_dim), dtype=np.float32)
    noise = rng.standard_normal((1, unet.config.in_channels, latent, latent), dtype=np.float32)
    on_device = {"prompt": torch.from_numpy(embeds[0]).to(device, dtype),
                 "negative": torch.from_numpy(embeds[1]).to(device, dtype),
                 "latents": torch.from_numpy(noise).to(device, dtype)}
    added = negative_added = None
    runtime_extra = {}
    if model.added_conditions:
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        text_embeds = rng.standard_normal((2, 1, pooled), dtype=np.float32)
        time_ids = torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]], device=device, dtype=dtype)
        added = {"text_embeds": torch.from_numpy(text_embeds[0]).to(device, dtype), "time_ids": time_ids}
        negative_added = {"text_embeds": torch.from_numpy(text_embeds[1]).to(device, dtype), "time_ids": time_ids}
        runtime_extra = {"text_embeds": text_embeds[0], "negative_text_embeds": text_embeds[1]}
    scheduler = DDIMScheduler.from_config(model.scheduler_config)

    # Each configuration: (method, n) -> a callable running one whole generation.
    configs: dict[tuple[str, int], object] = {}
    # cache_step=None: the plain diffusers loop with the UNet's own processors, CFG at 2B every step.
    for method, n in [("eager", None), *(("torch-cair", n) for n in [args.steps, *cache_steps])]:
        configs[(method, n or args.steps)] = lambda n=n: cair_denoise(
            unet, scheduler, on_device["latents"], on_device["prompt"], on_device["negative"],
            num_inference_steps=args.steps, cache_step=n, guidance_scale=args.guidance_scale,
            added_cond=added, negative_added_cond=negative_added)
    for k in deep_intervals:
        configs[(f"torch-cair-k{k}", deep_n)] = lambda k=k: cair_denoise(
            unet, scheduler, on_device["latents"], on_device["prompt"], on_device["negative"],
            num_inference_steps=args.steps, cache_step=deep_n, guidance_scale=args.guidance_scale,
            added_cond=added, negative_added_cond=negative_added, deep_branch_id=branch, deep_interval=k)

    if not args.skip_aoti:
        folder = Path(args.work_dir or tempfile.mkdtemp(prefix="cair-aoti-")) / f"{args.model}-{args.size}-{args.dtype}"
        if (folder / "manifest.json").exists():
            log(f"reusing the AOTInductor folder {folder}")
        else:
            log(f"compiling AOTInductor packages (static shapes: batch 1, {args.size}x{args.size}) into {folder}")
            compiled = time.perf_counter()
            export_aoti_folder(model, folder, args.size, args.size, device=device, dtype=args.dtype, max_batch=1,
                               static=True, progress=log, deep_branch_id=branch,
                               inductor_configs=QUICK_CPU_COMPILE if device == "cpu" else None)
            results["aoti_compile_s"] = time.perf_counter() - compiled
            save()
        if args.compile_only:
            return 0
        log(f"loading the packages on {device}")
        engine = CairEngine(folder, backend="aoti", device=device, max_concurrency=args.max_concurrency)
        for n in [args.steps, *cache_steps]:
            configs[("aoti", n)] = lambda n=n: engine.denoise(
                embeds[0], embeds[1], latents=noise, num_inference_steps=args.steps, cache_step=n,
                guidance_scale=args.guidance_scale, scheduler="ddim", **runtime_extra).latents
        for k in deep_intervals:
            configs[(f"aoti-k{k}", deep_n)] = lambda k=k: engine.denoise(
                embeds[0], embeds[1], latents=noise, num_inference_steps=args.steps, cache_step=deep_n,
                deep_interval=k, guidance_scale=args.guidance_scale, scheduler="ddim", **runtime_extra).latents

    times: dict[tuple[str, int], list[float]] = {key: [] for key in configs}
    finals = {}
    for round_index in range(args.repeats + 1):  # round 0 is the warm-up
        for key, run in configs.items():
            sync(device)
            started = time.perf_counter()
            final = run()
            sync(device)
            elapsed = time.perf_counter() - started
            log(f"{key[0]:10s} n={key[1]:<3d} {'warm-up' if round_index == 0 else f'round {round_index}'}: {elapsed:.3f} s")
            if round_index:
                times[key].append(elapsed)
            finals[key] = final
        results["timings"] = {f"{m}/n={n}": v for (m, n), v in times.items()}
        save()

    median = {key: statistics.median(values) for key, values in times.items()}
    # Agreement of the runtime (fp32 latents) with the torch reference (latents in the UNet's dtype).
    agreement = {}
    pairs = [(("aoti", n), ("torch-cair", n), n) for n in [args.steps, *cache_steps]]
    pairs += [((f"aoti-k{k}", deep_n), (f"torch-cair-k{k}", deep_n), f"{deep_n}/k={k}") for k in deep_intervals]
    for runtime_key, torch_key, label in pairs:
        if runtime_key in finals:
            reference = finals[torch_key].float().cpu().numpy()
            agreement[label] = float(np.abs(finals[runtime_key] - reference).max() / np.abs(reference).max())
    results["aoti_vs_torch_relative"] = agreement

    eager = median[("eager", args.steps)]
    lines = [f"{args.model} at {args.size}x{args.size}, {args.steps} DDIM steps, {args.dtype}, batch 1, "
             f"guidance {args.guidance_scale}, {gpu}, torch {torch.__version__}; median of {args.repeats} warm runs",
             "", "| method | n | median s | speed-up vs own n=T | speed-up vs eager | MAC bound |",
             "|---|---|---|---|---|---|"]
    for (method, n), value in median.items():
        base_method = method.split("-k")[0]  # aoti-k3 and torch-cair-k3 against their method's n = T
        own = median.get((base_method, args.steps), value)
        if "-k" in method:
            bound = f"{results['deep']['mac_bound'][int(method.split('-k')[1])]:.2f}x"
        else:
            bound = f"{results['mac_bound'][n]:.2f}x" if n in results["mac_bound"] else "1.00x"
        lines.append(f"| {method} | {n} | {value:.3f} | {own / value:.2f}x | {eager / value:.2f}x | {bound} |")
    table = "\n".join(lines)
    results["median_s"] = {f"{m}/n={n}": v for (m, n), v in median.items()}
    results["table"] = table
    results["wall_s"] = time.perf_counter() - started_all
    save()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
