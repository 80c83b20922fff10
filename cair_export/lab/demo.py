"""``cair-export demo``: the main job on the shipped ``shapes`` model, baseline beside CAIR.

Exports the model into ``engines/`` once (later runs reuse it) with the default layout, which runs
every schedule; calibrates the folder's default schedule on first use (``cair-export calibrate``,
written into its manifest); then generates a handful of prompts with the torch-free runtime three
ways: the baseline (n = T), plain CAIR at the cache step n, and the folder's calibrated schedule.
Writes a side-by-side grid (one column each, captioned) and a table: latency per image, speed-up,
the MAC-bound speed-up, and each image's PSNR against the baseline's.
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

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
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
    calibration_prompts: int = 16  # probe images when the folder has no calibrated schedule yet (0: do not calibrate)


def make_grid(rows: list[tuple[str, list[np.ndarray]]], labels: tuple[str, ...], scale: int = 3):
    """A PIL image: per row a caption (wrapped), then its images side by side (nearest-neighbour upscaled)."""
    import textwrap

    from PIL import Image, ImageDraw

    height, width = rows[0][1][0].shape[:2]
    cell_w, cell_h, gap, line_h = width * scale, height * scale, 8, 12
    columns = len(labels)
    chars = max(20, (columns * cell_w + gap) // 6)  # PIL's default bitmap font is about 6 px per character
    captions = [textwrap.wrap(caption, chars) or [""] for caption, _ in rows]
    label_lines = [textwrap.wrap(label, max(10, cell_w // 6)) or [""] for label in labels]
    header = max(len(lines) for lines in label_lines) * line_h + 8
    total = header + sum(len(lines) * line_h + 6 + cell_h + gap for lines in captions) + gap
    grid = Image.new("RGB", (columns * cell_w + (columns + 1) * gap, total), "white")
    draw = ImageDraw.Draw(grid)
    for column, lines in enumerate(label_lines):
        for line_index, line in enumerate(lines):
            draw.text((gap + column * (cell_w + gap), 4 + line_index * line_h), line, fill="black")
    y = header
    for lines, (_, images) in zip(captions, rows):
        for line in lines:
            draw.text((gap, y), line, fill="black")
            y += line_h
        y += 6
        for column, image in enumerate(images):
            tile = Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST)
            grid.paste(tile, (gap + column * (cell_w + gap), y))
        y += cell_h + gap
    return grid


def calibration_prompts(model: str) -> Path:
    """The prompt file the demo calibrates with: the shapes prompts for ``shapes``, else the general ones."""
    return PROMPTS_DIR / ("shapes.txt" if Path(model).name == "shapes" else "general.txt")


def run_demo(config: DemoConfig, progress: Callable[[str], None] = print) -> dict:
    """Run the demo; returns the table's figures (per column: schedule, latency, speed-up, MAC bounds, PSNRs)."""
    from cair_export.core.macs import count_graph_macs, count_pipeline_macs, generation_macs, manifest_model
    from cair_export.core.models import load_model
    from cair_runtime.manifest import load_manifest
    from cair_runtime.schedule import Schedule, check_cache_step
    from cair_runtime.text2image import CairText2Image

    check_cache_step(config.cache_step, config.steps)
    if config.calibration_prompts < 0:
        from cair_runtime.errors import InvalidInputError

        raise InvalidInputError(f"calibration prompts {config.calibration_prompts} must be 0 (do not calibrate) "
                                "or more")
    folder = ensure_engine(config.model, config.engines_dir / Path(config.model).name, progress=progress)
    if load_manifest(folder, verify="none").schedule is None and config.calibration_prompts > 0:
        from cair_export.lab.calibrate import CalibrateConfig, calibrate

        prompts = calibration_prompts(config.model)
        progress(f"calibrating {folder}'s default schedule on {config.calibration_prompts} prompts of {prompts.name} "
                 "(once; written into its manifest)")
        calibrate(CalibrateConfig(folder, prompts, max_prompts=config.calibration_prompts, steps=config.steps,
                                  guidance_scale=config.guidance_scale), progress=progress)
    pipeline = CairText2Image(folder)
    manifest = pipeline.engine.manifest
    steps = config.steps
    n = config.cache_step
    schedules = {"baseline": Schedule(steps, steps, steps), "cair": Schedule(steps, n, n)}
    labels = {"baseline": f"baseline (n = T = {steps})", "cair": f"CAIR (n = {n})"}
    if manifest.schedule is not None:
        schedules["calibrated"] = pipeline.engine.resolve_schedule({"steps": steps})
        labels["calibrated"] = f"calibrated ({schedules['calibrated'].label().removeprefix(f'T={steps} ')})".replace(
            " (uniform)", "")
    settings = {"guidance_scale": config.guidance_scale}
    pipeline(DEMO_PROMPTS[0], cache_step=1, num_inference_steps=2)  # warm-up: session initialisation

    latency: dict[str, list[float]] = {name: [] for name in schedules}
    rows, psnrs = [], {name: [] for name in schedules}
    for index, prompt in enumerate(DEMO_PROMPTS):
        images = {}
        per_prompt: dict[str, list[float]] = {name: [] for name in schedules}
        for _repeat in range(config.repeats):  # alternate the schedules, so drift hits all alike
            for name, schedule in schedules.items():
                started = time.perf_counter()
                result = pipeline(prompt, schedule=schedule, seed=config.seed + index, **settings)
                per_prompt[name].append(time.perf_counter() - started)
                images[name] = result.images[0]
        for name in schedules:
            latency[name].append(statistics.median(per_prompt[name]))
            psnrs[name].append(psnr(images["baseline"], images[name]) if name != "baseline" else float("inf"))
        rows.append((prompt, [images[name] for name in schedules]))
        progress(f"prompt {index + 1}/{len(DEMO_PROMPTS)}: " + ", ".join(
            f"{name} {latency[name][-1]:.3f} s" + (f" ({psnrs[name][-1]:.1f} dB)" if name != "baseline" else "")
            for name in schedules))

    grid = make_grid(rows, tuple(labels[name] for name in schedules))
    config.output.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(config.output, lambda file: grid.save(file, format="PNG"))

    height, width = rows[0][1][0].shape[:2]
    model = manifest_model(manifest)  # the UNet's config, no weights
    branch = manifest.deep_branch["branch"] if manifest.deep_branch else None
    per_graph = count_graph_macs(model, height, width, fidelity_guidance=manifest.fidelity_guidance,
                                 deep_branch_id=branch)
    per_image = count_pipeline_macs(load_model(config.model, with_pipeline=True), height, width)
    baseline_s = statistics.median(latency["baseline"])
    columns = {}
    for name, schedule in schedules.items():
        bounds = [generation_macs(per_graph, steps, schedule.cache_step, image,
                                  fidelity_guidance=manifest.fidelity_guidance, guidance_stop=schedule.guidance_stop,
                                  deep_interval=schedule.deep_interval, skip_mode=schedule.skip_mode,
                                  planning_interval=schedule.planning_interval)["conv_linear"]["speedup_bound"]
                  for image in (None, per_image)]
        seconds = statistics.median(latency[name])
        columns[name] = {"label": labels[name], "schedule": schedule.parameters(), "seconds": seconds,
                         "speedup": baseline_s / seconds, "mac_bound": bounds[0], "mac_bound_end_to_end": bounds[1],
                         "psnr_db": psnrs[name]}
    return {"model": config.model, "engine": str(folder), "grid": str(config.output), "steps": steps,
            "columns": columns}


def format_table(figures: dict) -> str:
    width = max(len(column["label"]) for column in figures["columns"].values()) + 2
    lines = [f"{figures['model']}: {figures['steps']} steps (grid: {figures['grid']})",
             f"{'':{width}s}{'latency/image':>14s}{'speed-up':>10s}{'MAC bound':>11s}{'end to end':>12s}"
             f"{'PSNR (dB)':>11s}"]
    for name, column in figures["columns"].items():
        quality = "-" if name == "baseline" else f"{statistics.mean(column['psnr_db']):.1f}"
        lines.append(f"{column['label']:{width}s}{column['seconds']:13.3f}s{column['speedup']:9.2f}x"
                     f"{column['mac_bound']:10.2f}x{column['mac_bound_end_to_end']:11.2f}x{quality:>11s}")
    lines.append("MAC bound: conv+linear MACs of the baseline over the schedule's, the UNet loop alone and end to end "
                 "(text encoder and VAE included); PSNR: mean over the prompts, against the baseline's image")
    return "\n".join(lines)
