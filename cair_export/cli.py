"""``cair-export``: export, build, compare, measure and demo CAIR engines.

The program's one command-line definition: every subcommand's parser and the few lines that turn
its flags into the library's config dataclass and call it. Library modules never import this one.
Project errors become one line on stderr and exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from cair_runtime.cli import OneLineArgumentParser, run_command
from cair_runtime.interrupts import Terminated, stop_on_signals


def progress(message: str) -> None:
    print(f"[cair-export] {message}", file=sys.stderr, flush=True)


# --- argument types (also used by the scripts) ----------------------------------------------------


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


def branch_arg(text: str) -> int | None:
    """``--deep-branch``: DeepCache's branch id (checked with the other export options), or ``none``."""
    return None if text.strip().lower() == "none" else int_arg(text)


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def schedules_arg(text: str):
    """``--schedules``: ``N:M:K[:MODE],...`` (sets ``{a,b}`` allowed) -> ``Schedule`` tuples."""
    from cair_export.lab.schedules import parse_schedules
    from cair_runtime.errors import InvalidInputError

    try:
        return parse_schedules(text)
    except InvalidInputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _check_outputs(*paths: str | None) -> None:
    """Fail before any work when an output file cannot be written."""
    from cair_runtime.files import check_writable

    for path in paths:
        if path:
            check_writable(path, make_parent=True)


def _command_line() -> str:
    return "cair-export " + " ".join(sys.argv[1:])


# --- export core ----------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from cair_export.core.export import ExportConfig, check_export_options, export_model
    from cair_export.core.folder_transaction import check_output_dir, export_lock
    from cair_export.core.models import load_model
    from cair_export.core.models.loading import model_folder, names_a_transformer
    from cair_runtime.errors import InvalidInputError
    from cair_runtime.lora import parse_lora_arg

    out_dir = Path(args.out_dir)
    config = ExportConfig(height=args.height, width=args.width, opset=args.opset,
                          fidelity_guidance=args.fidelity_guidance, cache_step_hint=args.cache_step_hint,
                          max_batch=args.max_batch, dtype=args.dtype, deep_branch=args.deep_branch,
                          max_prompt_chunks=args.max_prompt_chunks or ExportConfig.max_prompt_chunks,
                          controlnets=tuple(args.controlnet or ()),
                          ip_adapter=args.ip_adapter, image_encoder=args.image_encoder,
                          loras=tuple(parse_lora_arg(text) for text in args.lora or ()))
    # Before loading anything: fail fast, and a second export to the same folder fails at once.
    check_export_options(config)
    check_output_dir(out_dir, args.overwrite, model_folder(args.model))
    if args.calibrate:
        from cair_export.lab.profile import read_prompts

        read_prompts(Path(args.calibrate))  # a bad prompt file fails before the export, not after it
    if args.max_prompt_chunks is not None and names_a_transformer(args.model):
        raise InvalidInputError(f"{args.model} is a diffusion transformer, whose text encoder reads the whole "
                                "prompt at once (its fixed token length): drop --max-prompt-chunks")
    with export_lock(out_dir):
        model = load_model(args.model, with_pipeline=True)
        if args.calibrate and not model.has_pipeline:
            raise InvalidInputError(f"--calibrate compares decoded images; {args.model} is a UNet alone (no text "
                                    "encoder and VAE): export without --calibrate")
        export_model(model, out_dir, config, overwrite=args.overwrite, progress=progress, release_unet=True)
        if args.calibrate:
            from cair_export.lab.calibrate import CalibrateConfig, calibrate, format_calibration

            del model
            progress(f"calibrating the default schedule with {args.calibrate} (the export above is complete)")
            section = calibrate(CalibrateConfig(out_dir, Path(args.calibrate)), progress=progress)
            print(format_calibration(section, written=True))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from cair_export.lab.calibrate import CalibrateConfig, calibrate, format_calibration
    from cair_export.lab.harness import run_stamp

    _check_outputs(args.json)
    config = CalibrateConfig(Path(args.engine_dir), Path(args.prompts), max_prompts=args.max_prompts, steps=args.steps,
                             guidance_scale=args.guidance_scale, seed=args.seed, threshold=args.threshold,
                             min_psnr=args.min_psnr, deep_intervals=args.deep_intervals, threads=args.threads,
                             max_probes=args.max_probes, write=not args.dry_run)
    section = calibrate(config, progress=progress)
    if args.json:
        Path(args.json).write_text(json.dumps({**run_stamp(_command_line()), **section}, indent=2) + "\n")
    print(format_calibration(section, written=config.write))
    return 0


