"""ControlNet layout: one fused graph a step (UNet and nets) against separate graphs (the nets, then a UNet
that takes their residuals), timed side by side in onnxruntime.

The export fuses ControlNets into the UNet graphs, as NVIDIA's TensorRT demo does. The alternative keeps
each net in a graph of its own that outputs its residuals, and a UNet graph that takes them as inputs: a
net could then be skipped on steps outside its ``control_guidance_start/end`` (the fused graph runs it at
scale 0, as diffusers does). This script measures what the separate layout costs per step where every net
runs, at the planning batch (2, guided) and the fidelity batch (1): the separate layout at its best, the
residuals handed from one session to the next as OrtValues through IO binding (no host copies), against
the fused graph, both traced by the same exporter from the same modules, in one process, alternating.

    python scripts/controlnet_layout.py --model sd15 --size 256 --repeats 20 --markdown docs/controlnet_layout.md

``--model tiny-sd15`` checks the script quickly. A step here is the plain UNet (cross-attention computed):
CAIR's fidelity graphs replay it in both layouts alike, so it does not change the comparison.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from cair_export.lab.harness import cpu_name


class Fused(torch.nn.Module):
    """UNet and net in one graph: the net's residuals, times the scale, added inside."""

    def __init__(self, unet, net):
        super().__init__()
        self.unet, self.net = unet, net

    def forward(self, sample, timestep, context, image, scale):
        down, mid = self.net(sample, timestep, context, image, return_dict=False)
        down = [residual * scale for residual in down]
        return self.unet(sample, timestep, context, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid * scale, return_dict=False)[0]


class NetAlone(torch.nn.Module):
    """The net in a graph of its own: its residuals out, scaled."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, sample, timestep, context, image, scale):
        down, mid = self.net(sample, timestep, context, image, return_dict=False)
        return (*[residual * scale for residual in down], mid * scale)


class UNetTakingResiduals(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, context, *residuals):
        return self.unet(sample, timestep, context, down_block_additional_residuals=list(residuals[:-1]),
                         mid_block_additional_residual=residuals[-1], return_dict=False)[0]


def export(module: torch.nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str], path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(inputs.values()), str(path), input_names=list(inputs), output_names=outputs,
                          opset_version=17, do_constant_folding=True, dynamo=False)


def main() -> int:
    from diffusers import ControlNetModel

    from cair_export.core.controlnet import tiny_controlnet
    from cair_export.core.models import load_model
    from cair_runtime.backends.onnxruntime import make_session
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", help="UNet preset (default sd15; tiny-sd15 to check quickly)")
    parser.add_argument("--size", type=int, default=256, help="pixel size (default 256)")
    parser.add_argument("--repeats", type=int, default=20, help="measured steps per layout and batch (default 20)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    parser.add_argument("--markdown", type=Path, help="write the report here too")
    args = parser.parse_args()

    model = load_model(args.model)
    unet = model.unet.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        net = (tiny_controlnet(unet, 100) if args.model.startswith("tiny")
               else ControlNetModel.from_unet(unet).eval())  # the architecture published ControlNets have
    side = args.size // model.vae_scale_factor
    results = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for batch in (2, 1):
            inputs = {"sample": torch.randn(batch, unet.config.in_channels, side, side),
                      "timestep": torch.tensor([500.0]),
                      "context": torch.randn(batch, model.text_len, unet.config.cross_attention_dim),
                      "image": torch.rand(batch, 3, args.size, args.size), "scale": torch.tensor([0.8])}
            with torch.no_grad():
                residuals = NetAlone(net)(*inputs.values())
            names = [f"residual_{r}" for r in range(len(residuals))]
            print(f"exporting the graphs at batch {batch}", file=sys.stderr, flush=True)
            export(Fused(unet, net), inputs, ["noise_pred"], work / f"fused{batch}.onnx")
            export(NetAlone(net), inputs, names, work / f"net{batch}.onnx")
            unet_inputs = {**{k: inputs[k] for k in ("sample", "timestep", "context")}, **dict(zip(names, residuals))}
            export(UNetTakingResiduals(unet), unet_inputs, ["noise_pred"], work / f"unet{batch}.onnx")
            fused, net_session, unet_session = (make_session(work / f"{kind}{batch}.onnx", threads=args.threads)
                                                for kind in ("fused", "net", "unet"))
            feed = {name: value.numpy() for name, value in inputs.items()}

            def run_fused():
                return fused.run(None, feed)[0]

            net_binding, unet_binding = net_session.io_binding(), unet_session.io_binding()
            for name, value in feed.items():
                net_binding.bind_cpu_input(name, value)
            for name in ("sample", "timestep", "context"):
                unet_binding.bind_cpu_input(name, feed[name])
            for name in names:
                net_binding.bind_output(name, "cpu")
            unet_binding.bind_output("noise_pred", "cpu")

            def run_separate():
                net_session.run_with_iobinding(net_binding)
                for name, value in zip(names, net_binding.get_outputs()):  # OrtValues: no host copy
                    unet_binding.bind_ortvalue_input(name, value)
                unet_session.run_with_iobinding(unet_binding)
                return unet_binding.get_outputs()[0].numpy()

            difference = np.abs(run_fused() - run_separate()).max()
            times = {"fused": [], "separate": []}
            for _ in range(args.repeats):  # alternating, so drift on the machine hits both alike
                for name, run in (("fused", run_fused), ("separate", run_separate)):
                    started = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - started)
            results[batch] = {name: statistics.median(values) for name, values in times.items()}
            results[batch]["max_abs_difference"] = float(difference)
            del fused, net_session, unet_session, net_binding, unet_binding

    command = "python scripts/controlnet_layout.py " + " ".join(sys.argv[1:])
    lines = ["# ControlNet layout: fused against separate graphs", "",
             f"Date: {datetime.date.today()}. Machine: {cpu_name()}, onnxruntime {ort.__version__} "
             f"CPUExecutionProvider, {args.threads or 'default'} threads.", "", "```", command, "```", "",
             f"{args.model} UNet and one ControlNet (`ControlNetModel.from_unet`, random weights) at {args.size} px, "
             f"median of {args.repeats} steps each, alternating.", "",
             "| batch | fused (s/step) | separate (s/step) | separate / fused | max abs difference |",
             "|---|---|---|---|---|"]
    for batch, row in results.items():
        lines.append(f"| {batch} ({'planning, guided' if batch == 2 else 'fidelity'}) | {row['fused']:.4f} | "
                     f"{row['separate']:.4f} | {row['separate'] / row['fused']:.3f} | {row['max_abs_difference']:.1e} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.markdown:
        args.markdown.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
