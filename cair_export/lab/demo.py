"""``cair-export demo``: the main job on the shipped ``shapes`` model, baseline beside CAIR.

Exports the model into ``engines/`` once (later runs reuse it), generates a handful of prompts
with the torch-free runtime at n = T (baseline) and at the cache step n, and writes a
side-by-side grid (baseline | CAIR per prompt, captioned) and a table: latency per image, speed-up,
the MAC-bound speed-up, and PSNR between the paired images.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cair_export.lab.engines import ensure_engine
from cair_export.lab.quality_metrics import psnr
from cair_runtime.files import write_atomically

DEMO_PROMPTS = (
    "a large red circle on a white background",
    "a small blue square on the left on a yellow background",
    "a large green triangle on a black background",
    "a small yellow circle left of a large purple square on a white background",
)


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs; the CLI's flags map onto these fields."""

    model: str = "shapes"  # shipped model, preset or local pipeline folder
    engines_dir: Path = Path("engines")  # the export goes to engines_dir/<model name>
    output: Path = Path("cair-demo.png")  # the side-by-side grid
    steps: int = 25
    cache_step: int = 5
    guidance_scale: float = 7.5
    seed: int = 0
    repeats: int = 3  # timed runs per prompt and configuration; the median is reported


def make_grid(rows: list[tuple[str, np.ndarray, np.ndarray]], labels: tuple[str, str], scale: int = 3):
    """A PIL image: per row a caption (wrapped), then the two images side by side (nearest-neighbour upscaled)."""
    import textwrap

    from PIL import Image, ImageDraw

    height, width = rows[0][1].shape[:2]
    cell_w, cell_h, gap, line_h = width * scale, height * scale, 8, 12
    chars = max(20, (2 * cell_w + gap) // 6)  # PIL's default bitmap font is about 6 px per character
    captions = [textwrap.wrap(caption, chars) or [""] for caption, _, _ in rows]
    total = line_h + 8 + sum(len(lines) * line_h + 6 + cell_h + gap for lines in captions) + gap
    grid = Image.new("RGB", (2 * cell_w + 3 * gap, total), "white")
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(labels):
        draw.text((gap + column * (cell_w + gap), 4), label, fill="black")
    y = line_h + 8
    for lines, (_, left, right) in zip(captions, rows):
        for line in lines:
            draw.text((gap, y), line, fill="black")
            y += line_h
        y += 6
        for column, image in enumerate((left, right)):
            tile = Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST)
            grid.paste(tile, (gap + column * (cell_w + gap), y))
        y += cell_h + gap
    return grid


def run_demo(config: DemoConfig, progress: Callable[[str], None] = print) -> dict:
    """Run the demo; returns the table's figures."""
    from cair_export.core.macs import count_graph_macs, count_pipeline_macs, generation_macs
    from cair_export.core.models import load_model
    from cair_runtime.schedule import check_cache_step
    from cair_runtime.text2image import CairText2Image

    check_cache_step(config.cache_step, config.steps)
    folder = ensure_engine(config.model, config.engines_dir / Path(config.model).name, progress=progress)
    pipeline = CairText2Image(folder)
    settings = {"num_inference_steps": config.steps, "guidance_scale": config.guidance_scale}
    pipeline(DEMO_PROMPTS[0], cache_step=1, num_inference_steps=2)  # warm-up: session initialisation

    configurations = {"baseline": config.steps, "cair": config.cache_step}
    latency = {name: [] for name in configurations}
    rows = []
    for index, prompt in enumerate(DEMO_PROMPTS):
        images = {}
        per_prompt = {name: [] for name in configurations}
        for repeat in range(config.repeats):  # alternate the two, so drift hits both alike
            for name, n in configurations.items():
                started = time.perf_counter()
                result = pipeline(prompt, cache_step=n, seed=config.seed + index, **settings)
                per_prompt[name].append(time.perf_counter() - started)
                images[name] = result.images[0]
        for name in configurations:
            latency[name].append(statistics.median(per_prompt[name]))
        rows.append((prompt, images["baseline"], images["cair"]))
        progress(f"prompt {index + 1}/{len(DEMO_PROMPTS)}: baseline {latency['baseline'][-1]:.3f} s, "
                 f"CAIR {latency['cair'][-1]:.3f} s, PSNR {psnr(images['baseline'], images['cair']):.1f} dB")

    labels = (f"baseline (n = T = {config.steps})", f"CAIR (n = {config.cache_step})")
    grid = make_grid(rows, labels)
    config.output.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(config.output, lambda file: grid.save(file, format="PNG"))

    height, width = rows[0][1].shape[:2]
    model = load_model(config.model, with_pipeline=True)
    per_graph = count_graph_macs(model, height, width)
    bound = generation_macs(per_graph, config.steps, config.cache_step)["conv_linear"]["speedup_bound"]
    end_to_end = generation_macs(per_graph, config.steps, config.cache_step,
                                 per_image=count_pipeline_macs(model, height, width))["conv_linear"]["speedup_bound"]
    baseline, cair = statistics.median(latency["baseline"]), statistics.median(latency["cair"])
    return {"model": config.model, "engine": str(folder), "grid": str(config.output), "steps": config.steps,
            "cache_step": config.cache_step, "baseline_s": baseline, "cair_s": cair, "speedup": baseline / cair,
            "mac_bound": bound, "mac_bound_end_to_end": end_to_end, "psnr_db": [psnr(left, right) for _, left, right in rows]}


def format_table(figures: dict) -> str:
    psnrs = ", ".join(f"{value:.1f}" for value in figures["psnr_db"])
    return "\n".join([
        f"{figures['model']}: {figures['steps']} steps, CAIR cache step n = {figures['cache_step']} "
        f"(grid: {figures['grid']})",
        f"{'':24s}{'latency/image':>14s}{'speed-up':>10s}",
        f"{'baseline (n = T)':24s}{figures['baseline_s']:13.3f}s{1:9.2f}x",
        f"{'CAIR':24s}{figures['cair_s']:13.3f}s{figures['speedup']:9.2f}x",
        f"MAC-bound speed-up (conv+linear): UNet loop {figures['mac_bound']:.2f}x, "
        f"end to end {figures['mac_bound_end_to_end']:.2f}x (text encoder and VAE included)",
        f"PSNR CAIR vs baseline per prompt (dB): {psnrs}",
    ])