def cmd_macs(args: argparse.Namespace) -> int:
    from cair_export.core.export import ExportConfig, check_export_config
    from cair_export.core.macs import CONVENTIONS, count_graph_macs, generation_macs
    from cair_export.core.models import load_model
    from cair_runtime.schedule import check_cache_step

    check_cache_step(args.cache_step, args.steps)
    model = load_model(args.model, device="meta")
    deep = max(args.deep_interval, args.planning_interval) > 1
    if model.is_transformer and (args.controlnet or args.ip_adapter or args.prompt_chunks > 1):
        from cair_runtime.errors import InvalidInputError

        raise InvalidInputError(f"{args.model} is a diffusion transformer: ControlNets, IP-Adapters and prompt "
                                "chunks are for UNets; drop those options")
    if args.controlnet:
        import dataclasses

        from cair_export.core.controlnet import controlnet_architecture

        model = dataclasses.replace(model, controlnets=tuple(controlnet_architecture(spec, model.unet)
                                                             for spec in args.controlnet))
    if args.ip_adapter:
        import dataclasses

        from cair_export.core.ip_adapter import ip_adapter_architecture

        model = dataclasses.replace(model, ip_adapter=ip_adapter_architecture(model.unet, model.family))
    height, width = check_export_config(model, ExportConfig(height=args.height, width=args.width,
                                                            fidelity_guidance=args.fidelity_guidance))
    schedule = {"guidance_stop": args.guidance_stop, "deep_interval": args.deep_interval,
                "planning_interval": args.planning_interval, "skip_mode": args.skip_mode}
    if deep and (args.controlnet or args.ip_adapter):
        from cair_runtime.errors import InvalidInputError

        raise InvalidInputError("deep or planning intervals do not take ControlNets or IP-Adapters yet; drop "
                                "--controlnet/--ip-adapter or use intervals of 1")
    per_graph = count_graph_macs(model, height, width, batch=args.batch, fidelity_guidance=args.fidelity_guidance,
                                 deep_branch_id=args.deep_branch if deep else None, prompt_chunks=args.prompt_chunks)
    table = generation_macs(per_graph, args.steps, args.cache_step, fidelity_guidance=args.fidelity_guidance,
                            **schedule)
    if args.json:
        print(json.dumps({"model": args.model, "height": height, "width": width, "batch": args.batch,
                          "steps": args.steps, "cache_step": args.cache_step, "prompt_chunks": args.prompt_chunks,
                          "controlnets": list(args.controlnet or ()), "ip_adapter": args.ip_adapter,
                          "fidelity_guidance": args.fidelity_guidance, **schedule,
                          "deep_branch": args.deep_branch if deep else None, **table}, indent=2))
        return 0
    label = f", m={args.guidance_stop}" if args.guidance_stop is not None else ""
    if deep:
        label += (f", k={args.deep_interval}, k_p={args.planning_interval} ({args.skip_mode}, "
                  f"branch {args.deep_branch})")
    text = f", text {args.prompt_chunks} windows" if args.prompt_chunks > 1 else ""
    text += f", {len(args.controlnet)} ControlNet(s)" if args.controlnet else ""
    text += ", IP-Adapter" if args.ip_adapter else ""
    print(f"{args.model} at {width}x{height}, batch {args.batch}{text}, T={args.steps}, n={args.cache_step}{label} "
          f"({'transformer' if model.is_transformer else 'UNet'} only; G = 1e9 MACs)")
    shallow = ("shallow", "shallow_planning") if deep else ()
    print(f"{'convention':16s} {'planning':>10s} {'fidelity':>10s}"
          + "".join(f" {kind:>{max(10, len(kind))}s}" for kind in shallow)
          + f" {'baseline':>10s} {'CAIR':>10s} {'bound':>7s}")
    for convention in CONVENTIONS:
        row = table[convention]
        print(f"{convention:16s} {row['planning'] / 1e9:9.1f}G {row['fidelity'] / 1e9:9.1f}G"
              + "".join(f" {row[kind] / 1e9:{max(10, len(kind)) - 1}.1f}G" for kind in shallow)
              + f" {row['baseline_total'] / 1e9:9.1f}G {row['cair_total'] / 1e9:9.1f}G {row['speedup_bound']:6.2f}x")
    return 0


