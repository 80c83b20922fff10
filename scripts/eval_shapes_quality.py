"""Measure how well the shipped `shapes` model follows its prompts.

Generates images with the plain diffusers StableDiffusionPipeline from held-out single-object
prompts (never seen verbatim in training) and from two-object prompts, names what is in them with
the shipped attribute classifier, and prints recognition rates. The key figure is the share of
single-object images in which BOTH the shape and the colour named in the prompt are recognised.
As a ceiling, the classifier is also scored on generator drawings of the same held-out prompts.

    PYTHONPATH=. python scripts/eval_shapes_quality.py

Writes docs/shapes_samples.png (sample grid) and docs/shapes_quality.md (this report).
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from cair_export.assets import asset_path
from cair_export.lab.shapes import classifier as shape_classifier
from cair_export.lab.shapes import data

ROOT = Path(__file__).resolve().parent.parent
ATTRIBUTES = ("shape", "colour", "background", "size", "position")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=asset_path("shapes"))
    parser.add_argument("--classifier", type=Path, default=shape_classifier.DEFAULT_PATH)
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--pairs", type=int, default=48, help="number of two-object prompts")
    parser.add_argument("--limit", type=int, default=None, help="use only this many held-out prompts (quick look)")
    parser.add_argument("--batch", type=int, default=25, help="prompts per pipeline call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=Path, default=ROOT / "docs" / "shapes_samples.png")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "shapes_quality.md")
    return parser.parse_args()


def generate(pipe: StableDiffusionPipeline, prompts: list[str], args: argparse.Namespace) -> np.ndarray:
    """uint8 images (N, 64, 64, 3) for `prompts`, one seeded generator per batch."""
    images = []
    for start in range(0, len(prompts), args.batch):
        generator = torch.Generator().manual_seed(args.seed + start)
        out = pipe(
            prompts[start : start + args.batch],
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=generator,
            output_type="np",
        ).images  # (b, 64, 64, 3) float in [0, 1]
        images.append((out * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(images)


def truth_of(scene: data.Scene, attribute: str, index: int = 0) -> str:
    if attribute == "background":
        return scene.background
    return getattr(scene.objects[index], attribute)


def score_singles(predicted: list[dict[str, str]], scenes: list[data.Scene]) -> dict[str, float]:
    """Recognition rate per attribute, and of shape and colour together."""
    hits = {a: [p[a] == truth_of(s, a) for p, s in zip(predicted, scenes)] for a in ATTRIBUTES}
    rates = {a: float(np.mean(h)) for a, h in hits.items()}
    rates["shape+colour"] = float(np.mean(np.logical_and(hits["shape"], hits["colour"])))
    rates["all five"] = float(np.mean(np.all([hits[a] for a in ATTRIBUTES], axis=0)))
    return rates


def score_pairs(
    model: shape_classifier.ShapeClassifier, images: np.ndarray, scenes: list[data.Scene]
) -> dict[str, float]:
    """Shape+colour of each object of a pair, judged on its half of the image."""
    per_object = []  # (N, 2) bool
    for image, scene in zip(images, scenes):
        views = np.stack([data.single_object_view(image, scene, i) for i in (0, 1)])
        predicted = shape_classifier.classify(model, views)
        per_object.append(
            [p["shape"] == o.shape and p["colour"] == o.colour for p, o in zip(predicted, scene.objects)]
        )
    per_object = np.array(per_object)
    return {
        "each object shape+colour": float(per_object.mean()),
        "both objects shape+colour": float(per_object.all(axis=1).mean()),
    }


def save_grid(images: np.ndarray, path: Path, columns: int = 8, scale: int = 2) -> None:
    rows = len(images) // columns
    grid = images[: rows * columns].reshape(rows, columns, *images.shape[1:])
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(rows * images.shape[1], columns * images.shape[2], 3)
    image = Image.fromarray(grid)
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    model = shape_classifier.load_classifier(args.classifier)

    singles = data.held_out_scenes()[: args.limit]
    single_prompts = [data.caption(s) for s in singles]
    rng = np.random.default_rng(args.seed + 1)
    pairs = [data.sample_pair_scene(rng) for _ in range(args.pairs)]
    pair_prompts = [data.caption(s) for s in pairs]

    single_images = generate(pipe, single_prompts, args)
    pair_images = generate(pipe, pair_prompts, args)
    single_rates = score_singles(shape_classifier.classify(model, single_images), singles)
    pair_rates = score_pairs(model, pair_images, pairs)
    # Ceiling: the classifier on the generator's own drawings of the same prompts.
    drawn = data.render_scenes(singles, seed=args.seed)
    ceiling = score_singles(shape_classifier.classify(model, drawn), singles)
    ceiling_pairs = score_pairs(model, data.render_scenes(pairs, seed=args.seed), pairs)
    minutes = (time.time() - start) / 60

    # Sample grid: 4 rows of held-out single-object prompts, then 2 rows of two-object prompts.
    grid_singles = np.linspace(0, len(singles) - 1, min(32, len(singles))).astype(int)
    grid_prompts = [single_prompts[i] for i in grid_singles] + pair_prompts[:16]
    save_grid(np.concatenate([single_images[grid_singles], pair_images[:16]]), args.samples)

    bar = 0.90
    lines = [
        "# `shapes` model: prompt-following quality",
        "",
        f"Date: {datetime.date.today().isoformat()}. Command:",
        "",
        "```",
        "PYTHONPATH=. python " + " ".join(shlex.quote(a) for a in sys.argv),
        "```",
        "",
        f"Plain diffusers `StableDiffusionPipeline` ({type(pipe.scheduler).__name__}), {args.steps} steps, "
        f"guidance {args.guidance}, seed {args.seed}; model `{args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model}`. "
        f"Attributes named by the shipped classifier (`cair_export/lab/assets/shapes_classifier`). "
        f"Run time {minutes:.1f} min on {torch.get_num_threads()} CPU threads.",
        "",
        f"## Held-out single-object prompts ({len(singles)} images, prompts never used verbatim in training)",
        "",
        "| attribute | generated | classifier on generator drawings (ceiling) |",
        "| --- | --- | --- |",
        *(f"| {a} | {single_rates[a]:.1%} | {ceiling[a]:.1%} |" for a in single_rates),
        "",
        f"**Key figure: shape and colour both recognised in {single_rates['shape+colour']:.1%} of images** "
        f"(bar {bar:.0%}: {'met' if single_rates['shape+colour'] >= bar else 'NOT met'}).",
        "",
        f"## Two-object prompts ({len(pairs)} images, seeded random pairs; each object judged on its half)",
        "",
        "| figure | generated | classifier on generator drawings (ceiling) |",
        "| --- | --- | --- |",
        *(f"| {k} | {pair_rates[k]:.1%} | {ceiling_pairs[k]:.1%} |" for k in pair_rates),
        "",
        "## Samples",
        "",
        f"`{args.samples.name}`: rows of 8, held-out single-object prompts first, then two-object prompts",
        "(the first prompt of each row below).",
        "",
        *(f"- row {r // 8 + 1}: {grid_prompts[r]}" for r in range(0, len(grid_prompts) - 7, 8)),
        "",
    ]
    report = "\n".join(lines)
    print(report)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report)


if __name__ == "__main__":
    main()
