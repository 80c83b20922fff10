"""``cair-export``: export, build, compare, measure and demo CAIR engines.

Project errors become one line on stderr and exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from cair_runtime.cli import OneLineArgumentParser, run_command


# Modules that add their own subcommand with `add_command(subparsers)`; imported when the parser is built,
# so they import their heavy dependencies inside their functions.
COMMAND_MODULES: tuple[str, ...] = ("cair_export.build", "cair_export.compare", "cair_export.profile",
                                    "cair_export.evaluate")


def progress(message: str) -> None:
    print(f"[cair-export] {message}", file=sys.stderr, flush=True)


def cmd_export(args: argparse.Namespace) -> int:
    from cair_export.export import ExportConfig, check_export_config, check_output_dir, export_model
    from cair_export.models import load_model

    out_dir = Path(args.out_dir)
    check_output_dir(out_dir, args.overwrite)  # before loading anything: fail fast
    model = load_model(args.model, with_pipeline=True)
    config = ExportConfig(height=args.height, width=args.width, opset=args.opset,
                          fidelity_guidance=args.fidelity_guidance, cache_step_hint=args.cache_step_hint,
                          max_batch=args.max_batch, dtype=args.dtype)
    check_export_config(model, config)
    export_model(model, out_dir, config, overwrite=args.overwrite, progress=progress)
    return 0


def cmd_macs(args: argparse.Namespace) -> int:
    from cair_export.export import ExportConfig, check_export_config
    from cair_export.macs import CONVENTIONS, count_graph_macs, generation_macs
    from cair_export.models import load_model
    from cair_runtime.stages import check_cache_step

    check_cache_step(args.cache_step, args.steps)
    model = load_model(args.model, device="meta")
    height, width = check_export_config(model, ExportConfig(height=args.height, width=args.width,
                                                            fidelity_guidance=args.fidelity_guidance))
    per_graph = count_graph_macs(model, height, width, batch=args.batch, fidelity_guidance=args.fidelity_guidance)
    table = generation_macs(per_graph, args.steps, args.cache_step)
    if args.json:
        print(json.dumps({"model": args.model, "height": height, "width": width, "batch": args.batch,
                          "steps": args.steps, "cache_step": args.cache_step,
                          "fidelity_guidance": args.fidelity_guidance, **table}, indent=2))
        return 0
    print(f"{args.model} at {width}x{height}, batch {args.batch}, T={args.steps}, n={args.cache_step} "
          f"(UNet only; G = 1e9 MACs)")
    print(f"{'convention':16s} {'planning':>10s} {'fidelity':>10s} {'baseline':>11s} {'CAIR':>11s} {'bound':>7s}")
    for convention in CONVENTIONS:
        row = table[convention]
        print(f"{convention:16s} {row['planning'] / 1e9:9.1f}G {row['fidelity'] / 1e9:9.1f}G "
              f"{row['baseline_total'] / 1e9:10.1f}G {row['cair_total'] / 1e9:10.1f}G {row['speedup_bound']:6.2f}x")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cair_export.demo import DemoConfig, format_table, run_demo
    from cair_runtime.files import check_writable

    check_writable(args.output, make_parent=True)
    figures = run_demo(DemoConfig(model=args.model, engines_dir=Path(args.engines_dir), output=Path(args.output),
                                  steps=args.steps, cache_step=args.cache_step, guidance_scale=args.guidance_scale,
                                  seed=args.seed, repeats=args.repeats), progress=progress)
    print(format_table(figures))
    return 0


def int_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    return value


def positive_int_arg(text: str) -> int:
    value = int_arg(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from cair_export.models import PRESETS

    parser = OneLineArgumentParser(prog="cair-export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    presets = ", ".join(PRESETS)

    export = sub.add_parser("export", help="export a UNet as CAIR planning and fidelity ONNX graphs")
    export.add_argument("model", help=f"preset ({presets}) or local diffusers pipeline/UNet folder")
    export.add_argument("out_dir", help="engine folder to write (created atomically)")
    export.add_argument("--height", type=int_arg, help="pixel height the graphs are tuned for (default: native)")
    export.add_argument("--width", type=int_arg, help="pixel width the graphs are tuned for (default: native)")
    export.add_argument("--opset", type=int_arg, default=17, help="ONNX opset, 17 or newer (default 17)")
    export.add_argument("--fidelity-guidance", choices=("none", "cfg"), default="none",
                        help="after step n: 'none' halves the batch (CAIR), 'cfg' keeps guidance")
    export.add_argument("--cache-step-hint", type=int_arg, default=5,
                        help="default cache step n recorded for the runtime (default 5 of 25)")
    export.add_argument("--max-batch", type=int_arg, default=4, help="largest prompt batch (default 4)")
    export.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                        help="compute precision in the UNet graphs (attention scores, softmax, norms stay fp32; "
                             "IO float32)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    export.set_defaults(func=cmd_export)

    demo = sub.add_parser("demo", help="export the shipped model and show baseline vs CAIR images and speed")
    demo.add_argument("--model", default="shapes", help="shipped model, preset or pipeline folder (default shapes)")
    demo.add_argument("--engines-dir", default="engines", help="where the export goes (default engines/)")
    demo.add_argument("--output", default="cair-demo.png", help="the side-by-side grid (default cair-demo.png)")
    demo.add_argument("--steps", type=positive_int_arg, default=25, help="denoising steps T (default 25)")
    demo.add_argument("--cache-step", type=positive_int_arg, default=5, help="CAIR cache step n (default 5)")
    demo.add_argument("--guidance-scale", type=float, default=7.5)
    demo.add_argument("--seed", type=int_arg, default=0)
    demo.add_argument("--repeats", type=positive_int_arg, default=3, help="timed runs per prompt and configuration (default 3)")
    demo.set_defaults(func=cmd_demo)

    macs = sub.add_parser("macs", help="MACs per evaluation and per generation, baseline vs CAIR")
    macs.add_argument("model", help=f"preset ({presets}) or local folder (only its config is read)")
    macs.add_argument("--steps", type=int_arg, default=25, help="denoising steps T (default 25)")
    macs.add_argument("--cache-step", type=int_arg, default=5, help="cache step n (default 5)")
    macs.add_argument("--height", type=int_arg, help="pixel height (default: native)")
    macs.add_argument("--width", type=int_arg, help="pixel width (default: native)")
    macs.add_argument("--batch", type=int_arg, default=1, help="prompts per generation (default 1)")
    macs.add_argument("--fidelity-guidance", choices=("none", "cfg"), default="none")
    macs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    macs.set_defaults(func=cmd_macs)

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