# --- deploy ---------------------------------------------------------------------------------------


def cmd_build(args: argparse.Namespace) -> int:
    from cair_export.deploy.build import BuildConfig, build_engines

    config = BuildConfig(backend=args.backend, min_batch=args.min_batch, opt_batch=args.opt_batch,
                         max_batch=args.max_batch, min_size=args.min_size, opt_size=args.opt_size,
                         max_size=args.max_size, timing_cache=args.timing_cache, device=args.device, dtype=args.dtype)
    build_engines(args.engine_dir, config, progress=progress)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from cair_export.deploy.quantize import QuantizeConfig, quantize_folder

    config = QuantizeConfig(mode=args.mode, generations=args.generations, steps=args.steps,
                            cache_step=args.cache_step, subset_size=args.subset_size, threads=args.threads)
    quantize_folder(args.engine_dir, config, progress=progress)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from cair_export.deploy.compare import compare_engines, format_table
    from cair_runtime.errors import ValidationError

    rows = compare_engines(args.engine_dir, args.reference, args.batch, progress=progress)
    print(format_table(rows))
    failures = [f"{r.candidate} {r.graph}:{r.output} {r.relative:.1e} > {r.tolerance:.0e}" for r in rows if not r.ok]
    if failures:
        raise ValidationError(f"{len(failures)} output(s) outside tolerance: {'; '.join(failures)}")
    return 0


# --- lab ------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from cair_export.lab.demo import DemoConfig, format_table, run_demo

    _check_outputs(args.output)
    figures = run_demo(DemoConfig(model=args.model, engines_dir=Path(args.engines_dir), output=Path(args.output),
                                  steps=args.steps, cache_step=args.cache_step, guidance_scale=args.guidance_scale,
                                  seed=args.seed, repeats=args.repeats,
                                  calibration_prompts=args.calibration_prompts), progress=progress)
    print(format_table(figures))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from cair_export.lab.harness import run_stamp
    from cair_export.lab.profile import ProfileConfig, format_profile, plot_profile, profile_model

    _check_outputs(args.json, args.plot)
    config = ProfileConfig(model=args.model, prompts=Path(args.prompts), steps=args.steps,
                           guidance_scale=args.guidance_scale, seed=args.seed, threshold=args.threshold, rule=args.rule,
                           batch=args.batch, max_prompts=args.max_prompts, height=args.height, width=args.width)
    figures = profile_model(config, progress=progress)
    if args.json:
        Path(args.json).write_text(json.dumps({**run_stamp(_command_line()), **figures}, indent=2) + "\n")
    if args.plot:
        plot_profile(figures, Path(args.plot))
    print(format_profile(figures))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cair_export.lab.evaluate import EvaluateConfig, evaluate, format_markdown, plot_quality
    from cair_export.lab.schedules import format_schedules_markdown, plot_schedules
    from cair_runtime.errors import MissingDependencyError

    _check_outputs(args.json, args.markdown, args.plot)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if args.plot:
            raise MissingDependencyError("the plot needs matplotlib; pip install -e '.[lab]' (or pass --plot '')") from None
    config = EvaluateConfig(
        model=args.model, classifier=Path(args.classifier) if args.classifier else None,
        engines_dir=Path(args.engines_dir), num_images=args.num_images, cache_steps=args.cache_steps,
        steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed, max_batch=args.max_batch,
        threads=args.threads, tgate_images=args.tgate_images, tgate_cache_steps=args.tgate_cache_steps,
        schedules=args.schedules, deep_branch=args.deep_branch, deepcache_intervals=args.deepcache_intervals,
        deepcache_images=args.deepcache_images)
    figures = evaluate(config, progress=progress)
    command = _command_line()
    pareto = "pareto" in figures  # a schedule grid or DeepCache: the Pareto report
    report = (format_schedules_markdown if pareto else format_markdown)(figures, command)
    for path, text in ((args.json, json.dumps({"command": command, **figures}, indent=2) + "\n"), (args.markdown, report)):
        if path:
            Path(path).write_text(text)
    if args.plot:
        (plot_schedules if pareto else plot_quality)(figures, Path(args.plot))
    print(report)
    return 0


