"""``cair-export evaluate``: quality against cache step n on ``shapes``, through the torch-free runtime.

For every n of a sweep (default {1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 25} of T = 25) the same held-out
prompts and the same seeds (image k: prompt ``held_out[k % len]``, noise
``np.random.default_rng(seed + k)``) are generated with ``CairText2Image`` on an engine folder
exported from the model, and scored by

- prompt adherence: the shipped attribute classifier's accuracy per attribute (and all five);
- FID (Heusel et al. 2017) in the classifier's feature space (its 128-wide penultimate layer)
  against generator drawings of the same held-out scenes, beside the real-vs-real floor (two
  drawings of the same scenes with other jitter seeds);
- PSNR and SSIM (Wang et al. 2004) of each image against the n = T image of the same seed;
- cost: MACs per image (``cair_export.core.macs``, conv+linear) and measured latency per image.

T-GATE (Liu et al. 2024, PyPI ``tgate``) runs at the same n through its own pipeline
(``TgateSDLoader(pipe).tgate``, cross-attention gating only) from the same noise, on fewer images.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cair_export.lab.harness import run_stamp
from cair_export.lab.quality_metrics import attribute_accuracy, fid_from_features, psnr, ssim
from cair_runtime.errors import InvalidInputError
from cair_runtime.noise import seeded_latents

CACHE_STEPS = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 25)
ATTRIBUTES = ("shape", "colour", "background", "size", "position")


@dataclass(frozen=True)
class EvaluateConfig:
    """What the evaluation runs; the CLI's flags map onto these fields one to one."""

    model: str = "shapes"  # shipped model or a shapes-style pipeline folder
    classifier: Path | None = None  # attribute classifier folder; None = the shipped one
    engines_dir: Path = Path("engines")  # the export goes to engines_dir/<model>-b<max_batch>
    num_images: int = 1000  # generated images per n (and real drawings per side)
    cache_steps: tuple[int, ...] = CACHE_STEPS  # n values; T is always added (the reference)
    steps: int = 25  # T
    guidance_scale: float = 7.5
    seed: int = 0  # image k starts from np.random.default_rng(seed + k)
    real_seed: int = 1000  # jitter seed of the real drawings (the floor's second set uses real_seed + 1)
    max_batch: int = 32  # engine batch: images per runtime call
    threads: int = 0  # onnxruntime / torch intra-op threads (0: onnxruntime's default, torch's default)
    tgate_images: int = 100  # images per n for T-GATE (0: skip T-GATE)
    tgate_cache_steps: tuple[int, ...] | None = None  # None: the same n as CAIR


def held_out_prompts(count: int) -> tuple[list[str], list[dict[str, str]]]:
    """``count`` held-out single-object captions (cycled) and their true attributes."""
    from cair_export.lab.shapes import data

    scenes = data.held_out_scenes()
    chosen = [scenes[k % len(scenes)] for k in range(count)]
    truth = [{"shape": s.objects[0].shape, "colour": s.objects[0].colour, "background": s.background,
              "size": s.objects[0].size, "position": s.objects[0].position} for s in chosen]
    return [data.caption(s) for s in chosen], truth


def classify_with_features(classifier: Any, images: np.ndarray, batch: int = 256) -> tuple[list[dict[str, str]], np.ndarray]:
    """Attribute names and penultimate features (N, 128) of uint8 images (N, 64, 64, 3)."""
    import torch

    from cair_export.lab.shapes.classifier import to_tensor

    predictions, features = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            trunk = classifier.trunk(to_tensor(images[start:start + batch]))  # (b, 128): the FID features
            picks = {name: layer(trunk).argmax(dim=1).tolist() for name, layer in classifier.logits.items()}
            predictions += [{name: classifier.heads[name][picks[name][i]] for name in classifier.heads}
                            for i in range(len(trunk))]
            features.append(trunk.double().numpy())
    return predictions, np.concatenate(features)


