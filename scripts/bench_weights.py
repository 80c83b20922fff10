"""Weights once: resident memory, load time and UNet-loop latency with shared and private weights.

Each configuration runs in a fresh process (so peak resident memory is its own): load a
``CairEngine``, one generation to warm up, then ``--repeats`` timed generations; configurations
alternate across ``--rounds``. "two/all" is a session per graph, each reading its own copy of the
weights (what every load did before the switch graph; onnxruntime's default optimisations and
prepacking); "switch/all" runs both phases on the switch graph's one session (the default for
folders that have one); "shared/extended" gives the two sessions the same memory-mapped buffers
(``share_weights``: prepacking off, optimisation level ``extended``).

    python scripts/bench_weights.py /tmp/sd21 --size 64 --steps 2 --repeats 3 --rounds 2 --json docs/weights_once.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {"two/all": {"one_graph": False, "graph_optimization": "all"},
           "switch/all": {"one_graph": True, "graph_optimization": "all"},
           "shared/extended": {"one_graph": False, "share_weights": True, "graph_optimization": "extended"},
           "shared/all": {"one_graph": False, "share_weights": True, "graph_optimization": "all"}}
BASELINE = "two/all"


def measure(folder: str, options: dict, size: int, steps: int, repeats: int) -> dict:
    import numpy as np

    from cair_runtime.pipeline import CairEngine

    started = time.perf_counter()
    engine = CairEngine(folder, **options)
    load_s = time.perf_counter() - started
    text_len = engine.manifest.dim("text_len").opt
    rng = np.random.default_rng(0)
    prompt = rng.standard_normal((1, text_len, engine.context_dim), dtype=np.float32)
    pooled = {} if engine.pooled_dim is None else {  # SDXL's pooled text embedding
        "text_embeds": rng.standard_normal((1, engine.pooled_dim), dtype=np.float32)}
    run = lambda: engine.denoise(prompt, height=size, width=size, num_inference_steps=steps, cache_step=1,  # noqa: E731
                                 seed=0, scheduler="ddim", **pooled)
    first = run().latents
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"load_s": load_s, "loop_s": statistics.median(times), "peak_rss_bytes": peak,
            "latents_sha": __import__("hashlib").sha256(first.tobytes()).hexdigest()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir")
    parser.add_argument("--size", type=int, default=64, help="pixels (height = width)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--configs", default="two/all,switch/all,shared/extended",
                        help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: one configuration
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.engine_dir, CONFIGS[args.one], args.size, args.steps, args.repeats)))
        return 0

    from cair_export.lab.harness import run_stamp
    from cair_runtime.manifest import load_manifest

    manifest = load_manifest(args.engine_dir)
    weights = sum(r.size for r in manifest.files if r.path == (manifest.weights or {}).get("file"))
    rows: dict[str, list[dict]] = {name: [] for name in args.configs.split(",")}
    for round_ in range(args.rounds):
        for name in rows:
            child = subprocess.run([sys.executable, __file__, args.engine_dir, "--one", name, "--size", str(args.size),
                                    "--steps", str(args.steps), "--repeats", str(args.repeats)],
                                   capture_output=True, text=True, check=True)
            rows[name].append(json.loads(child.stdout.strip().splitlines()[-1]))
            row = rows[name][-1]
            print(f"  round {round_ + 1} {name}: load {row['load_s']:.1f} s, loop {row['loop_s']:.3f} s, "
                  f"peak {row['peak_rss_bytes'] / 1e9:.2f} GB", file=sys.stderr)
    summary = {name: {key: statistics.median(r[key] for r in runs) for key in ("load_s", "loop_s", "peak_rss_bytes")}
               | {"latents_sha": {r["latents_sha"] for r in runs}.pop()} for name, runs in rows.items()}
    base = summary.get(BASELINE)
    print(f"{args.engine_dir}: weights file {weights / 1e9:.2f} GB; {args.size} px, {args.steps} steps, batch 1")
    print(f"{'configuration':18s} {'load (s)':>9s} {'loop (s)':>9s} {'vs two':>10s} {'peak RSS (GB)':>14s} {'x weights':>9s} latents")
    for name, row in summary.items():
        ratio = f"{row['loop_s'] / base['loop_s']:.3f}x" if base else "-"
        print(f"{name:18s} {row['load_s']:9.1f} {row['loop_s']:9.3f} {ratio:>10s} {row['peak_rss_bytes'] / 1e9:14.2f} "
              f"{row['peak_rss_bytes'] / weights if weights else float('nan'):9.2f} "
              f"{'-' if not base else 'same bits' if row['latents_sha'] == base['latents_sha'] else 'differ'}")
    if args.json:
        args.json.write_text(json.dumps({**run_stamp("python " + " ".join(sys.argv)), "weights_bytes": weights,
                                         "size": args.size, "steps": args.steps, "summary": summary, "rounds": rows},
                                        indent=2, default=list) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
