"""The switch graph against two sessions on a text-to-image folder: per-image latency, baseline and CAIR.

Both layouts load in one process and alternate over ``--rounds``, each round generating the same
prompts (seed 0) at n = T and at n = ``--cache-step``; medians per image. The images of the two
layouts must be identical (the export checks the switch graph bit for bit); the script says so.
A folder without a text encoder (a denoiser-only export) runs the denoising loop on seeded random
prompt embeddings (and text masks, for a transformer) instead, and compares latents.

    python scripts/bench_switch.py engines/shapes --rounds 5
    python scripts/bench_switch.py engines/pixart-sigma-256 --rounds 2 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

PROMPTS = ("a small yellow circle left of a big blue square", "a red triangle",
           "a green square on a white background", "two blue circles")


class _Embeddings:
    """A denoiser-only folder's stand-in for a text-to-image pipeline: seeded random prompt embeddings."""

    def __init__(self, folder: str, one_graph: bool = True):
        from cair_runtime.pipeline import CairEngine

        self.engine = CairEngine(folder, one_graph=one_graph)

    def __call__(self, prompt: str, num_inference_steps: int, cache_step: int, seed: int) -> np.ndarray:
        engine = self.engine
        rng = np.random.default_rng([seed, len(prompt)])
        text_len = engine.manifest.dim("text_len").opt
        embeds, negative = (rng.standard_normal((1, text_len, engine.context_dim), dtype=np.float32) for _ in "ab")
        extra = {}
        if engine.manifest.transformer:  # the prompt's words, then padding
            extra = {"attention_mask": (np.arange(text_len) < len(prompt.split()) + 1).astype(np.float32)[None],
                     "negative_attention_mask": (np.arange(text_len) < 1).astype(np.float32)[None]}
        if engine.pooled_dim:
            extra |= {"text_embeds": rng.standard_normal((1, engine.pooled_dim), dtype=np.float32),
                      "negative_text_embeds": rng.standard_normal((1, engine.pooled_dim), dtype=np.float32)}
        return engine.denoise(embeds, negative, num_inference_steps=num_inference_steps, cache_step=cache_step,
                              seed=seed, **extra).latents

    def close(self) -> None:
        self.engine.close()


def main(argv: list[str] | None = None) -> int:
    from cair_runtime.manifest import load_manifest
    from cair_runtime.text2image import CairText2Image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cache-step", type=int, default=5)
    args = parser.parse_args(argv)
    manifest = load_manifest(args.engine_dir)
    if manifest.switch is None:
        parser.error(f"{args.engine_dir} has no switch graph (unet.onnx); re-export it")
    if manifest.pipeline is not None:
        def generate(pipeline, prompt: str, n: int) -> np.ndarray:
            return np.asarray(pipeline(prompt, num_inference_steps=args.steps, cache_step=n, seed=0).images[0])
        pipelines = {"two sessions": CairText2Image(args.engine_dir, one_graph=False),
                     "switch graph": CairText2Image(args.engine_dir)}
    else:
        def generate(pipeline, prompt: str, n: int) -> np.ndarray:
            return pipeline(prompt, num_inference_steps=args.steps, cache_step=n, seed=0)
        pipelines = {"two sessions": _Embeddings(args.engine_dir, one_graph=False),
                     "switch graph": _Embeddings(args.engine_dir)}
    times = {(name, n): [] for name in pipelines for n in (args.steps, args.cache_step)}
    images = {}
    for _ in range(args.rounds):
        for name, pipeline in pipelines.items():
            for n in (args.steps, args.cache_step):
                started = time.perf_counter()
                images[name, n] = [generate(pipeline, prompt, n) for prompt in PROMPTS]
                times[name, n].append((time.perf_counter() - started) / len(PROMPTS))
    print(f"{args.engine_dir}: {args.steps} steps, CAIR n = {args.cache_step}, {len(PROMPTS)} prompts, "
          f"medians of {args.rounds} alternating rounds")
    for name in pipelines:
        base, cair = (statistics.median(times[name, n]) for n in (args.steps, args.cache_step))
        print(f"  {name:13s} baseline {base:.4f} s/image, CAIR {cair:.4f} s/image, speed-up {base / cair:.2f}x")
    same = all(np.array_equal(a, b) for n in (args.steps, args.cache_step)
               for a, b in zip(images["two sessions", n], images["switch graph", n]))
    print(f"  {'images' if manifest.pipeline is not None else 'latents'} identical across layouts: {same}")
    for pipeline in pipelines.values():
        pipeline.close()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