# --- the parser -----------------------------------------------------------------------------------


def _add_export(sub, presets: str) -> None:
    export = sub.add_parser("export", help="export a UNet as CAIR planning and fidelity ONNX graphs")
    export.add_argument("model", help=f"preset ({presets}) or local diffusers pipeline/UNet folder")
    export.add_argument("out_dir", help="engine folder to write (created atomically)")
    export.add_argument("--height", type=int_arg, help="pixel height the graphs are tuned for (default: native)")
    export.add_argument("--width", type=int_arg, help="pixel width the graphs are tuned for (default: native)")
    export.add_argument("--opset", type=int_arg, default=17,
                        help="ONNX opset, from 17 to the newest torch's exporter supports (default 17)")
    export.add_argument("--fidelity-guidance", choices=("cfg", "none"), default="cfg",
                        help="'cfg' (default): caches per CFG half, so runs choose any guidance stop m in n..T; "
                             "'none': merged caches, m = n only (a fidelity graph for batch B, same weights)")
    export.add_argument("--deep-branch", type=branch_arg, default=0, metavar="B|none",
                        help="DeepCache's branch B the shallow graphs cut at (3 * block + layer; default 0, "
                             "DeepCache's own default, recomputes the least; a transformer's: B + 1 blocks kept at "
                             "each end, the middle ones' residual replayed); 'none' leaves them out (no deep or "
                             "planning interval above 1)")
    export.add_argument("--cache-step-hint", type=positive_int_arg, default=5,
                        help="default cache step n recorded for the runtime (default 5 of 25)")
    export.add_argument("--max-batch", type=positive_int_arg, default=4, help="largest prompt batch (default 4)")
    export.add_argument("--max-prompt-chunks", type=positive_int_arg, metavar="C",
                        help="longest prompt in text-encoder windows of 75 tokens, each encoded on its own and "
                             "concatenated (default 4: 300 tokens; 1: truncate at 75, the text axis fixed); "
                             "CLIP text encoders only")
    export.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                        help="compute precision in the UNet graphs (attention scores, softmax, norms stay fp32; "
                             "IO float32)")
    export.add_argument("--controlnet", action="append", metavar="FOLDER",
                        help="a diffusers ControlNetModel folder (safetensors) fused into the UNet graphs, its "
                             "cross-attention cached at n like the UNet's; repeat for several ('tiny[:SEED]': a "
                             "seeded one for the tiny presets); no shallow or switch graph with ControlNets yet")
    export.add_argument("--ip-adapter", metavar="FILE",
                        help="an IP-Adapter (.safetensors; plain IP-Adapter, not Plus/FaceID) applied to the UNet: "
                             "planning takes an image prompt, its cross-attention cached at n with the text's "
                             "('tiny[:SEED]': a seeded one for the tiny presets); no shallow or switch graph with it")
    export.add_argument("--image-encoder", metavar="FOLDER",
                        help="the IP-Adapter's CLIP vision encoder (a CLIPVisionModelWithProjection folder with "
                             "safetensors; default: image_encoder/ beside the adapter file)")
    export.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                        help="LoRA adapter (.safetensors, diffusers or kohya layout) fused into the UNet and text "
                             "encoder(s) before tracing, scale default 1; repeat for several")
    export.add_argument("--calibrate", metavar="PROMPTS",
                        help="after the export, choose the default schedule from the folder's own runs on these "
                             "prompts (cair-export calibrate with its defaults)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an existing engine folder (only a complete one: other files are never deleted)")
    export.set_defaults(func=cmd_export)


