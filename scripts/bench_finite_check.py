"""The cost of the last check before numbers become an image (NaN or infinite latents and pixels).

Runs whole generations on an engine folder and, in the same run, times ``check_finite_result`` on
what those generations check: the final latents and the decoded images. Also times the check on
the arrays of larger models (SD at 512 px, SDXL at 1024 px), whose generations take seconds. Prints
the check's time as a share of one generation.

    python scripts/bench_finite_check.py ENGINE_DIR --steps 25 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from cair_runtime.checks import check_finite_result
from cair_runtime.text2image import CairText2Image


def _seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with CairText2Image(args.engine_dir) as pipeline:
        pipeline("warm-up", num_inference_steps=args.steps)
        results = []
        generation_s = _seconds(lambda: results.append(pipeline("a red circle", num_inference_steps=args.steps)),
                                args.repeats)
    result = results[-1]
    check_s = _seconds(lambda: (check_finite_result(result.latents, "denoised latents"),
                                check_finite_result(result.decoded, "decoded images")), 200)
    print(f"{args.engine_dir}: generation {generation_s * 1e3:.1f} ms ({args.steps} steps, median of {args.repeats}); "
          f"check of latents {result.latents.shape} and images {result.decoded.shape} {check_s * 1e6:.1f} us = "
          f"{100 * check_s / generation_s:.4f} % of a generation")
    rng = np.random.default_rng(0)
    for name, latents, images in (("SD 512 px", (1, 4, 64, 64), (1, 3, 512, 512)),
                                  ("SDXL 1024 px", (1, 4, 128, 128), (1, 3, 1024, 1024))):
        arrays = [rng.standard_normal(shape, dtype=np.float32) for shape in (latents, images)]
        seconds = _seconds(lambda: [check_finite_result(a, "x") for a in arrays], 50)
        print(f"{name}: check of latents {latents} and images {images} {seconds * 1e3:.3f} ms per image")


if __name__ == "__main__":
    main()
