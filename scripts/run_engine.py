"""Run an engine folder with the torch-free runtime: baseline (n = T) and CAIR (n) side by side.

Uses seeded random prompt embeddings (a UNet-only engine has no text encoder), so it shows the
mechanics and the speed, not pictures.

    python scripts/run_engine.py engines/tiny-sd21 [--steps 25] [--cache-step 5]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from cair_runtime.errors import CairError
from cair_runtime.pipeline import CairEngine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cache-step", type=int, default=5)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    args = parser.parse_args()
    try:
        engine = CairEngine(args.engine_dir)
        rng = np.random.default_rng(0)
        shape = (1, engine.manifest.dim("text_len").opt, engine.context_dim)
        inputs = {"prompt_embeds": rng.standard_normal(shape, dtype=np.float32),
                  "num_inference_steps": args.steps, "guidance_scale": args.guidance_scale, "seed": 0}
        if engine.added_conditions:
            inputs["text_embeds"] = rng.standard_normal((1, engine.pooled_dim), dtype=np.float32)
        engine.denoise(**inputs, cache_step=args.steps)  # warm-up
        results = {n: engine.denoise(**inputs, cache_step=n) for n in (args.steps, args.cache_step)}
    except CairError as error:
        print(f"run_engine: error: {error}", file=sys.stderr)
        return 2
    baseline = results[args.steps]
    print(f"{engine.manifest.model['name']}: {args.steps} steps, guidance {args.guidance_scale}, "
          f"scheduler {engine.manifest.scheduler_config['_class_name']}")
    for n, result in results.items():
        t = result.timings
        change = np.abs(result.latents - baseline.latents).max() / np.abs(baseline.latents).max()
        print(f"  n={n:<3d} {t.total_s * 1e3:8.1f} ms  (planning {t.planning_steps} steps {t.planning_s * 1e3:.1f} ms, "
              f"switch {t.switch_s * 1e3:.3f} ms, fidelity {t.fidelity_steps} steps {t.fidelity_s * 1e3:.1f} ms)  "
              f"speed-up {baseline.timings.total_s / t.total_s:.2f}x  max change vs baseline {change:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