def _add_prompt_run(parser, steps_meaning: str) -> None:
    """The flags of a measurement over a prompt file: prompts, steps, guidance, seed."""
    parser.add_argument("--prompts", required=True,
                        help="prompt file, one a line (shipped: cair_export/lab/prompts/shapes.txt, general.txt)")
    parser.add_argument("--steps", type=int_arg, default=25, help=f"denoising steps {steps_meaning} (default 25)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int_arg, default=0, help="prompt p starts from seed + p (default 0)")


def _add_calibrate(sub) -> None:
    from cair_export.lab.calibrate import DEEP_INTERVALS, DEFAULT_MIN_PSNR
    from cair_export.lab.quality_metrics import DEFAULT_THRESHOLD

    calibrate = sub.add_parser("calibrate", help="choose an engine folder's default schedule (n, m, k, k_p) from its "
                                                 "own runs and write it into the manifest")
    calibrate.add_argument("engine_dir", help="an exported engine folder with its pipeline (text encoder, VAE)")
    _add_prompt_run(calibrate, "T to choose at")
    calibrate.add_argument("--max-prompts", type=positive_int_arg, default=16,
                           help="probe images: the first N prompts, one image each (default 16)")
    calibrate.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                           help="n: first step whose cross-attention output changes by less than this (default 0.05)")
    calibrate.add_argument("--min-psnr", type=float, default=DEFAULT_MIN_PSNR,
                           help=f"quality bound: probe PSNR (dB) against the baseline images (default {DEFAULT_MIN_PSNR:g})")
    calibrate.add_argument("--deep-intervals", type=int_list, default=DEEP_INTERVALS,
                           help="k and k_p candidates on engines with the shallow graphs (default 1,2,3,4,5)")
    calibrate.add_argument("--max-probes", type=positive_int_arg,
                           help="stop after this many probes, cheapest first (default: until one reaches the bound)")
    calibrate.add_argument("--threads", type=int_arg, default=0, help="onnxruntime intra-op threads (0: its default)")
    calibrate.add_argument("--json", help="write the schedule and its evidence as JSON here")
    calibrate.add_argument("--dry-run", action="store_true", help="report only; leave the manifest as it is")
    calibrate.set_defaults(func=cmd_calibrate)


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="export the shipped model and show the baseline, CAIR and the calibrated "
                                       "schedule: images, speed, MAC bound and PSNR")
    demo.add_argument("--model", default="shapes", help="shipped model, preset or pipeline folder (default shapes)")
    demo.add_argument("--engines-dir", default="engines", help="where the export goes (default engines/)")
    demo.add_argument("--output", default="cair-demo.png", help="the side-by-side grid (default cair-demo.png)")
    demo.add_argument("--steps", type=positive_int_arg, default=25, help="denoising steps T (default 25)")
    demo.add_argument("--cache-step", type=positive_int_arg, default=5, help="CAIR cache step n (default 5)")
    demo.add_argument("--guidance-scale", type=float, default=7.5)
    demo.add_argument("--seed", type=int_arg, default=0)
    demo.add_argument("--repeats", type=positive_int_arg, default=3, help="timed runs per prompt and configuration (default 3)")
    demo.add_argument("--calibration-prompts", type=int_arg, default=16, metavar="N",
                      help="probe images when the folder has no calibrated schedule yet: calibrate it once on N "
                           "prompts (default 16; 0: do not calibrate, so an uncalibrated folder shows two columns)")
    demo.set_defaults(func=cmd_demo)


def _add_macs(sub, presets: str) -> None:
    macs = sub.add_parser("macs", help="MACs per evaluation and per generation, baseline vs CAIR")
    macs.add_argument("model", help=f"preset ({presets}) or local folder (only its config is read)")
    macs.add_argument("--steps", type=positive_int_arg, default=25, help="denoising steps T (default 25)")
    macs.add_argument("--cache-step", type=int_arg, default=5, help="cache step n (default 5)")
    macs.add_argument("--height", type=int_arg, help="pixel height (default: native)")
    macs.add_argument("--width", type=int_arg, help="pixel width (default: native)")
    macs.add_argument("--batch", type=positive_int_arg, default=1, help="prompts per generation (default 1)")
    macs.add_argument("--controlnet", action="append", metavar="SPEC",
                      help="count a fused ControlNet too: a ControlNetModel folder (its config), 'unet' (the "
                           "architecture diffusers derives from the UNet, as published ones) or tiny; repeatable")
    macs.add_argument("--ip-adapter", action="store_true",
                      help="count a plain IP-Adapter too (image embedding of the published encoders: 1024 wide for "
                           "SD-1.x/2.x, 1280 for SDXL; the image encoder, once per call, is not counted)")
    macs.add_argument("--prompt-chunks", type=positive_int_arg, default=1, metavar="C",
                      help="text length in text-encoder windows (long prompts; default 1: 77 tokens)")
    macs.add_argument("--fidelity-guidance", choices=("cfg", "none"), default="cfg",
                      help="the export's layout the graphs are counted in (default cfg, as cair-export export)")
    macs.add_argument("--guidance-stop", type=int_arg, metavar="M",
                      help="guidance stop m, n..T (default n; m > n needs --fidelity-guidance cfg)")
    macs.add_argument("--deep-interval", type=positive_int_arg, default=1, metavar="K",
                      help="after n, a full fidelity step every K-th and shallow steps between (default 1)")
    macs.add_argument("--planning-interval", type=positive_int_arg, default=1, metavar="K_P",
                      help="before n, a full planning step every K_P-th and guided shallow steps between (default 1; "
                           "n = T with K_P = k is DeepCache)")
    macs.add_argument("--deep-branch", type=int_arg, default=0, metavar="B",
                      help="DeepCache's branch the shallow steps cut at (default 0; a transformer's: B + 1 blocks "
                           "kept at each end)")
    macs.add_argument("--skip-mode", choices=("uniform", "non-uniform"), default="uniform")
    macs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    macs.set_defaults(func=cmd_macs)


