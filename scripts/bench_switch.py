"""The switch graph against two sessions on a text-to-image folder: per-image latency, baseline and CAIR.

Both layouts load in one process and alternate over ``--rounds``, each round generating the same
prompts (seed 0) at n = T and at n = ``--cache-step``; medians per image. The images of the two
layouts must be identical (the export checks the switch graph bit for bit); the script says so.

    python scripts/bench_switch.py engines/shapes --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

PROMPTS = ("a small yellow circle left of a big blue square", "a red triangle",
           "a green square on a white background", "two blue circles")


def main(argv: list[str] | None = None) -> int:
    from cair_runtime.text2image import CairText2Image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cache-step", type=int, default=5)
    args = parser.parse_args(argv)
    pipelines = {"two sessions": CairText2Image(args.engine_dir, one_graph=False),
                 "switch graph": CairText2Image(args.engine_dir)}
    if pipelines["switch graph"].engine.backend.switch is None:
        parser.error(f"{args.engine_dir} has no switch graph (unet.onnx); re-export it")
    times = {(name, n): [] for name in pipelines for n in (args.steps, args.cache_step)}
    images = {}
    for _ in range(args.rounds):
        for name, pipeline in pipelines.items():
            for n in (args.steps, args.cache_step):
                started = time.perf_counter()
                images[name, n] = [np.asarray(pipeline(prompt, num_inference_steps=args.steps, cache_step=n,
                                                       seed=0).images[0]) for prompt in PROMPTS]
                times[name, n].append((time.perf_counter() - started) / len(PROMPTS))
    print(f"{args.engine_dir}: {args.steps} steps, CAIR n = {args.cache_step}, {len(PROMPTS)} prompts, "
          f"medians of {args.rounds} alternating rounds")
    for name in pipelines:
        base, cair = (statistics.median(times[name, n]) for n in (args.steps, args.cache_step))
        print(f"  {name:13s} baseline {base:.4f} s/image, CAIR {cair:.4f} s/image, speed-up {base / cair:.2f}x")
    same = all(np.array_equal(a, b) for n in (args.steps, args.cache_step)
               for a, b in zip(images["two sessions", n], images["switch graph", n]))
    print(f"  images identical across layouts: {same}")
    for pipeline in pipelines.values():
        pipeline.close()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
