"""Time to apply a LoRA adapter: swapped into an exported engine at run time vs re-exporting with it fused.

Both measured in one run, alternating (swap, re-export, swap, ...). The swap is what a call with a
new ``loras=`` pays: reading the safetensors file, computing the fused weights in numpy, rebuilding
the onnxruntime sessions (UNet graphs and text encoder(s)). The re-export is
``cair-export export MODEL OUT --lora FILE`` without validation (what a user would at least pay).
Prints medians and their ratio.

    PYTHONPATH=.:runtime python scripts/bench_lora.py --model shapes \
        --lora cair_export/lab/assets/shapes_lora/negative.safetensors --rounds 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    from cair_export.core.export import ExportConfig, export_model
    from cair_export.core.models import load_model
    from cair_runtime.text2image import CairText2Image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--lora", required=True, help="LoRA .safetensors for the model")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    try:
        base = work / "base"
        export_model(load_model(args.model, with_pipeline=True), base, progress=lambda message: None)
        runtime = CairText2Image(base)
        runtime("a red circle", num_inference_steps=1, cache_step=1)  # warm: sessions built, first call done
        swaps, exports = [], []
        for round_ in range(args.rounds):
            scale = args.scale * (1 + round_ * 1e-3)  # a new scale each round: nothing cached
            started = time.perf_counter()
            lora_set = runtime.engine.resolve_loras([(args.lora, scale)])
            with runtime.engine.adapters.using(lora_set):
                pass
            swaps.append(time.perf_counter() - started)
            started = time.perf_counter()
            with runtime.engine.adapters.using(runtime.engine.resolve_loras([])):  # unload: back to base sessions
                pass
            unload = time.perf_counter() - started
            started = time.perf_counter()
            out = work / f"fused-{round_}"
            export_model(load_model(args.model, with_pipeline=True), out,
                         ExportConfig(validate=False, loras=((args.lora, scale),)), progress=lambda message: None)
            exports.append(time.perf_counter() - started)
            shutil.rmtree(out)
            print(f"round {round_ + 1}: swap {swaps[-1]:.3f} s, unload {unload:.3f} s, re-export {exports[-1]:.2f} s",
                  flush=True)
        swap, export = statistics.median(swaps), statistics.median(exports)
        print(f"{args.model}: run-time swap {swap:.3f} s vs re-export {export:.2f} s (medians of {args.rounds}): "
              f"{export / swap:.0f}x faster")
        runtime.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
