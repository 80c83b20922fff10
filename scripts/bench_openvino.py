"""OpenVINO against onnxruntime on the CPU: speed, start-up and quality per precision, in one process.

``speed ENGINE``: per-evaluation times of the UNet graphs (planning at batch 2B, fidelity and shallow
at batch B) for onnxruntime fp32 and OpenVINO at each precision, alternating over ``--rounds``
(medians); the loop times at n = T and n = ``--cache-step`` they imply (n*P + (T-n)*F); one
measured 25-step generation per precision at n = 5 (same embeddings, seed) whose final latents
give the PSNR against onnxruntime fp32; OpenVINO's start-up without and with its compile cache;
the fraction of the CPU's bf16 peak reached (``--peak-gflops``, see docs/openvino.md).

``ep ENGINE``: onnxruntime's OpenVINO execution provider against OpenVINO's own API on one graph.

``shapes``: images of the shipped ``shapes`` model per precision from the same seeds: PSNR against
the onnxruntime fp32 images and the attribute classifier's accuracy.

    python scripts/bench_openvino.py speed /tmp/sd21 --rounds 3 --threads 2
    python scripts/bench_openvino.py shapes --num-images 200 --threads 2
    PYTHONPATH=DIR:$PYTHONPATH python scripts/bench_openvino.py ep /tmp/sd21   # DIR: onnxruntime-openvino
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np


def latent_psnr(got: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB with the reference's largest magnitude as the peak (latents have no fixed range)."""
    mse = float(np.mean((got.astype(np.float64) - reference) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(float(np.abs(reference).max()) ** 2 / mse)


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    wanted = ("avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni", "avx512_fp16", "avx512f")
    return [flag for flag in wanted if flag in line.split()]


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def engines(folder: str, precisions: list[str], threads: int, switch_graph: bool):
    from cair_runtime.pipeline import CairEngine

    made = {"onnxruntime fp32": CairEngine(folder, threads=threads, max_concurrency=1)}
    for precision in precisions:
        made[f"openvino {precision}"] = CairEngine(folder, "openvino", precision=precision, threads=threads,
                                                   max_concurrency=1)
        if switch_graph:
            made[f"openvino {precision} switch graph"] = CairEngine(folder, "openvino", precision=precision,
                                                                    threads=threads, max_concurrency=1, one_graph=True)
    return made


def per_evaluation(made, rounds: int, latent: int, text_len: int) -> dict[str, dict[str, float]]:
    """Median seconds of one planning (2B = 2), fidelity and shallow (B = 1) evaluation per engine, alternating."""
    rng = np.random.default_rng(0)
    any_engine = next(iter(made.values()))
    dims = {"batch": 1, "latent_height": latent, "latent_width": latent, "text_len": text_len}
    text = rng.standard_normal((2, text_len, any_engine.context_dim), dtype=np.float32)
    sample = {2: rng.standard_normal((2, 4, latent, latent), dtype=np.float32),
              1: rng.standard_normal((1, 4, latent, latent), dtype=np.float32)}
    timestep = np.array([500.0], np.float32)
    contexts = {}
    for name, engine in made.items():
        context = engine.backend.new_context()
        context.prepare(dims)
        context.set_inputs("planning", {"encoder_hidden_states": text})
        context.run("planning", sample[2], timestep)  # warm-up, and the caches fidelity reads
        context.switch_to_fidelity()
        if engine.manifest.fidelity_guidance == "cfg":
            context.merge_halves()  # per-half caches -> batch B, as at a guidance stop
        context.run("fidelity", sample[1], timestep)
        contexts[name] = context
    kinds = ["planning", "fidelity"] + (["shallow"] if "shallow" in any_engine.backend.kinds else [])
    times = {name: {kind: [] for kind in kinds} for name in made}
    for round_ in range(rounds):
        for name, context in contexts.items():
            for kind in kinds:
                started = time.perf_counter()
                context.run(kind, sample[2 if kind == "planning" else 1], timestep)
                times[name][kind].append(time.perf_counter() - started)
            print(f"  round {round_ + 1}: {name}: " + ", ".join(f"{k} {times[name][k][-1]:.2f} s" for k in kinds),
                  flush=True)
    for context in contexts.values():
        context.close()
    return {name: {kind: statistics.median(values) for kind, values in per.items()} for name, per in times.items()}


def generations(made, steps: int, cache_step: int, text_len: int, schedules: dict[str, dict]) -> dict:
    """One measured generation per engine and schedule (same embeddings and seed); final latents and seconds."""
    rng = np.random.default_rng(1)
    any_engine = next(iter(made.values()))
    embeds = {name: rng.standard_normal((1, text_len, any_engine.context_dim), dtype=np.float32)
              for name in ("prompt_embeds", "negative_prompt_embeds")}
    out = {}
    for label, schedule in schedules.items():
        for name, engine in made.items():
            started = time.perf_counter()
            latents = engine.denoise(**embeds, num_inference_steps=steps, seed=0, **schedule).latents
            out[(label, name)] = (latents, time.perf_counter() - started)
            print(f"  {label}: {name}: {out[(label, name)][1]:.1f} s", flush=True)
    return out


def startup(folder: str, precision: str, threads: int) -> dict[str, float]:
    """Seconds to build the OpenVINO backend: compiling (no cache), then twice on a fresh cache (fill, reuse)."""
    from cair_runtime.pipeline import CairEngine

    root = Path(tempfile.mkdtemp(prefix="ov-cache-"))
    seconds = {}
    try:
        for label, options in (("no cache", {"compile_cache": False}), ("cache empty (compile, write)",
                                                                      {"cache_dir": root}),
                               ("cache warm", {"cache_dir": root})):
            started = time.perf_counter()
            CairEngine(folder, "openvino", precision=precision, threads=threads, **options).close()
            seconds[label] = time.perf_counter() - started
            print(f"  start-up {precision}, {label}: {seconds[label]:.1f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return seconds


def cmd_speed(args) -> dict:
    from cair_runtime.manifest import load_manifest

    manifest = load_manifest(args.engine_dir)
    latent = args.height // manifest.vae_scale_factor
    text_len = manifest.dim("text_len").opt
    print(f"load before: {load()}; CPU flags: {' '.join(cpu_flags())}", flush=True)
    made = engines(args.engine_dir, args.precisions, args.threads, args.switch_graph)
    report = {"engine": args.engine_dir, "threads": args.threads, "latent": latent, "cpu_flags": cpu_flags(),
              "load_before": load(), "notes": {n: e.backend.precision_note for n, e in made.items()
                                               if hasattr(e.backend, "precision_note")}}
    evaluation = per_evaluation(made, args.rounds, latent, text_len)
    steps, n = args.steps, args.cache_step
    report["per_evaluation_s"] = evaluation
    report["loop_s_from_medians"] = {name: {"n=T": steps * e["planning"], f"n={n}": n * e["planning"] +
                                            (steps - n) * e["fidelity"]} for name, e in evaluation.items()}
    if args.gmacs_planning:
        # Planning at batch 2B: MACs of conv and linear layers (cair-export macs), 2 FLOPs each.
        report["bf16_peak_fraction_planning"] = {
            name: 2 * args.gmacs_planning / e["planning"] / args.peak_gflops for name, e in evaluation.items()}
    if args.generate:
        schedules = {f"n={n}": {"cache_step": n}}
        if "shallow" in manifest.schedule_graphs:
            schedules[f"n={n} k={args.deep_interval}"] = {"cache_step": n, "deep_interval": args.deep_interval}
        generated = generations(made, steps, n, text_len, schedules)
        report["generation"] = {}
        for (label, name), (latents, seconds) in generated.items():
            reference = generated[(label, "onnxruntime fp32")][0]
            report["generation"][f"{label} {name}"] = {"seconds": seconds,
                                                       "latent_psnr_db": latent_psnr(latents, reference)}
    for engine in made.values():
        engine.close()
    if args.startup:
        report["startup_s"] = {precision: startup(args.engine_dir, precision, args.threads)
                               for precision in args.precisions}
    report["load_after"] = load()
    return report


def cmd_shapes(args) -> dict:
    from cair_export.core.export import ExportConfig
    from cair_export.lab.engines import ensure_engine
    from cair_export.lab.evaluate import classify_with_features, held_out_prompts
    from cair_export.lab.quality_metrics import attribute_accuracy, psnr
    from cair_export.lab.shapes import classifier as shape_classifier
    from cair_runtime.manifest import load_manifest
    from cair_runtime.text2image import CairText2Image

    folder = ensure_engine("shapes", Path(args.engines_dir) / "shapes", ExportConfig(max_batch=args.batch))
    if "int8" in args.precisions and not any(r.backend == "openvino" for r in load_manifest(folder).engines):
        from cair_export.deploy.quantize import QuantizeConfig, quantize_folder

        started = time.perf_counter()
        quantize_folder(folder, QuantizeConfig(threads=args.threads))  # hybrid, 4 generations of 25 steps
        print(f"  quantized in {time.perf_counter() - started:.0f} s", flush=True)
    classifier = shape_classifier.load_classifier(shape_classifier.DEFAULT_PATH)
    prompts, truth = held_out_prompts(args.num_images)
    pipelines = {"onnxruntime fp32": CairText2Image(folder, threads=args.threads)}
    for precision in args.precisions:
        pipelines[f"openvino {precision}"] = CairText2Image(folder, "openvino", precision=precision,
                                                            threads=args.threads)
    print(f"load before: {load()}; CPU flags: {' '.join(cpu_flags())}", flush=True)
    images = {name: [] for name in pipelines}
    seconds = {name: 0.0 for name in pipelines}
    for start in range(0, len(prompts), args.batch):
        for name, pipeline in pipelines.items():  # alternating, batch by batch
            started = time.perf_counter()
            result = pipeline(prompts[start:start + args.batch], num_inference_steps=args.steps,
                              cache_step=args.cache_step, seed=start)
            seconds[name] += time.perf_counter() - started
            images[name].append(result.images)
        print(f"  {start + args.batch}/{len(prompts)} images", flush=True)
    report = {"images": len(prompts), "steps": args.steps, "cache_step": args.cache_step, "rows": {}}
    reference = np.concatenate(images["onnxruntime fp32"])
    for name, parts in images.items():
        stack = np.concatenate(parts)
        predictions, _ = classify_with_features(classifier, stack)
        accuracy = attribute_accuracy(predictions, truth, ("shape", "colour", "background", "size", "position"))
        same = [psnr(a, b) for a, b in zip(stack, reference)]
        report["rows"][name] = {"accuracy_all": accuracy["all"], "accuracy": accuracy,
                                "psnr_db_mean": float(np.mean([min(v, 100.0) for v in same])),
                                "psnr_db_min": float(min(same)), "identical_images": int(sum(v == float("inf")
                                                                                              for v in same)),
                                "seconds_per_image": seconds[name] / len(prompts)}
    for pipeline in pipelines.values():
        pipeline.close()
    report["load_after"] = load()
    return report


def cmd_ep(args) -> dict:
    """onnxruntime's OpenVINO execution provider against OpenVINO's own API on one UNet graph, alternating.

    Needs the onnxruntime-openvino build importable as ``onnxruntime`` (it replaces the CPU build: run
    with its install folder first on PYTHONPATH).
    """
    import onnxruntime as ort
    import openvino as ov

    from cair_runtime.manifest import load_manifest

    if "OpenVINOExecutionProvider" not in ort.get_available_providers():
        raise SystemExit("this onnxruntime has no OpenVINOExecutionProvider: put onnxruntime-openvino first on "
                         "PYTHONPATH (pip install --target DIR onnxruntime-openvino)")
    manifest = load_manifest(args.engine_dir)
    graph = manifest.graphs[args.graph]
    latent = args.height // manifest.vae_scale_factor
    dims = {"batch": 1, "latent_height": latent, "latent_width": latent, "text_len": manifest.dim("text_len").opt}
    rng = np.random.default_rng(0)
    feeds = {spec.name: (np.array([500.0], np.float32) if spec.name == "timestep" else
                         rng.standard_normal(spec.resolve(dims), dtype=np.float32)) for spec in graph.inputs}
    path = str(Path(args.engine_dir) / graph.file)
    runners, built = {}, {}
    for precision, hint in (("fp32", "f32"), ("bf16", "bf16")):
        if precision not in args.precisions:
            continue
        started = time.perf_counter()
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(path, options, providers=["OpenVINOExecutionProvider"], provider_options=[{
            "device_type": "CPU", "num_of_threads": str(args.threads),
            "load_config": json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": hint}})}])
        built[f"ep {precision}"] = time.perf_counter() - started
        runners[f"ep {precision}"] = lambda session=session: session.run(None, feeds)
        started = time.perf_counter()
        compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                         "INFERENCE_NUM_THREADS": args.threads,
                                                         "PERFORMANCE_HINT": "LATENCY"})
        built[f"api {precision}"] = time.perf_counter() - started
        request = compiled.create_infer_request()
        runners[f"api {precision}"] = lambda request=request: request.infer(feeds)
    outputs = {name: run() for name, run in runners.items()}  # warm-up
    del outputs
    times = {name: [] for name in runners}
    for round_ in range(args.rounds):
        for name, run in runners.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
            print(f"  round {round_ + 1}: {name} {times[name][-1]:.2f} s", flush=True)
    return {"graph": args.graph, "latent": latent, "onnxruntime": ort.__version__, "openvino": ov.get_version(),
            "load": load(), "build_s": built, "median_s": {n: statistics.median(v) for n, v in times.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    speed = commands.add_parser("speed", help="per-evaluation and loop times, start-up, latent PSNR")
    speed.add_argument("engine_dir")
    speed.add_argument("--height", type=int, default=256, help="pixels (default 256)")
    speed.add_argument("--rounds", type=int, default=3)
    speed.add_argument("--steps", type=int, default=25)
    speed.add_argument("--cache-step", type=int, default=5)
    speed.add_argument("--deep-interval", type=int, default=3)
    speed.add_argument("--switch-graph", action="store_true", help="also OpenVINO on the switch graph (unet.onnx)")
    speed.add_argument("--generate", action="store_true", help="also one measured generation per engine (PSNR)")
    speed.add_argument("--startup", action="store_true", help="also the start-up without and with the compile cache")
    speed.add_argument("--gmacs-planning", type=float, help="GMACs of one planning evaluation (cair-export macs)")
    speed.add_argument("--peak-gflops", type=float, default=0.0, help="the CPU's bf16 peak in GFLOP/s")
    shapes = commands.add_parser("shapes", help="shapes images per precision: PSNR vs fp32 and accuracy")
    shapes.add_argument("--engines-dir", default="engines")
    shapes.add_argument("--num-images", type=int, default=200)
    shapes.add_argument("--batch", type=int, default=8)
    shapes.add_argument("--steps", type=int, default=25)
    shapes.add_argument("--cache-step", type=int, default=5)
    ep = commands.add_parser("ep", help="onnxruntime's OpenVINO EP against OpenVINO's API on one graph")
    ep.add_argument("engine_dir")
    ep.add_argument("--graph", default="fidelity")
    ep.add_argument("--height", type=int, default=256)
    ep.add_argument("--rounds", type=int, default=3)
    for sub in (speed, shapes, ep):
        sub.add_argument("--threads", type=int, default=2)
        sub.add_argument("--precisions", default="fp32,bf16", help="OpenVINO precisions, comma separated")
        sub.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    args.precisions = [p for p in args.precisions.split(",") if p]
    if args.command == "speed" and args.gmacs_planning and not args.peak_gflops:
        parser.error("--gmacs-planning needs --peak-gflops (the CPU's bf16 peak)")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    report = {"speed": cmd_speed, "shapes": cmd_shapes, "ep": cmd_ep}[args.command](args)
    text = json.dumps(report, indent=2, default=float)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
