"""``cair-export calibrate``: an engine folder's default schedule (n, m, k, k_p), chosen from its own runs.

Everything is measured on the engine itself, through the torch-free runtime (onnxruntime on the
CPU), with the prompts of a file and fixed seeds (prompt p from ``np.random.default_rng(seed + p)``):

1. **Convergence** (the quantity ``cair-export profile`` measures with torch, here on the exported
   planning graph): the baseline run (n = T, every step planning) reads, after every step, each
   cross-attention output planning wrote, merged as CAIR caches it (the mean of the two halves).
   Per prompt and module the relative L2 change from the previous step, averaged over modules and
   then over prompts; the converged step n_c is the first step whose mean change is below
   ``threshold`` (``recommend_cache_step``, the profiler's rule, default 5 %).
2. **The candidates**: n in {n_c, 2 n_c} (capped at T), m in {n, (n + T) / 2, T} on an engine
   with per-half caches (``--fidelity-guidance cfg``; else m = n), k in 1..5 on an engine with a
   shallow graph (else 1), and the planning interval k_p in 1..5 on an engine with the guided
   shallow graph (else 1), where n = T (DeepCache's own schedules) joins the n values; uniform
   placement. Up to about 150 schedules: too many to probe each.
3. **The walk**: the candidates in order of UNet MACs per image (conv + linear,
   ``cair_export.core.macs``, counted without running anything), cheapest first; each probed runs
   the same prompts and seeds and is scored by the PSNR of its decoded images against the baseline
   images (pooled over images: ``10 log10(255^2 / mean squared error)``). The first whose PSNR
   reaches ``min_psnr`` is the recommendation (among equally cheap ones, the higher PSNR), and the
   walk stops there: it is the cheapest candidate over the bound, found without probing the dearer
   ones. When none reaches it (or ``max_probes`` run out), the baseline schedule (n = m = T) is
   written, and the report says so. The evidence lists every probe and the frontier among them
   (no probed schedule both cheaper and better).

The schedule, the rule and the evidence (convergence series, every candidate's PSNR and MACs) go
into ``manifest.json``'s ``schedule`` section, atomically; runs take it for whatever they leave
unset (``Schedule.resolve``). The default ``min_psnr`` (32 dB) is set from the shipped
``shapes`` model: over 500 held-out images, every schedule probed at 32 dB or more kept the
attribute classifier's shape accuracy within 1.2 points of the baseline, one at 31.3 dB lost 2.2
(``docs/calibration.md``); other models may want another bound.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cair_export.lab.quality_metrics import DEFAULT_THRESHOLD, psnr, recommend_cache_step, relative_l2
from cair_runtime.errors import InvalidInputError
from cair_runtime.noise import image_seeds
from cair_runtime.schedule import Schedule

DEFAULT_MIN_PSNR = 32.0
DEEP_INTERVALS = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class CalibrateConfig:
    """What the calibration runs; the CLI's flags map onto these fields one to one."""

    engine_dir: Path
    prompts: Path  # text file, one prompt a line
    max_prompts: int | None = 16  # probe images: the first N prompts, one image each
    steps: int = 25  # T the schedule is chosen at (runs with other T scale n and m)
    guidance_scale: float = 7.5
    seed: int = 0
    threshold: float = DEFAULT_THRESHOLD  # convergence: mean relative change of the cross-attention output
    min_psnr: float = DEFAULT_MIN_PSNR  # quality probe: dB against the baseline images
    deep_intervals: tuple[int, ...] = DEEP_INTERVALS  # k and k_p candidates (engines with the shallow graphs)
    max_probes: int | None = None  # stop the walk after this many probes (None: until one is over the bound)
    threads: int = 0  # onnxruntime intra-op threads (0: its default)
    write: bool = True  # False: report only, the manifest stays as it is


