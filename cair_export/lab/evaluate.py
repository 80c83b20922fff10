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

With ``schedules`` (``--schedules``) the engine is exported with fidelity CFG and a deep branch, and
every schedule (n, m, k, skip mode) of the grid is measured beside CAIR alone (each n of the sweep at
m = n, k = 1, on the same engine, checked against the plain engine's images) and DeepCache alone
(Ma et al. 2024, PyPI ``DeepCache``: its ``DeepCacheSDHelper`` on the diffusers pipeline, from the
same noise); ``cair_export.lab.schedules`` finds the Pareto front and writes the report.
"""

from __future__ import annotations

import time
from importlib import metadata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cair_export.lab.harness import report_heading, run_stamp
from cair_export.lab.quality_metrics import attribute_accuracy, fid_from_features, psnr, ssim
from cair_export.lab.schedules import CAIR, DEEPCACHE, SCHEDULE, TGATE, GridPoint, pareto_analysis, row_label
from cair_runtime.schedule import Schedule
from cair_runtime.errors import InvalidInputError
from cair_runtime.noise import image_seeds, seeded_latents

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
    schedules: tuple[GridPoint, ...] = ()  # (n, m, k, mode) grid on a fidelity-CFG, deep-branch engine; (): n sweep only
    deep_branch: int = 0  # DeepCache's cache_branch_id: the shallow graph's cut, and DeepCache's own
    deepcache_intervals: tuple[int, ...] = ()  # DeepCache's cache_interval values (): no DeepCache rows
    deepcache_images: int = 100  # images per interval for DeepCache


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


def generate_runtime(pipeline: Any, prompts: list[str], schedule: Schedule, config: EvaluateConfig) -> tuple[np.ndarray, float]:
    """uint8 images (N, H, W, 3) under a resolved ``schedule``, and wall seconds for all of them."""
    images, seconds = [], 0.0
    for start in range(0, len(prompts), config.max_batch):
        started = time.perf_counter()
        result = pipeline(prompts[start:start + config.max_batch], schedule=schedule,
                          guidance_scale=config.guidance_scale, seed=config.seed + start)
        seconds += time.perf_counter() - started
        images.append(result.images)
    return np.concatenate(images), seconds


def _generate_torch(call: Callable[[list[str], Any], np.ndarray], prompts: list[str], config: EvaluateConfig,
                    shape: tuple[int, ...]) -> tuple[np.ndarray, float]:
    """A peer's diffusers pipeline over ``prompts`` in batches, image k from ``seeded_latents`` of seed + k.

    ``call(chunk, latents)`` returns float images (N, H, W, 3) in [0, 1]; returns uint8 images and seconds.
    """
    import torch

    images, seconds = [], 0.0
    for start in range(0, len(prompts), config.max_batch):
        chunk = prompts[start:start + config.max_batch]
        latents = torch.from_numpy(seeded_latents(image_seeds(config.seed + start, len(chunk)), shape))
        started = time.perf_counter()
        out = call(chunk, latents)
        seconds += time.perf_counter() - started
        images.append((out * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(images), seconds


def generate_tgate(pipe: Any, prompts: list[str], n: int, config: EvaluateConfig, shape: tuple[int, ...]) -> tuple[np.ndarray, float]:
    """T-GATE's own pipeline at gate step n, cross-attention gating only (self-attention every step)."""
    # sp_interval = fi_interval = 1: self-attention is recomputed every step; only attn2 is gated.
    return _generate_torch(lambda chunk, latents: pipe.tgate(
        chunk, num_inference_steps=config.steps, guidance_scale=config.guidance_scale, latents=latents,
        output_type="np", gate_step=n, sp_interval=1, fi_interval=1, warm_up=0).images, prompts, config, shape)


def generate_deepcache(pipe: Any, prompts: list[str], interval: int, config: EvaluateConfig,
                       shape: tuple[int, ...]) -> tuple[np.ndarray, float]:
    """DeepCache's own helper on the diffusers pipeline: the full UNet every ``interval``-th step from the
    first, the blocks outside ``config.deep_branch`` between; guided (batch 2B) at every step."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=config.deep_branch)  # skip_mode "uniform"
    helper.enable()
    try:
        return _generate_torch(lambda chunk, latents: pipe(
            chunk, num_inference_steps=config.steps, guidance_scale=config.guidance_scale, latents=latents,
            output_type="np").images, prompts, config, shape)
    finally:
        helper.disable()


@dataclass
class _Scoring:
    """What every row is scored against."""

    truth: list[dict[str, str]]  # the prompts' attributes
    real_features: np.ndarray  # (N, 128) of the real drawings: FID's other side
    classifier: Any
    reference: np.ndarray | None = None  # (N, H, W, 3) the CAIR n = T images: PSNR / SSIM's other side


def _score(identity: dict[str, Any], images: np.ndarray, seconds: float, gmacs: float, scoring: _Scoring) -> dict[str, Any]:
    """One row: ``identity`` (method and schedule) with accuracy, FID, PSNR, SSIM, latency and GMACs per image."""
    predictions, features = classify_with_features(scoring.classifier, images)
    count, reference = len(images), scoring.reference
    return {
        **identity, "images": count,
        "accuracy": attribute_accuracy(predictions, scoring.truth[:count], ATTRIBUTES),
        "fid": fid_from_features(features, scoring.real_features[:count]) if count > 2 else float("nan"),
        "psnr_db": float(np.mean([psnr(a, b) for a, b in zip(images, reference[:count])])),
        "ssim": float(np.mean([ssim(a, b) for a, b in zip(images, reference[:count])])),
        "latency_s_per_image": seconds / count, "gmacs_per_image": gmacs,
    }


def _row_fields(schedule: Schedule) -> dict[str, Any]:
    """The fields that name a schedule in a row of the report (T is the run's, in its config)."""
    return {name: value for name, value in schedule.parameters().items() if name != "steps"}


def _check_config(config: EvaluateConfig) -> list[Schedule]:
    """Every flag checked before any work; returns the grid's schedules resolved, less CAIR alone's (m = n, k = 1)."""
    from cair_runtime.schedule import check_cache_step

    if config.num_images < 2:
        raise InvalidInputError(f"--num-images {config.num_images} must be at least 2 (FID needs a covariance)")
    if config.max_batch < 1 or config.threads < 0:
        raise InvalidInputError(f"--max-batch {config.max_batch} must be at least 1 and --threads {config.threads} "
                                "at least 0 (0: the library's default)")
    for n in config.cache_steps:
        check_cache_step(n, config.steps)
    if config.deep_branch < 0 or config.deepcache_images < 0 or any(k < 1 for k in config.deepcache_intervals):
        raise InvalidInputError(f"--deep-branch {config.deep_branch} and --deepcache-images {config.deepcache_images} "
                                "must be at least 0 and --deepcache-intervals "
                                f"{','.join(map(str, config.deepcache_intervals))} each at least 1")
    cair_alone = {Schedule(config.steps, n, n) for n in (*config.cache_steps, config.steps)}
    grid = []
    for point in config.schedules:
        schedule = point.schedule(config.steps)
        schedule.plan(config.steps)  # non-uniform placements may not exist for every count: refuse now, not after an hour
        if schedule not in cair_alone and schedule not in grid:
            grid.append(schedule)
    return grid


def evaluate(config: EvaluateConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sweep (and the schedule grid, DeepCache, T-GATE); returns the JSON-ready figures."""
    import torch

    from cair_export.core.export import ExportConfig
    from cair_export.core.macs import count_deepcache_macs, count_graph_macs, generation_macs
    from cair_export.lab.engines import ensure_engine
    from cair_export.core.models import load_model
    from cair_export.lab.shapes import classifier as shape_classifier
    from cair_export.lab.shapes import data
    from cair_runtime.text2image import CairText2Image

    grid = _check_config(config)
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

    # The grid needs per-half caches (m > n) and the shallow graphs (k > 1), the default export; CAIR alone
    # runs on the lean one (merged caches, no shallow graphs), checked against the grid's export below.
    scheduled = bool(config.schedules)
    export = (ExportConfig(max_batch=config.max_batch, deep_branch=config.deep_branch)
              if scheduled else lean_export(config))
    folder = ensure_engine(config.model, engine_folder(config, scheduled), export, progress=progress)
    size = data.IMAGE_SIZE
    meta = load_model(config.model, device="meta")
    per_graph = count_graph_macs(meta, size, size, fidelity_guidance=export.fidelity_guidance,
                                 deep_branch_id=export.deep_branch)
    # Counted now, so that a branch the UNet lacks fails before the hour of generation.
    deepcache_macs = (count_deepcache_macs(meta, size, size, config.deep_branch) if config.deepcache_intervals
                      else None)

    def gmacs(s: Schedule) -> float:
        return generation_macs(per_graph, config.steps, s.cache_step, fidelity_guidance=export.fidelity_guidance,
                               guidance_stop=s.guidance_stop, deep_interval=s.deep_interval,
                               skip_mode=s.skip_mode, planning_interval=s.planning_interval)["conv_linear"]["cair_total"] / 1e9

    scoring = _Scoring(truth, real_features, classifier)
    rows, first_batch, plain_check = [], {}, None
    with CairText2Image(folder, threads=config.threads) as pipeline:
        pipeline(prompts[:1], num_inference_steps=2, cache_step=1)  # warm-up: session initialisation
        for method, schedules in ((CAIR, [Schedule(config.steps, n, n) for n in cache_steps]), (SCHEDULE, grid)):
            if method == SCHEDULE and scheduled:  # before the grid: CAIR alone here is the plain engine's CAIR
                plain_check = _check_plain_engine(config, prompts, first_batch, progress)
            for schedule in schedules:
                images, seconds = generate_runtime(pipeline, prompts, schedule, config)
                if scoring.reference is None:
                    scoring.reference = images
                if method == CAIR:
                    first_batch[schedule.cache_step] = images[:config.max_batch]
                rows.append(_score({"method": method, **_row_fields(schedule)}, images, seconds, gmacs(schedule),
                                   scoring))
                row = rows[-1]
                progress(f"{row_label(row)}: {seconds:.0f} s, {row['gmacs_per_image']:.3f} GMACs, accuracy shape "
                         f"{row['accuracy']['shape']:.1%} colour {row['accuracy']['colour']:.1%} "
                         f"(all {row['accuracy']['all']:.1%}), FID {row['fid']:.3f}, PSNR {row['psnr_db']:.1f} dB "
                         f"({time.perf_counter() - started:.0f} s so far)")

    tgate_status = "skipped (--tgate-images 0)"
    if config.tgate_images:
        tgate_status = _run_tgate(config, cache_steps, prompts, scoring, gmacs, rows, progress, started)
    deepcache_status = "skipped (no --deepcache-intervals, or --deepcache-images 0)"
    if config.deepcache_intervals and config.deepcache_images:
        deepcache_status = _run_deepcache(config, prompts, deepcache_macs, scoring, rows, progress, started)
    stamp = run_stamp("")
    figures = {"config": {**asdict(config), "classifier": str(config.classifier or shape_classifier.DEFAULT_PATH),
                          "engines_dir": str(config.engines_dir)},
               "engine": str(folder), "date": stamp["date"], "machine": stamp["machine"],
               "real": real, "rows": rows, "tgate": tgate_status, "seconds": time.perf_counter() - started}
    if scheduled or config.deepcache_intervals:
        figures.update(deepcache=deepcache_status, plain_check=plain_check, macs=MACS_NOTE,
                       pareto=pareto_analysis(rows, config.steps))
    return figures


MACS_NOTE = ("CAIR rows and the combined schedules: `generation_macs` over `count_graph_macs(model, 64, 64, "
             "fidelity_guidance='cfg', deep_branch_id=B)`: n planning evaluations at 2B, fidelity and shallow ones "
             "at 2B up to m and at B after. DeepCache rows: DeepCache guides every step and caches no "
             "cross-attention, so it is n = 0, m = T: its full steps (every k-th from the first) cost the planning "
             "graph's count and its shallow steps the blocks outside branch B at 2B with their cross-attention "
             "computed (`count_deepcache_macs`, `deepcache_generation_macs`; CAIR's shallow graph replays that "
             "cross-attention from its caches instead). Both counts equal torch's FlopCounterMode over the peer's "
             "own `DeepCacheSDHelper` (tests/test_evaluate_schedules.py). Without --schedules the CAIR rows count the "
             "plain export, whose totals at m = n, k = 1 are the same.")


def lean_export(config: EvaluateConfig):
    """CAIR alone's export: merged caches (m = n), no shallow graphs."""
    from cair_export.core.export import ExportConfig

    return ExportConfig(max_batch=config.max_batch, fidelity_guidance="none", deep_branch=None)


def engine_folder(config: EvaluateConfig, scheduled: bool) -> Path:
    """``engines_dir/<model>-b<max_batch>``, and ``...-cfg-deep<B>`` for the schedule grid's export."""
    name = f"{Path(config.model).name}-b{config.max_batch}"
    return config.engines_dir / (f"{name}-cfg-deep{config.deep_branch}" if scheduled else name)


def _check_plain_engine(config: EvaluateConfig, prompts: list[str], first_batch: dict[int, np.ndarray],
                        progress: Callable[[str], None]) -> dict[str, Any]:
    """CAIR alone on the schedule engine (m = n, k = 1) against the plain engine, over the first batch of images."""
    from cair_export.lab.engines import ensure_engine
    from cair_runtime.text2image import CairText2Image

    plain = ensure_engine(config.model, engine_folder(config, False), lean_export(config), progress=progress)
    count = min(config.max_batch, config.num_images)
    worst = 0
    with CairText2Image(plain, threads=config.threads) as pipeline:
        for n, images in first_batch.items():
            expected, _ = generate_runtime(pipeline, prompts[:count], Schedule(config.steps, n, n), config)
            worst = max(worst, int(np.abs(expected.astype(np.int16) - images).max()))
    progress(f"CAIR alone on the schedule engine vs the plain engine ({count} images at n = "
             f"{', '.join(map(str, first_batch))}): largest pixel difference {worst}")
    return {"engine": str(plain), "images": count, "cache_steps": list(first_batch), "max_abs_difference": worst,
            "identical": worst == 0}


def _peer_pipeline(config: EvaluateConfig) -> tuple[Any, tuple[int, ...]]:
    """A diffusers pipeline of the model, loaded afresh (a peer may patch its UNet), and the latent shape (C, h, w)."""
    from cair_export.core.models import load_model

    model = load_model(config.model, with_pipeline=True)
    unet = model.unet.config
    return model.diffusers_pipeline(), (unet.in_channels, unet.sample_size, unet.sample_size)


def _run_peer(method: str, runs: list[tuple[dict[str, Any], float, Callable[[], tuple[np.ndarray, float]]]],
              scoring: _Scoring, rows: list[dict[str, Any]], progress: Callable[[str], None], started: float) -> str | None:
    """A peer package's rows appended to ``rows``, one per (schedule fields, GMACs, generate); the failure, if any."""
    for identity, gmacs, generate in runs:
        try:
            images, seconds = generate()
        except Exception as error:  # a peer package failing is a result to report, not a crash
            return (f"failed at {row_label({'method': method, **identity})}: {type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}")
        rows.append(_score({"method": method, **identity}, images, seconds, gmacs, scoring))
        row = rows[-1]
        progress(f"{row_label(row)}: {seconds:.0f} s, accuracy shape {row['accuracy']['shape']:.1%} colour "
                 f"{row['accuracy']['colour']:.1%} (all {row['accuracy']['all']:.1%}), FID {row['fid']:.3f}, "
                 f"PSNR vs CAIR n=T {row['psnr_db']:.1f} dB ({time.perf_counter() - started:.0f} s so far)")
    return None


def _run_tgate(config, cache_steps, prompts, scoring, gmacs, rows, progress, started) -> str:
    """T-GATE rows appended to ``rows``; returns what happened, for the report (a failure is a result)."""
    try:
        from tgate import TgateSDLoader
    except ImportError as error:
        return f"not run: tgate is not importable ({error}); pip install tgate --no-deps"
    pipe, shape = _peer_pipeline(config)
    pipe = TgateSDLoader(pipe)
    count = min(config.tgate_images, len(prompts))
    runs = [(_row_fields(Schedule(config.steps, n, n)), gmacs(Schedule(config.steps, n, n)),
             lambda n=n: generate_tgate(pipe, prompts[:count], n, config, shape))
            for n in sorted(set(config.tgate_cache_steps or cache_steps), reverse=True)]
    failure = _run_peer(TGATE, runs, scoring, rows, progress, started)
    return failure or f"ran on {count} images per n with diffusers' current version (tgate 1.0.0 works unpinned)"


def _run_deepcache(config, prompts, per_evaluation, scoring, rows, progress, started) -> str:
    """DeepCache rows (n = 0, m = T, k = its interval) appended to ``rows``; returns what happened, for the report."""
    from cair_export.core.macs import deepcache_generation_macs

    try:
        from DeepCache import DeepCacheSDHelper  # noqa: F401
    except ImportError as error:
        return f"not run: DeepCache is not importable ({error}); pip install DeepCache --no-deps"
    pipe, shape = _peer_pipeline(config)
    count = min(config.deepcache_images, len(prompts))
    runs = [(GridPoint(0, config.steps, k).as_dict(),
             deepcache_generation_macs(per_evaluation, config.steps, k)["conv_linear"]["deepcache_total"] / 1e9,
             lambda k=k: generate_deepcache(pipe, prompts[:count], k, config, shape))
            for k in sorted(set(config.deepcache_intervals))]
    failure = _run_peer(DEEPCACHE, runs, scoring, rows, progress, started)
    return failure or (f"DeepCacheSDHelper of DeepCache {metadata.version('DeepCache')} (uniform, branch {config.deep_branch}) on {count} images per "
                       "interval, on diffusers' StableDiffusionPipeline of the same model")


def format_markdown(figures: dict[str, Any], command: str) -> str:
    """The quality table (one row per method and n) and the issue's targets at n = 5."""
    cfg = figures["config"]
    lines = [
        *report_heading("Quality against cache step n (`shapes`)", figures, command),
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
