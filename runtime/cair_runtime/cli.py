"""``cair-run``: run a CAIR engine folder from the command line.

Project errors become one line on stderr and exit code 2; anything else is a bug.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np

from cair_runtime.backends import BACKENDS
from cair_runtime.errors import CairError, InvalidInputError
from cair_runtime.files import check_writable, write_atomically
from cair_runtime.interrupts import Terminated, stop_on_signals
from cair_runtime.schedulers import SCHEDULER_NAMES
from cair_runtime.schedule import SCHEDULE_FIELDS, SKIP_MODES


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (and exit code 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _load_npy(path: str | None, label: str) -> np.ndarray | None:
    if path is None:
        return None
    try:
        # Memory-mapped first: a header claiming more data than the file holds fails here, not in
        # an allocation of petabytes.
        return np.array(np.load(path, mmap_mode="r", allow_pickle=False))
    except (OSError, ValueError, EOFError, MemoryError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InvalidInputError(f"cannot read {label} from {path}: {reason}") from None


class _Progress:
    """A one-line progress bar with seconds per step and time left, on stderr when it is a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.started: float | None = None

    def __call__(self, step: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.started is None or step == 1:
            self.started, self.first = now, step  # the first step's own time is unknown: count from its end
        done = step - self.first
        rate = f"{(now - self.started) / done:.2f} s/step, {(now - self.started) / done * (total - step):.0f} s left" \
            if done else "..."
        filled = round(30 * step / total)
        print(f"\r  denoising [{'#' * filled}{'.' * (30 - filled)}] {step}/{total} {rate}\033[K", end="",
              file=sys.stderr, flush=True)
        if step == total:
            print(file=sys.stderr)


DEFAULT_PROVIDERS = "CPUExecutionProvider"


def _providers(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(p.strip() for p in args.providers.split(",") if p.strip())


def _backend_options(args: argparse.Namespace, with_providers: bool = False) -> dict:
    """The UNet backend's keywords from the flags; a flag that would be ignored is refused.

    ``with_providers``: the onnxruntime flags are the UNet's alone (without a prompt there are no
    text encoder or VAE sessions that would take them).
    """
    ignored = [flag for flag, given in (("--graph-optimization", args.graph_optimization is not None),
                                        ("--share-weights", args.share_weights),
                                        ("--two-graphs", args.two_graphs),
                                        ("--providers", with_providers and args.providers != DEFAULT_PROVIDERS),
                                        ("--threads", with_providers and args.threads != 0)) if given]
    if args.backend == "openvino":  # it takes the thread count and the switch/two-graph choice too
        ignored = [flag for flag in ignored if flag not in ("--two-graphs", "--threads")]
    if args.backend != "onnxruntime" and ignored:
        raise InvalidInputError(f"{', '.join(ignored)} configure onnxruntime, not the {args.backend} backend; "
                                "drop them or use --backend onnxruntime")
    if args.precision is not None and args.backend != "openvino":
        raise InvalidInputError(f"--precision chooses the openvino backend's precision, not the {args.backend} "
                                "backend's (its precision is the export's); drop it or use --backend openvino")
    if args.backend == "openvino":
        if args.device_id is not None:
            raise InvalidInputError("--device-id selects a GPU; the openvino backend runs on the CPU: drop it")
        options = {"precision": args.precision or "auto"}  # two graphs: its default (docs/openvino.md)
        return {**options, "threads": args.threads} if with_providers else options
    if args.device_id is not None and args.device_id < 0:
        raise InvalidInputError(f"--device-id {args.device_id} must be a GPU index (0, 1, ...)")
    if args.backend == "aoti":
        return {} if args.device_id is None else {"device": f"cuda:{args.device_id}"}
    device = {} if args.device_id is None else {"device_id": args.device_id}
    if args.backend == "tensorrt":
        return device
    options = {"graph_optimization": args.graph_optimization, "share_weights": args.share_weights,
               "one_graph": not args.two_graphs, **device}
    if with_providers:
        options.update(providers=_providers(args), threads=args.threads)
    return options


def _loras(args: argparse.Namespace) -> list[tuple[str, float]]:
    from cair_runtime.lora import check_lora_list, parse_lora_arg

    loras = [parse_lora_arg(text) for text in args.lora or ()]
    check_lora_list(loras)  # before any model is loaded
    return loras


def _schedule_request(args: argparse.Namespace) -> dict:
    """The schedule's fields from their flags (each flag's dest is the field's name; unset: None, the
    folder's default); image to image's strength defaults to 0.8."""
    request = {name: getattr(args, name) for name in SCHEDULE_FIELDS}
    if args.image is not None and request["strength"] is None:
        request["strength"] = 0.8
    return request


def _image_paths(output: Path, count: int) -> list[Path]:
    """out.png for one image; out-0.png, out-1.png, ... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{k}{output.suffix}") for k in range(count)]


def cmd_text_to_image(args: argparse.Namespace) -> int:
    import warnings

    from cair_runtime.text2image import CairText2Image, save_png

    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise InvalidInputError(f"output {output} must end in .png: images are written as PNG, with their "
                                "generation parameters in its text chunks")
    for path in _image_paths(output, args.num_images):
        check_writable(path)
    if args.image is not None:
        from cair_runtime.images import load_image

        load_image(args.image)  # a bad file fails before the engine loads
    elif args.strength is not None:
        raise InvalidInputError("--strength is for image to image; give --image too")
    if args.ip_adapter_image is not None:
        from cair_runtime.images import load_image

        load_image(args.ip_adapter_image)  # a bad file fails before the engine loads
    elif args.ip_adapter_scale is not None:
        raise InvalidInputError("--ip-adapter-scale weighs an image prompt; give --ip-adapter-image too")
    pipeline = CairText2Image(args.engine_dir, args.backend, providers=_providers(args), threads=args.threads,
                              loras=_loras(args), **_backend_options(args))
    schedule = pipeline.engine.resolve_schedule(_schedule_request(args))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pipeline(
            args.prompt, args.negative_prompt, num_images_per_prompt=args.num_images, height=args.height,
            width=args.width, schedule=schedule, guidance_scale=args.guidance_scale, scheduler=args.scheduler,
            seed=args.seed, callback=_Progress(not args.json), image=args.image, prompt_chunks=args.prompt_chunks,
            control_image=args.control_image, control_scale=_per_net(args.control_scale, 1.0),
            control_guidance_start=_per_net(args.control_guidance_start, 0.0),
            control_guidance_end=_per_net(args.control_guidance_end, 1.0), guess_mode=args.guess_mode,
            ip_adapter_image=args.ip_adapter_image,
            ip_adapter_scale=1.0 if args.ip_adapter_scale is None else args.ip_adapter_scale)
    for message in dict.fromkeys(str(warning.message) for warning in caught):  # SDXL: once, not per encoder
        print(f"cair-run: warning: {message}", file=sys.stderr)
    paths = _image_paths(output, len(result.images))
    for image, path, parameters in zip(result.images, paths, result.parameters):
        save_png(image, path, parameters)
    timings = {**result.timings.as_dict(), "text_s": result.text_s, "vae_s": result.vae_s,
               **({"image_s": result.image_s} if args.image is not None else {})}
    if args.json:
        print(json.dumps({"outputs": [str(p) for p in paths], **timings}, indent=2))
    else:
        t = result.timings
        encode = f", image {result.image_s:.3f} s" if args.image is not None else ""
        print(f"wrote {', '.join(map(str, paths))}: text {result.text_s:.3f} s{encode}, planning {t.planning_steps} steps "
              f"{t.planning_s:.3f} s, switch {t.switch_s * 1e3:.3f} ms, fidelity {t.fidelity_steps} steps "
              f"({t.shallow_steps} shallow, {t.shallow_s:.3f} s) "
              f"{t.fidelity_s:.3f} s, decode {result.vae_s:.3f} s")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from cair_runtime.pipeline import CairEngine

    if args.prompt is None and (args.image is not None or args.strength is not None):
        raise InvalidInputError("--image and --strength need a prompt (image to image runs the whole pipeline)")
    if (args.prompt is None) == (args.encoder_hidden_states is None):
        raise InvalidInputError("give either a prompt (text-to-image) or --encoder-hidden-states (UNet only), "
                                "not both or neither")
    if args.prompt is not None:
        return cmd_text_to_image(args)
    output = Path(args.output)
    if output.suffix.lower() != ".npy":
        raise InvalidInputError(f"output {output} must end in .npy: the UNet alone writes the final latents as a "
                                "numpy array")
    check_writable(output)
    prompt_embeds = _load_npy(args.encoder_hidden_states, "--encoder-hidden-states")
    inputs = {
        "negative_prompt_embeds": _load_npy(args.negative_encoder_hidden_states, "--negative-encoder-hidden-states"),
        "latents": _load_npy(args.latents, "--latents"),
        "text_embeds": _load_npy(args.text_embeds, "--text-embeds"),
        "negative_text_embeds": _load_npy(args.negative_text_embeds, "--negative-text-embeds"),
    }
    engine = CairEngine(args.engine_dir, args.backend, loras=_loras(args),
                        **_backend_options(args, with_providers=True))
    result = engine.denoise(
        prompt_embeds, **inputs, height=args.height, width=args.width,
        schedule=engine.resolve_schedule(_schedule_request(args)), guidance_scale=args.guidance_scale,
        scheduler=args.scheduler, seed=args.seed, callback=_Progress(not args.json),
    )
    write_atomically(output, lambda file: np.save(file, result.latents))
    timings = result.timings.as_dict()
    if args.json:
        print(json.dumps({"output": str(output), "shape": list(result.latents.shape), **timings}, indent=2))
    else:
        print(f"wrote {output} {tuple(result.latents.shape)}: planning {timings['planning_steps']} steps "
              f"{timings['planning_s']:.3f} s, switch {timings['switch_s'] * 1e3:.3f} ms, "
              f"fidelity {timings['fidelity_steps']} steps {timings['fidelity_s']:.3f} s, "
              f"total {timings['total_s']:.3f} s")
    return 0


def _per_net(values: list[float] | None, default: float) -> float | list[float]:
    """A repeated ControlNet flag: unset -> the default, once -> every net, else one per net."""
    if not values:
        return default
    return values[0] if len(values) == 1 else values


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="cair-run", description="Run a CAIR engine folder: a prompt to PNG images, or embeddings to latents.")
    parser.add_argument("engine_dir", help="folder written by `cair-export export`")
    parser.add_argument("prompt", nargs="?", help="text prompt (text-to-image; needs a pipeline export)")
    parser.add_argument("--negative-prompt", help="negative prompt (default: none)")
    parser.add_argument("--control-image", action="append", metavar="FILE",
                        help="ControlNet engines: the control map (RGB or grayscale, at the output size; canny "
                             "edges, depth... are yours to make), one per ControlNet in export order")
    parser.add_argument("--control-scale", action="append", type=float, metavar="S",
                        help="ControlNet conditioning scale (default 1; once, or once per ControlNet)")
    parser.add_argument("--control-guidance-start", action="append", type=float, metavar="F",
                        help="fraction of the steps before a ControlNet starts acting (default 0)")
    parser.add_argument("--control-guidance-end", action="append", type=float, metavar="F",
                        help="fraction of the steps after which a ControlNet stops acting (default 1)")
    parser.add_argument("--guess-mode", action="store_true",
                        help="ControlNet guess mode (diffusers'): residuals on the conditional half only, deeper ones "
                             "stronger")
    parser.add_argument("--ip-adapter-image", metavar="FILE",
                        help="IP-Adapter engines: the image prompt (RGB or grayscale, any size: resized and "
                             "cropped as the adapter's CLIP image encoder expects)")
    parser.add_argument("--ip-adapter-scale", type=float, metavar="S",
                        help="weight of the image prompt (default 1; diffusers' set_ip_adapter_scale)")
    parser.add_argument("--prompt-chunks", type=int, metavar="C",
                        help="encode the prompts in C text-encoder windows (75 tokens each for CLIP; 1: truncate at "
                             "one; default: as many as the longer text needs, up to the export's --max-prompt-chunks)")
    parser.add_argument("--num-images", type=int, default=1,
                        help="images for the prompt (default 1); several are written as OUT-0.png, OUT-1.png, ...")
    parser.add_argument("--image", metavar="FILE",
                        help="image to image: the init image (RGB, or grayscale, converted; its size is the output's)")
    parser.add_argument("--strength", type=float,
                        help="image to image: how much of the schedule runs, in (0, 1] (default 0.8); n, m and k "
                             "count the min(int(steps * strength), steps) steps that run")
    parser.add_argument("--encoder-hidden-states", metavar="FILE.npy",
                        help="UNet only: prompt embeddings (B, text_len, D), float32 .npy, instead of a prompt")
    parser.add_argument("--negative-encoder-hidden-states", metavar="FILE.npy",
                        help="negative prompt embeddings (B, text_len, D); default zeros")
    parser.add_argument("--text-embeds", metavar="FILE.npy", help="SDXL pooled text embeddings (B, 1280)")
    parser.add_argument("--negative-text-embeds", metavar="FILE.npy", help="SDXL negative pooled embeddings; default zeros")
    parser.add_argument("--latents", metavar="FILE.npy", help="initial noise (B, C, h, w); default seeded numpy noise")
    parser.add_argument("--output", "-o", required=True, metavar="FILE",
                        help="PNG image(s) for a prompt; .npy final latents for --encoder-hidden-states")
    parser.add_argument("--height", type=int, help="pixel height (default: the engine's tuned size)")
    parser.add_argument("--width", type=int, help="pixel width (default: the engine's tuned size)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps T (default 25)")
    parser.add_argument("--cache-step", type=int,
                        help="cache step n, 1..T; T = baseline (default: the folder's calibrated schedule, else the "
                             "export's hint)")
    parser.add_argument("--guidance-stop", type=int, metavar="M",
                        help="guidance stop m, n..T: guided fidelity steps up to m (m > n: not on engines exported "
                             "with --fidelity-guidance none; default: calibrated, else n)")
    parser.add_argument("--deep-interval", type=int, metavar="K",
                        help="after n, a full fidelity step every K-th and shallow steps between (not on engines "
                             "exported with --deep-branch none; default: calibrated, else 1: every step full)")
    parser.add_argument("--planning-interval", type=int, metavar="K_P",
                        help="in steps 1..n, a full planning step every K_P-th and guided shallow steps between "
                             "(DeepCache's own steps; not on --deep-branch none; default: calibrated, else 1)")
    parser.add_argument("--skip-mode", choices=SKIP_MODES,
                        help="where the full steps fall: uniform or DeepCache's non-uniform (default: calibrated, "
                             "else uniform)")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--scheduler", help=f"one of {', '.join(SCHEDULER_NAMES)} (default: the model's own, also named by its "
                             "class, as the PNG parameters record it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the numpy noise (default 0)")
    parser.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                        help="what runs the UNet graphs: onnxruntime (default), tensorrt or aoti (after cair-export "
                             "build), or openvino (every graph, on the CPU; pip install 'cair-runtime[openvino]')")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "int8"),
                        help="openvino backend: compute precision; auto (default) is bf16 on CPUs with bf16 matrix "
                             "units, else fp32; int8 runs the graphs of `cair-export quantize` (docs/openvino.md)")
    parser.add_argument("--device-id", type=int, metavar="N",
                        help="GPU to run on: onnxruntime's CUDA/TensorRT providers (every session), the TensorRT "
                             "backend, or cuda:N for AOTInductor packages compiled for CUDA")
    parser.add_argument("--providers", default=DEFAULT_PROVIDERS,
                        help="onnxruntime execution providers, comma separated (default CPUExecutionProvider)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads, 0 = onnxruntime's default")
    parser.add_argument("--graph-optimization", choices=("disable", "basic", "extended", "all"),
                        help="onnxruntime's optimisation level for the UNet graphs (default: all; extended with "
                             "--share-weights)")
    parser.add_argument("--share-weights", action="store_true",
                        help="the UNet sessions use one memory-mapped copy of the weights (prepacking off): the "
                             "fastest load; on the CPU about 20%% slower per step (docs/weights_once.md)")
    parser.add_argument("--two-graphs", action="store_true",
                        help="run planning.onnx and fidelity.onnx as two sessions, each with its own copy of the "
                             "weights, instead of the switch graph's one session (unet.onnx, in folders "
                             "exported with one; the same bits, twice the memory)")
    parser.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                        help="LoRA adapter (.safetensors, diffusers or kohya layout) applied at run time without "
                             "re-exporting, scale default 1; repeat for several (onnxruntime backend, fp32 exports)")
    parser.add_argument("--json", action="store_true", help="print timings as JSON (no progress bar)")
    parser.set_defaults(func=cmd_run)
    return parser


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse and run; a project error is one line and exit code 2, anything else a bug (traceback)."""
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CairError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; nothing was written", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    restore = stop_on_signals()  # SIGTERM unwinds too: no temporary PNG left behind
    try:
        return run_command(build_parser(), argv)
    except Terminated:
        print("cair-run: terminated; nothing was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        restore()


def cmd_verify(args: argparse.Namespace) -> int:
    from cair_runtime.manifest import load_manifest

    started = time.perf_counter()
    manifest = load_manifest(args.engine_dir, verify="full")
    size = sum(record.size for record in manifest.files)
    print(f"{args.engine_dir}: {len(manifest.files)} files, {size / 1e9:.2f} GB, every sha256 matches "
          f"({time.perf_counter() - started:.1f} s); later loads skip hashing while the files stay as they are")
    return 0


def build_verify_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="cair-verify", description="Check every byte of an engine folder against its manifest (sha256) and "
                                        "record it, so that loading it later needs no hashing while it is unchanged.")
    parser.add_argument("engine_dir", help="folder written by `cair-export export`")
    parser.set_defaults(func=cmd_verify)
    return parser


def verify_main(argv: list[str] | None = None) -> int:
    """``cair-verify ENGINE_DIR``: full verification on demand."""
    return run_command(build_verify_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
