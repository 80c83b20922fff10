"""Runtime latency: baseline (n = T) against CAIR (n = 5, 10), side by side in one run.

For each model, the engine is exported once (reused from --engines-dir afterwards), then the
configurations run alternately: one warm-up each, then --repeats rounds of every configuration in
turn, so drift on the machine hits them alike. Reports the median, the measured speed-up over
n = T, and the MAC-bound speed-up of ``cair-export macs`` (conv+linear convention) beside it.

    python scripts/bench_runtime.py --models tiny-sd21,sd21 --size 256 --steps 25
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from cair_export.cli import int_list
from cair_export.lab.harness import cpu_name


def _machine() -> str:
    import onnxruntime as ort

    return f"{cpu_name()}, {os.cpu_count()} cores, onnxruntime {ort.__version__} CPUExecutionProvider"


def _engine_dir(engines: Path, model: str, size: int) -> Path:
    from cair_export.core.export import ExportConfig
    from cair_export.lab.engines import ensure_engine

    return ensure_engine(model, engines / f"{model}-{size}", ExportConfig(height=size, width=size, max_batch=1),
                         with_pipeline=False, progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True))


def bench_model(model: str, size: int, steps: int, cache_steps: list[int], repeats: int, engines: Path,
                threads: int) -> dict:
    from cair_export.core.macs import count_graph_macs, generation_macs
    from cair_export.core.models import load_model
    from cair_runtime.pipeline import CairEngine

    engine = CairEngine(_engine_dir(engines, model, size), threads=threads)
    rng = np.random.default_rng(0)
    text_len = engine.manifest.dim("text_len").opt
    inputs = {"prompt_embeds": rng.standard_normal((1, text_len, engine.context_dim), dtype=np.float32),
              "height": size, "width": size, "num_inference_steps": steps, "scheduler": "ddim"}
    if engine.added_conditions:
        inputs["text_embeds"] = rng.standard_normal((1, engine.pooled_dim), dtype=np.float32)
    per_graph = count_graph_macs(load_model(model, device="meta"), size, size)

    times: dict[int, list[float]] = {n: [] for n in cache_steps}
    switch: dict[int, list[float]] = {n: [] for n in cache_steps}
    step_time: dict[int, list[float]] = {n: [] for n in cache_steps}
    for round_index in range(repeats + 1):  # round 0 is the warm-up
        for n in cache_steps:
            started = time.perf_counter()
            result = engine.denoise(**inputs, cache_step=n)
            elapsed = time.perf_counter() - started
            label = "warm-up" if round_index == 0 else f"round {round_index}/{repeats}"
            print(f"  {model} n={n:<3d} {label}: {elapsed:.3f} s", file=sys.stderr, flush=True)
            if round_index:
                times[n].append(elapsed)
                switch[n].append(result.timings.switch_s)
                step_time[n].append(result.timings.planning_s / max(result.timings.planning_steps, 1))

    baseline = statistics.median(times[steps])
    rows = []
    for n in cache_steps:
        median = statistics.median(times[n])
        bound = generation_macs(per_graph, steps, n)["conv_linear"]["speedup_bound"]
        speedup = baseline / median
        rows.append({"cache_step": n, "median_s": median, "runs_s": times[n], "speedup": speedup,
                     "mac_bound": bound, "efficiency": speedup / bound,
                     "switch_fraction_of_step": statistics.median(switch[n]) / statistics.median(step_time[n])})
    return {"model": model, "size": size, "steps": steps, "repeats": repeats, "rows": rows}


def markdown(results: list[dict], machine: str, command: str) -> str:
    lines = [f"Machine: {machine}", f"Command: `{command}`", "",
             "| model | size | n of T | median latency (s) | speed-up | MAC bound | efficiency | switch / step |",
             "|---|---|---|---|---|---|---|---|"]
    for result in results:
        for row in result["rows"]:
            lines.append(f"| {result['model']} | {result['size']} | {row['cache_step']} of {result['steps']} | "
                         f"{row['median_s']:.3f} | {row['speedup']:.2f}x | {row['mac_bound']:.2f}x | "
                         f"{row['efficiency']:.0%} | {row['switch_fraction_of_step']:.3%} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-sd21,sd21", help="comma-separated presets or folders")
    parser.add_argument("--size", type=int, default=256, help="pixel height and width (default 256)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cache-steps", type=int_list, default=(5, 10), help="CAIR cache steps n besides the baseline n = T")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds after one warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = all cores)")
    parser.add_argument("--engines-dir", type=Path, default=Path("engines"))
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    cache_steps = [args.steps] + [n for n in args.cache_steps if n != args.steps]
    results = [bench_model(model, args.size, args.steps, cache_steps, args.repeats, args.engines_dir, args.threads)
               for model in args.models.split(",")]
    machine = _machine()
    command = "python scripts/bench_runtime.py " + " ".join(sys.argv[1:])
    print(markdown(results, machine, command))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "command": command, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