def generate_runtime(pipeline: Any, prompts: list[str], n: int, config: EvaluateConfig) -> tuple[np.ndarray, float]:
    """uint8 images (N, H, W, 3) at cache step n, and wall seconds for all of them."""
    images, seconds = [], 0.0
    for start in range(0, len(prompts), config.max_batch):
        started = time.perf_counter()
        result = pipeline(prompts[start:start + config.max_batch], num_inference_steps=config.steps, cache_step=n,
                          guidance_scale=config.guidance_scale, seed=config.seed + start)
        seconds += time.perf_counter() - started
        images.append(result.images)
    return np.concatenate(images), seconds


def generate_tgate(pipe: Any, prompts: list[str], n: int, config: EvaluateConfig, shape: tuple[int, ...]) -> tuple[np.ndarray, float]:
    """T-GATE's own pipeline at gate step n, cross-attention gating only (self-attention every step)."""
    import torch

    images, seconds = [], 0.0
    for start in range(0, len(prompts), config.max_batch):
        chunk = prompts[start:start + config.max_batch]
        latents = torch.from_numpy(seeded_latents(range(config.seed + start, config.seed + start + len(chunk)), shape))
        started = time.perf_counter()
        # sp_interval = fi_interval = 1: self-attention is recomputed every step; only attn2 is gated.
        out = pipe.tgate(chunk, num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                         latents=latents, output_type="np", gate_step=n, sp_interval=1, fi_interval=1,
                         warm_up=0).images
        seconds += time.perf_counter() - started
        images.append((out * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(images), seconds


def _score(method: str, n: int, images: np.ndarray, seconds: float, truth: list[dict[str, str]], reference: np.ndarray,
           real_features: np.ndarray, classifier: Any, macs: dict[int, float]) -> dict[str, Any]:
    predictions, features = classify_with_features(classifier, images)
    count = len(images)
    return {
        "method": method, "cache_step": n, "images": count,
        "accuracy": attribute_accuracy(predictions, truth[:count], ATTRIBUTES),
        "fid": fid_from_features(features, real_features[:count]) if count > 2 else float("nan"),
        "psnr_db": float(np.mean([psnr(a, b) for a, b in zip(images, reference[:count])])),
        "ssim": float(np.mean([ssim(a, b) for a, b in zip(images, reference[:count])])),
        "latency_s_per_image": seconds / count, "gmacs_per_image": macs[n] / 1e9,
    }


def evaluate(config: EvaluateConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sweep; returns the JSON-ready figures."""
    import torch

    from cair_export.core.export import ExportConfig
    from cair_export.core.macs import count_graph_macs, generation_macs
    from cair_export.lab.engines import ensure_engine
    from cair_export.core.models import load_model
    from cair_export.lab.shapes import classifier as shape_classifier
    from cair_export.lab.shapes import data
    from cair_runtime.stages import check_cache_step
    from cair_runtime.text2image import CairText2Image

    if config.num_images < 2:
        raise InvalidInputError(f"--num-images {config.num_images} must be at least 2 (FID needs a covariance)")
    if config.max_batch < 1 or config.threads < 0:
        raise InvalidInputError(f"--max-batch {config.max_batch} must be at least 1 and --threads {config.threads} "
                                "at least 0 (0: the library's default)")
    for n in config.cache_steps:
        check_cache_step(n, config.steps)
    cache_steps = sorted({*config.cache_steps, config.steps}, reverse=True)  # n = T first: the reference
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    classifier = shape_classifier.load_classifier(config.classifier or shape_classifier.DEFAULT_PATH)
    prompts, truth = held_out_prompts(config.num_images)
    held_out = data.held_out_scenes()
    scenes = [held_out[k % len(held_out)] for k in range(config.num_images)]
    real_predictions, real_features = classify_with_features(classifier, data.render_scenes(scenes, config.real_seed))
    _, floor_features = classify_with_features(classifier, data.render_scenes(scenes, config.real_seed + 1))
    real = {"accuracy": attribute_accuracy(real_predictions, truth, ATTRIBUTES),
            "fid_real_vs_real": fid_from_features(real_features, floor_features), "images": config.num_images}
    progress(f"real drawings: classifier accuracy (all five) {real['accuracy']['all']:.1%}, "
             f"real-vs-real FID floor {real['fid_real_vs_real']:.3f} ({config.num_images} per side)")

    folder = ensure_engine(config.model, config.engines_dir / f"{Path(config.model).name}-b{config.max_batch}",
                           ExportConfig(max_batch=config.max_batch), progress=progress)
    pipeline = CairText2Image(folder, threads=config.threads)
    pipeline(prompts[:1], num_inference_steps=2, cache_step=1)  # warm-up: session initialisation
    size = data.IMAGE_SIZE
    per_graph = count_graph_macs(load_model(config.model, device="meta"), size, size)
    macs = {n: generation_macs(per_graph, config.steps, n)["conv_linear"]["cair_total"] for n in range(1, config.steps + 1)}

    rows, reference = [], None
    for n in cache_steps:
        images, seconds = generate_runtime(pipeline, prompts, n, config)
        reference = images if reference is None else reference
        rows.append(_score("CAIR runtime", n, images, seconds, truth, reference, real_features, classifier, macs))
        row = rows[-1]
        progress(f"CAIR n={n:<2d}: {seconds:.0f} s, accuracy (all) {row['accuracy']['all']:.1%}, FID {row['fid']:.3f}, "
                 f"PSNR {row['psnr_db']:.1f} dB, SSIM {row['ssim']:.3f} ({time.perf_counter() - started:.0f} s so far)")

    tgate_status = "skipped (--tgate-images 0)"
    if config.tgate_images:
        tgate_status = _run_tgate(config, cache_steps, prompts, truth, reference, real_features, classifier, macs,
                                  rows, progress, started)
    stamp = run_stamp("")
    return {"config": {**asdict(config), "classifier": str(config.classifier or shape_classifier.DEFAULT_PATH),
                       "engines_dir": str(config.engines_dir)},
            "engine": str(folder), "date": stamp["date"], "machine": stamp["machine"],
            "real": real, "rows": rows, "tgate": tgate_status, "seconds": time.perf_counter() - started}


def _run_tgate(config, cache_steps, prompts, truth, reference, real_features, classifier, macs, rows, progress,
               started) -> str:
    """T-GATE rows appended to ``rows``; returns what happened, for the report (a failure is a result)."""
    from cair_export.core.models import load_model

    try:
        from tgate import TgateSDLoader
    except ImportError as error:
        return f"not run: tgate is not importable ({error}); pip install tgate --no-deps"
    model = load_model(config.model, with_pipeline=True)
    pipe = TgateSDLoader(model.diffusers_pipeline())
    shape = (model.unet.config.in_channels, model.unet.config.sample_size, model.unet.config.sample_size)
    count = min(config.tgate_images, len(prompts))
    for n in sorted(set(config.tgate_cache_steps or cache_steps), reverse=True):
        try:
            images, seconds = generate_tgate(pipe, prompts[:count], n, config, shape)
        except Exception as error:  # a peer package failing is a result to report, not a crash
            return f"failed at n={n}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        rows.append(_score("T-GATE (tgate)", n, images, seconds, truth, reference, real_features, classifier, macs))
        row = rows[-1]
        progress(f"T-GATE n={n:<2d}: {seconds:.0f} s, accuracy (all) {row['accuracy']['all']:.1%}, "
                 f"PSNR vs CAIR-runtime n=T {row['psnr_db']:.1f} dB ({time.perf_counter() - started:.0f} s so far)")
    return f"ran on {count} images per n with diffusers' current version (tgate 1.0.0 works unpinned)"


def format_markdown(figures: dict[str, Any], command: str) -> str:
    """The quality table (one row per method and n) and the issue's targets at n = 5."""
    cfg = figures["config"]
    lines = [
        "# Quality against cache step n (`shapes`)", "",
        f"Date: {figures['date']}. Machine: {figures['machine']} (shared with other jobs: latencies are indicative). "
        f"Run time {figures['seconds'] / 60:.1f} min.", "", "```", command, "```", "",
        f"T = {cfg['steps']}, guidance {cfg['guidance_scale']:g}, model `{cfg['model']}`, engine `{figures['engine']}` "
        f"(onnxruntime CPU, batch {cfg['max_batch']}). Images: held-out single-object prompts, cycled; image k from "
        f"seed {cfg['seed']} + k, the same for every n. FID in the attribute classifier's 128-wide penultimate "
        f"features against {figures['real']['images']} generator drawings of the same scenes. PSNR/SSIM against "
        "the CAIR-runtime n = T image of the same seed. MACs: UNet conv+linear per image (`cair_export.core.macs`). "
        f"T-GATE: {figures['tgate']}.", "",
        f"Real drawings: classifier accuracy (all five) {figures['real']['accuracy']['all']:.1%}; "
        f"**real-vs-real FID floor {figures['real']['fid_real_vs_real']:.3f}** ({figures['real']['images']} per side).", "",
        "| method | n | images | GMACs/img | latency/img (s) | " + " | ".join(ATTRIBUTES) + " | all | FID | PSNR (dB) | SSIM |",
        "|---|---|---|---|---|" + "---|" * (len(ATTRIBUTES) + 4),
    ]
    for row in figures["rows"]:
        acc = row["accuracy"]
        lines.append(f"| {row['method']} | {row['cache_step']} | {row['images']} | {row['gmacs_per_image']:.3f} | "
                     f"{row['latency_s_per_image']:.4f} | " + " | ".join(f"{acc[a]:.1%}" for a in ATTRIBUTES) +
                     f" | {acc['all']:.1%} | {row['fid']:.3f} | {row['psnr_db']:.1f} | {row['ssim']:.4f} |")
    lines += ["", *targets(figures)]
    return "\n".join(lines) + "\n"


def targets(figures: dict[str, Any], n: int = 5) -> list[str]:
    """The issue's quality targets at n = 5 of T: accuracy within 1 point, FID within 5 % of the baseline."""
    steps = figures["config"]["steps"]
    cair = {row["cache_step"]: row for row in figures["rows"] if row["method"] == "CAIR runtime"}
    if n not in cair or steps not in cair:
        return [f"Targets at n = {n}: not measured (n = {n} not in the sweep)."]
    base, at_n = cair[steps], cair[n]
    worst = max(ATTRIBUTES + ("all",), key=lambda a: base["accuracy"][a] - at_n["accuracy"][a])
    drop = 100 * (base["accuracy"][worst] - at_n["accuracy"][worst])
    fid_ratio = at_n["fid"] / base["fid"] - 1
    return [f"Targets at n = {n} of {steps}:",
            f"- attribute accuracy within 1 point of the baseline: largest drop {drop:+.1f} points ({worst}) -> "
            f"{'met' if drop <= 1.0 else 'MISSED'}",
            f"- FID within 5 % of the baseline's: {at_n['fid']:.3f} vs {base['fid']:.3f} ({fid_ratio:+.1%}) -> "
            f"{'met' if fid_ratio <= 0.05 else 'MISSED'}"]


def plot_quality(figures: dict[str, Any], path: Path) -> None:
    """Accuracy (all five), FID and PSNR against GMACs and against latency per image, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("accuracy (all five)", lambda r: 100 * r["accuracy"]["all"]), ("FID (classifier features)", lambda r: r["fid"]),
               ("PSNR vs n = T (dB)", lambda r: min(r["psnr_db"], 60.0)))
    axes_x = (("GMACs per image (UNet, conv+linear)", "gmacs_per_image"), ("latency per image (s)", "latency_s_per_image"))
    fig, axes = plt.subplots(len(axes_x), len(metrics), figsize=(13, 7), constrained_layout=True)
    for row_index, (xlabel, xkey) in enumerate(axes_x):
        for col, (ylabel, value) in enumerate(metrics):
            axis = axes[row_index][col]
            for method in dict.fromkeys(r["method"] for r in figures["rows"]):
                rows = sorted((r for r in figures["rows"] if r["method"] == method), key=lambda r: r["cache_step"])
                xs, ys = [r[xkey] for r in rows], [value(r) for r in rows]
                axis.plot(xs, ys, marker="o", label=method)
                for r, x, y in zip(rows, xs, ys):
                    axis.annotate(str(r["cache_step"]), (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
            if col == 1:
                axis.axhline(figures["real"]["fid_real_vs_real"], color="gray", linestyle=":", label="real-vs-real floor")
            axis.set_xlabel(xlabel)
            axis.set_ylabel(ylabel)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
    fig.suptitle(f"shapes: quality vs cost over cache step n (labels), T = {figures['config']['steps']}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