def _add_build(sub) -> None:
    from cair_export.deploy.build import BACKENDS

    build = sub.add_parser("build", help="build TensorRT engines or AOTInductor packages for an engine folder")
    build.add_argument("engine_dir", help="an exported engine folder (cair-export export)")
    build.add_argument("--backend", choices=BACKENDS, default="tensorrt", help="what to build (default tensorrt)")
    for bound in ("min", "opt", "max"):
        build.add_argument(f"--{bound}-batch", type=positive_int_arg,
                           help=f"profile {bound} prompts per call (default: manifest)")
    for bound in ("min", "opt", "max"):
        build.add_argument(f"--{bound}-size", type=positive_int_arg,
                           help=f"profile {bound} square size in pixels (default: manifest)")
    build.add_argument("--timing-cache", help="TensorRT timing cache file: read if present, written back")
    build.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="aoti: device to compile for (default cpu)")
    build.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                       help="aoti: compute precision (IO stays float32); TensorRT takes the ONNX's precision")
    build.set_defaults(func=cmd_build)


def _add_quantize(sub) -> None:
    quantize = sub.add_parser("quantize", help="int8 planning and fidelity graphs for the openvino backend (NNCF)")
    quantize.add_argument("engine_dir", help="an exported engine folder (cair-export export)")
    quantize.add_argument("--mode", choices=("weights", "hybrid"), default="hybrid",
                          help="weights: int8 weights only; hybrid (default): also int8 activations in the "
                               "attention products, calibrated on the folder's own generations")
    quantize.add_argument("--generations", type=positive_int_arg, default=4,
                          help="calibration generations through the runtime (default 4)")
    quantize.add_argument("--steps", type=positive_int_arg, default=25, help="steps of each (default 25)")
    quantize.add_argument("--cache-step", type=positive_int_arg, help="n of each (default: the folder's)")
    quantize.add_argument("--subset-size", type=positive_int_arg, default=64,
                          help="calibration inputs per graph NNCF uses (default 64)")
    quantize.add_argument("--threads", type=int, default=0, help="intra-op threads of the calibration runs")
    quantize.set_defaults(func=cmd_quantize)


def _add_compare(sub) -> None:
    compare = sub.add_parser("compare", help="compare every built engine with the fp32 onnxruntime reference")
    compare.add_argument("engine_dir", help="an engine folder with built engines or low-precision graphs")
    compare.add_argument("--reference", help="fp32 engine folder of the same model (default: ENGINE_DIR itself)")
    compare.add_argument("--batch", type=int, help="prompts per call to compare at (default: the manifest's opt)")
    compare.set_defaults(func=cmd_compare)


def _add_profile(sub) -> None:
    from cair_export.lab.quality_metrics import DEFAULT_THRESHOLD, RULES

    profile = sub.add_parser("profile", help="per-step convergence of cross-attention maps and outputs; "
                                             "recommends a cache step n")
    profile.add_argument("model", help="shipped model (shapes), preset with a pipeline or local diffusers pipeline folder")
    _add_prompt_run(profile, "T")
    profile.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                         help="the rule's bound: relative output change (below-threshold, default 0.05) or "
                              "fraction of the first change (fraction-of-first)")
    profile.add_argument("--rule", choices=RULES, default="below-threshold", help="cache-step rule (default below-threshold)")
    profile.add_argument("--batch", type=positive_int_arg, default=8, help="prompts per UNet batch (default 8)")
    profile.add_argument("--max-prompts", type=positive_int_arg, help="use only the first N prompts (quick run)")
    profile.add_argument("--height", type=int_arg, help="pixel height (default: native)")
    profile.add_argument("--width", type=int_arg, help="pixel width (default: native)")
    profile.add_argument("--json", help="write the figures as JSON here")
    profile.add_argument("--plot", help="write the plot (PNG) here")
    profile.set_defaults(func=cmd_profile)


