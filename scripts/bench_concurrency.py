"""The runtime inside a service: throughput with concurrent callers, and the start-up of an engine folder.

1. Images per second on ``shapes`` (64x64, text to image end to end) with 1, 2 and 4 callers
   sharing one ``CairText2Image`` (``max_concurrency`` = callers), each caller generating its
   share of a fixed set of images. Levels alternate within each round; medians are reported,
   with the ratio to one caller.
2. Start-up of an engine folder (``--startup-folder``, e.g. an sd21 export): the manifest check
   alone and a whole ``CairEngine`` load, with every file re-hashed (``verify="full"``, what every
   load did before) against the default ``verify="fast"`` (no hashing while the files are as the
   last full verification saw them). Alternating, median of ``--startup-repeats``; the page cache
   is warm after the first load, so the figures are the hashing cost, not the disk's.

    python scripts/bench_concurrency.py --images 16 --repeats 3 --startup-folder /tmp/sd21 --json docs/concurrency.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = ["a small red circle on a white background", "a large blue square left of a green triangle",
           "a yellow star in the middle on a black background", "a small purple triangle on a grey background"]


def _shapes_engine(folder: Path) -> Path:
    from cair_export.export import ExportConfig, export_model
    from cair_export.models import load_model

    if not (folder / "manifest.json").is_file():
        print(f"exporting shapes to {folder} (once)", file=sys.stderr)
        export_model(load_model("shapes", with_pipeline=True), folder, ExportConfig(), progress=lambda m: None)
    return folder


def bench_throughput(folder: Path, levels: list[int], images: int, steps: int, repeats: int, threads: int) -> dict:
    from cair_runtime.text2image import CairText2Image

    pipelines = {level: CairText2Image(folder, threads=threads, max_concurrency=level) for level in levels}
    requests = [(PROMPTS[k % len(PROMPTS)], k) for k in range(images)]

    def run(level: int) -> float:
        pipeline = pipelines[level]
        started = time.perf_counter()
        with ThreadPoolExecutor(level) as pool:
            list(pool.map(lambda r: pipeline(r[0], num_inference_steps=steps, seed=r[1]), requests))
        return images / (time.perf_counter() - started)

    for level in levels:  # warm-up: sessions, contexts, page cache
        run(level)
    rates: dict[int, list[float]] = {level: [] for level in levels}
    for round_ in range(repeats):
        for level in levels:
            rates[level].append(run(level))
            print(f"  round {round_ + 1}: {level} caller(s) {rates[level][-1]:.2f} images/s", file=sys.stderr)
    for pipeline in pipelines.values():
        pipeline.close()
    base = statistics.median(rates[levels[0]])
    return {str(level): {"images_per_s": statistics.median(r), "rounds": r, "ratio": statistics.median(r) / base}
            for level, r in rates.items()}


def bench_startup(folder: Path, repeats: int) -> dict:
    from cair_runtime.manifest import load_manifest
    from cair_runtime.pipeline import CairEngine

    size = sum(record.size for record in load_manifest(folder, verify="full").files)  # also records the stamp
    times: dict[str, list[float]] = {"manifest_full": [], "manifest_fast": [], "engine_full": [], "engine_fast": []}
    for round_ in range(repeats):
        for verify in ("full", "fast"):
            started = time.perf_counter()
            load_manifest(folder, verify=verify)
            times[f"manifest_{verify}"].append(time.perf_counter() - started)
            started = time.perf_counter()
            CairEngine(folder, verify=verify).close()
            times[f"engine_{verify}"].append(time.perf_counter() - started)
        print(f"  round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), file=sys.stderr)
    return {"folder": str(folder), "bytes": size, **{k: statistics.median(v) for k, v in times.items()},
            "rounds": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", type=Path, default=Path("engines/shapes"), help="shapes engine folder (exported if missing)")
    parser.add_argument("--levels", default="1,2,4", help="concurrent callers, comma separated")
    parser.add_argument("--images", type=int, default=16, help="images per measurement")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads per session (0: default)")
    parser.add_argument("--startup-folder", type=Path, help="a large engine folder (e.g. an sd21 export) to time loading")
    parser.add_argument("--startup-repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    levels = [int(level) for level in args.levels.split(",")]
    results = {"machine": f"{os.cpu_count()} cores", "steps": args.steps, "images": args.images}
    print(f"throughput: {args.images} images of shapes, {args.steps} steps, callers {levels}", file=sys.stderr)
    results["throughput"] = bench_throughput(_shapes_engine(args.engine), levels, args.images, args.steps,
                                             args.repeats, args.threads)
    print("\ncallers  images/s  vs 1 caller")
    for level, row in results["throughput"].items():
        print(f"{level:>7}  {row['images_per_s']:8.2f}  {row['ratio']:10.2f}x")
    if args.startup_folder:
        print(f"start-up: {args.startup_folder}", file=sys.stderr)
        startup = results["startup"] = bench_startup(args.startup_folder, args.startup_repeats)
        print(f"\nstart-up of {startup['folder']} ({startup['bytes'] / 1e9:.2f} GB), median of {args.startup_repeats}:")
        print(f"  manifest check: every file hashed {startup['manifest_full']:.2f} s, fast {startup['manifest_fast']:.3f} s")
        print(f"  CairEngine load: every file hashed {startup['engine_full']:.2f} s, fast {startup['engine_fast']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