class _Convergence:
    """Receives the planning caches after every baseline step; accumulates per-prompt relative changes."""

    def __init__(self, prompts: int, per_half: bool):
        self.prompts, self.per_half = prompts, per_half  # per_half: (2B, ...) caches (fidelity CFG), else merged
        self.previous: dict[tuple[int, str], np.ndarray] = {}
        self.changes: dict[int, np.ndarray] = {}  # evaluation 2.. -> per prompt, mean over modules

    def __call__(self, step: int, first_image: int, caches: dict[str, np.ndarray]) -> None:
        per_image: dict[int, list[float]] = {}
        for name, value in caches.items():
            merged = value.astype(np.float64)  # CAIR's cache: (B, tokens, C), the mean of the two halves
            if self.per_half:
                merged = (merged[:len(merged) // 2] + merged[len(merged) // 2:]) / 2
            for offset, current in enumerate(merged):
                key = (first_image + offset, name)
                if key in self.previous:
                    per_image.setdefault(first_image + offset, []).append(float(relative_l2(current, self.previous[key])))
                self.previous[key] = current
        for image, changes in per_image.items():
            self.changes.setdefault(step, np.full(self.prompts, np.nan))[image] = float(np.mean(changes))

    def series(self) -> tuple[list[int], list[float]]:
        """Evaluations 2.. (T, or T + 1 for PNDM's warm-up) and their mean change over prompts."""
        steps = sorted(self.changes)
        return steps, [float(np.mean(self.changes[step])) for step in steps]


def candidates(converged: int, steps: int, cfg: bool, shallow: bool, deep_intervals: tuple[int, ...],
               guided_shallow: bool = False) -> list[Schedule]:
    """The candidate schedules (see the module docstring), baseline excluded, in a stable order."""
    grid = []
    planning_intervals = deep_intervals if guided_shallow else (1,)
    for n in sorted({converged, min(steps, 2 * converged)} | ({steps} if guided_shallow else set())):
        stops = sorted({n, (n + steps) // 2, steps}) if cfg else [n]
        for m in stops:
            for k in (deep_intervals if shallow and n < steps else (1,)):
                grid += [Schedule(steps, n, m, k, planning_interval=k_p) for k_p in planning_intervals
                         if (n, k_p) != (steps, 1)]  # n = T with k_p = 1 is the baseline itself
    return grid


def frontier(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The probed schedules no other probed one beats on both MACs and PSNR, cheapest first."""
    def beaten(row: dict[str, Any]) -> bool:
        return any(other["gmacs_per_image"] <= row["gmacs_per_image"] and other["psnr_db"] >= row["psnr_db"]
                   and (other["gmacs_per_image"], other["psnr_db"]) != (row["gmacs_per_image"], row["psnr_db"])
                   for other in rows)

    return sorted((row for row in rows if not beaten(row)), key=lambda row: row["gmacs_per_image"])


def schedule_macs(manifest: Any, steps: int, height: int, width: int) -> Callable[[Schedule], float]:
    """UNet MACs per image (conv + linear) of a candidate, counted on the manifest's UNet config (no weights)."""
    from cair_export.core.macs import count_graph_macs, generation_macs, manifest_model

    model = manifest_model(manifest)
    branch = manifest.deep_branch["branch"] if manifest.deep_branch else None
    per_graph = count_graph_macs(model, height, width, fidelity_guidance=manifest.fidelity_guidance,
                                 deep_branch_id=branch)

    def macs(candidate: Schedule) -> float:
        return generation_macs(per_graph, steps, candidate.cache_step, fidelity_guidance=manifest.fidelity_guidance,
                               guidance_stop=candidate.guidance_stop, deep_interval=candidate.deep_interval,
                               skip_mode=candidate.skip_mode,
                               planning_interval=candidate.planning_interval)["conv_linear"]["cair_total"]

    return macs


def calibrate(config: CalibrateConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the calibration; returns the schedule section (with its evidence) it wrote or would write."""
    from cair_export.core.engine_manifest import write_manifest
    from cair_export.core.folder_transaction import export_lock
    from cair_export.lab.profile import read_prompts
    from cair_runtime.manifest import load_manifest
    from cair_runtime.text2image import CairText2Image

    if config.steps < 2:
        raise InvalidInputError(f"steps {config.steps} must be at least 2 to measure a change between steps")
    if not config.min_psnr > 0 or not config.threshold > 0:
        raise InvalidInputError(f"--min-psnr {config.min_psnr} and --threshold {config.threshold} must be positive")
    if not config.deep_intervals or min(config.deep_intervals) < 1:
        raise InvalidInputError(f"deep intervals {config.deep_intervals} must be whole numbers >= 1")
    prompts = read_prompts(config.prompts, config.max_prompts)
    folder = Path(config.engine_dir)
    manifest = load_manifest(folder)
    if manifest.pipeline is None:
        raise InvalidInputError(f"{folder} is a UNet-only export; calibration compares decoded images, so export "
                                "the whole pipeline (a preset or pipeline folder with its text encoder and VAE)")
    started = time.perf_counter()
    steps, seeds = config.steps, image_seeds(config.seed, len(prompts))
    cfg, shallow = manifest.fidelity_guidance == "cfg", "shallow" in manifest.graphs
    guided_shallow = "shallow_planning" in manifest.graphs
    with CairText2Image(folder, threads=config.threads) as pipe:
        batch = pipe.engine.manifest.dim("batch").max

        def generate(candidate: Schedule, observer=None) -> tuple[np.ndarray, float]:
            images, seconds = [], 0.0
            for start in range(0, len(prompts), batch):
                chunk_started = time.perf_counter()
                result = pipe(prompts[start:start + batch], schedule=candidate,
                              guidance_scale=config.guidance_scale, seed=seeds[start:start + batch],
                              cache_observer=None if observer is None else
                              lambda step, first_image, caches, offset=start: observer(step, offset + first_image,
                                                                                        caches))
                seconds += time.perf_counter() - chunk_started
                images.append(result.images)
            return np.concatenate(images), seconds

        baseline_schedule = Schedule(steps, steps, steps)
        convergence = _Convergence(len(prompts), per_half=cfg)
        reference, baseline_s = generate(baseline_schedule, convergence)
        evaluations, mean_change = convergence.series()
        converged = min(steps, recommend_cache_step(evaluations, mean_change, steps, config.threshold))
        progress(f"convergence on the engine: cross-attention output change falls below {config.threshold:g} at "
                 f"step {converged} of {steps} ({len(prompts)} prompts, {baseline_s:.1f} s)")
        height, width = reference.shape[1:3]
        macs = schedule_macs(manifest, steps, height, width)
        baseline_macs = macs(baseline_schedule)
        grid = candidates(converged, steps, cfg, shallow, tuple(sorted(set(config.deep_intervals))), guided_shallow)
        costs = {candidate: macs(candidate) for candidate in grid}
        walk = sorted(grid, key=costs.__getitem__)  # stable: equal costs keep the grid's order
        rows, stop_at = [], None
        for index, candidate in enumerate(walk, 1):
            cost = costs[candidate]
            if (stop_at is not None and cost > stop_at) or (config.max_probes and index > config.max_probes):
                break  # everything left is dearer than a schedule over the bound (or the budget is spent)
            images, seconds = generate(candidate)
            value = psnr(images, reference)  # over the whole stack: pooled MSE
            rows.append({**candidate.parameters(), "psnr_db": value, "gmacs_per_image": cost / 1e9,
                         "speedup_bound": baseline_macs / cost, "seconds": seconds,
                         "meets_bound": value >= config.min_psnr})
            if rows[-1]["meets_bound"] and stop_at is None:
                stop_at = cost  # probe the equally cheap ones too, then stop
            progress(f"probe {index} of at most {len(walk)}: {candidate.label()}: {value:.1f} dB, "
                     f"{rows[-1]['speedup_bound']:.2f}x fewer MACs ({time.perf_counter() - started:.0f} s so far)")
    qualified = [row for row in rows if row["meets_bound"]]
    chosen = min(qualified, key=lambda row: (row["gmacs_per_image"], -row["psnr_db"])) if qualified else None
    pick = Schedule.from_record(chosen) if chosen else baseline_schedule
    section = {
        **pick.parameters(),
        "rule": f"fewest UNet MACs per image among the candidate schedules whose images reach {config.min_psnr:g} "
                f"dB PSNR against the baseline's (n = T), probed cheapest first until one does; n from the step "
                f"where the cross-attention output changes by less than {config.threshold:g} per step; the "
                f"baseline when none reaches it",
        "evidence": {
            "date": datetime.datetime.now().isoformat(timespec="minutes"), "prompts_file": str(config.prompts),
            "prompts": len(prompts), "seed": config.seed, "guidance_scale": config.guidance_scale,
            "height": int(height), "width": int(width), "threshold": config.threshold, "min_psnr": config.min_psnr,
            "convergence": {"steps": evaluations, "mean_relative_change": mean_change},
            "converged_step": converged, "baseline_gmacs_per_image": baseline_macs / 1e9,
            "speedup_bound": chosen["speedup_bound"] if chosen else 1.0, "met": chosen is not None,
            "candidates": rows, "candidate_count": len(grid), "frontier": frontier(rows),
            "seconds": time.perf_counter() - started,
        },
    }
    if config.write:
        with export_lock(folder):  # not while an export replaces the folder
            current = load_manifest(folder, verify="none")  # the newest manifest, in case it changed meanwhile
            updated = dataclasses.replace(current, schedule=section)
            write_manifest(folder, updated)
    return section


def format_calibration(section: dict[str, Any], written: bool) -> str:
    """The candidates table and the recommendation."""
    evidence = section["evidence"]
    lines = [f"converged step n_c = {evidence['converged_step']} (cross-attention output change < "
             f"{evidence['threshold']:g}), {evidence['prompts']} probe images at {evidence['width']}x"
             f"{evidence['height']}, bound {evidence['min_psnr']:g} dB",
             f"{len(evidence['candidates'])} of {evidence.get('candidate_count', len(evidence['candidates']))} "
             "candidates probed, cheapest first",
             f"{'n':>3s} {'m':>3s} {'k':>2s} {'k_p':>3s} {'PSNR dB':>8s} {'GMACs/img':>10s} {'bound':>6s}"]
    for row in evidence["candidates"]:
        lines.append(f"{row['cache_step']:3d} {row['guidance_stop']:3d} {row['deep_interval']:2d} "
                     f"{row.get('planning_interval', 1):3d} {row['psnr_db']:8.2f} {row['gmacs_per_image']:10.3f} "
                     f"{row['speedup_bound']:5.2f}x{'' if row['meets_bound'] else '  below the bound'}")
    verdict = "" if evidence["met"] else " (no probed schedule reached the bound: the baseline)"
    lines.append(f"recommended: n={section['cache_step']} m={section['guidance_stop']} k={section['deep_interval']} "
                 f"k_p={section.get('planning_interval', 1)} ({section['skip_mode']}) at T={section['steps']}, "
                 f"{evidence['speedup_bound']:.2f}x fewer UNet MACs"
                 f"{verdict}; {'written to the manifest' if written else 'not written (--dry-run)'}")
    return "\n".join(lines)