def _add_evaluate(sub) -> None:
    from cair_export.lab.evaluate import CACHE_STEPS

    evaluate = sub.add_parser("evaluate", help="quality (attribute accuracy, FID, PSNR, SSIM) and cost against "
                                               "cache step n on shapes, with T-GATE beside")
    evaluate.add_argument("model", nargs="?", default="shapes", help="shipped model or shapes pipeline folder (default shapes)")
    evaluate.add_argument("--classifier", help="attribute classifier folder (default: the shipped one)")
    evaluate.add_argument("--engines-dir", default="engines", help="where the export goes (default engines/)")
    evaluate.add_argument("--num-images", type=int_arg, default=1000,
                          help="images per n, and real drawings per side (default 1000)")
    evaluate.add_argument("--cache-steps", type=int_list, default=CACHE_STEPS,
                          help="comma-separated n values (default 1,2,3,4,5,6,8,10,15,20,25); T is always added")
    evaluate.add_argument("--steps", type=int_arg, default=25, help="denoising steps T (default 25)")
    evaluate.add_argument("--guidance-scale", type=float, default=7.5)
    evaluate.add_argument("--seed", type=int_arg, default=0)
    evaluate.add_argument("--max-batch", type=int_arg, default=32, help="engine batch, images per runtime call (default 32)")
    evaluate.add_argument("--threads", type=int_arg, default=0, help="intra-op threads (0: library default)")
    evaluate.add_argument("--tgate-images", type=int_arg, default=100, help="images per n for T-GATE (0: skip; default 100)")
    evaluate.add_argument("--tgate-cache-steps", type=int_list, help="n values for T-GATE (default: the same as CAIR)")
    evaluate.add_argument("--schedules", type=schedules_arg, default=(), metavar="N:M:K[:MODE[:KP]],...",
                          help="also measure these schedules on an export with fidelity CFG and --deep-branch, with "
                               "CAIR alone (the --cache-steps at m = n, k = 1) from that export; N: a step or T; M: a "
                               "step, n or T; MODE: uniform (default) or non-uniform; KP: the planning interval "
                               "(default 1; T:T:1:uniform:3 is DeepCache at interval 3); a field may be a set, "
                               "{3,5}:{n,T}:{1,2} is the product less m < n. Writes the Pareto report")
    evaluate.add_argument("--deep-branch", type=int_arg, default=0, metavar="B",
                          help="DeepCache's branch: where the shallow graph cuts, and DeepCache's cache_branch_id "
                               "(default 0)")
    evaluate.add_argument("--deepcache-intervals", type=int_list, default=(), metavar="K,...",
                          help="DeepCache alone (its DeepCacheSDHelper) at these cache intervals, e.g. 2,3,4,5 "
                               "(default: none)")
    evaluate.add_argument("--deepcache-images", type=int_arg, default=100,
                          help="images per interval for DeepCache (0: skip; default 100)")
    evaluate.add_argument("--json", help="write the figures as JSON here")
    evaluate.add_argument("--markdown", help="write the markdown report here")
    evaluate.add_argument("--plot", help="write the plot (PNG) here")
    evaluate.set_defaults(func=cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    from cair_export.core.models import PRESETS

    parser = OneLineArgumentParser(prog="cair-export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    presets = ", ".join(PRESETS)
    _add_export(sub, presets)
    _add_calibrate(sub)
    _add_demo(sub)
    _add_macs(sub, presets)
    _add_build(sub)
    _add_quantize(sub)
    _add_compare(sub)
    _add_profile(sub)
    _add_evaluate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    restore = stop_on_signals()
    try:
        return run_command(build_parser(), argv)  # SIGINT: one line and 130 there
    except Terminated:
        print("cair-export: terminated; nothing was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        restore()


if __name__ == "__main__":
    sys.exit(main())
