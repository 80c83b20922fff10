"""``cair-export profile``: how fast cross-attention converges over the denoising steps (CAIR Figure 1).

Runs the plain diffusers loop with classifier-free guidance over the model's own scheduler and, at
every UNet evaluation, records each cross-attention (``attn2``) module's

- attention map: the probabilities ``softmax(Q K^T / sqrt(d))`` of the conditional half, computed
  explicitly by a recording attention processor (shape ``(heads, tokens, text_len)`` per prompt);
- output: the module's output after ``to_out``, merged as CAIR caches it (the mean of the
  unconditional and conditional halves, ``(tokens, channels)`` per prompt).

Normalisation. For prompt p, module m and step t >= 2 the change is the relative L2 distance
``||x_t - x_{t-1}||_2 / ||x_{t-1}||_2`` (Frobenius norm of the module's whole tensor for that
prompt). Changes are averaged over modules (unweighted), then their mean and variance (ddof 0) are
taken over prompts. The absolute distance ``||x_t - x_{t-1}||_2`` is reported the same way.

Rule (``quality_metrics.recommend_cache_step``): the recommended cache step n is the first step
whose mean relative change of the cross-attention *output* is below a bound: ``--threshold``
itself (``--rule below-threshold``, default 5 %) or ``--threshold`` times the first measured change
(``--rule fraction-of-first``, scale-free); n = T when none is.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cair_export.lab.quality_metrics import DEFAULT_THRESHOLD, recommend_cache_step, relative_l2, summarise_series
from cair_runtime.errors import InvalidInputError

QUANTITIES = ("maps", "outputs")


@dataclass(frozen=True)
class ProfileConfig:
    """What the profiler runs; the CLI's flags map onto these fields one to one."""

    model: str  # shipped model, preset with a pipeline, or local diffusers pipeline folder
    prompts: Path  # text file, one prompt a line; blank lines and lines starting with '#' skipped
    steps: int = 25  # denoising steps T
    guidance_scale: float = 7.5
    seed: int = 0  # prompt k starts from np.random.default_rng(seed + k) noise, as the runtime draws it
    threshold: float = DEFAULT_THRESHOLD  # the cache-step rule's bound (see rule)
    rule: str = "below-threshold"  # "below-threshold": change < threshold; "fraction-of-first": < threshold * first
    batch: int = 8  # prompts per UNet batch
    max_prompts: int | None = None  # use only the first N prompts (quick runs)
    height: int | None = None  # pixels; default: the UNet's native size
    width: int | None = None


MAX_PROMPT_FILE_BYTES = 16 * 1024 * 1024  # a prompt file is text; anything larger (or endless, /dev/zero) is refused


def read_prompts(path: Path, limit: int | None = None) -> list[str]:
    """Prompts of a UTF-8 text file: one a line, blank lines and '#' comments skipped.

    At most ``MAX_PROMPT_FILE_BYTES`` are read, so a device or an endless pipe ends in an error.
    """
    fix = "pass a UTF-8 text file, one prompt a line"
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PROMPT_FILE_BYTES + 1)
    except OSError as error:
        raise InvalidInputError(f"cannot read prompt file {path}: {error.strerror}; {fix}") from None
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise InvalidInputError(f"prompt file {path} holds more than {MAX_PROMPT_FILE_BYTES // 2**20} MiB; {fix}")
    if b"\0" in data:
        offset = data.index(b"\0")
        raise InvalidInputError(f"prompt file {path} holds NUL bytes from offset {offset} (a binary file); {fix}")
    try:
        lines = data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise InvalidInputError(f"prompt file {path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
                                f"{error.start}); save it as UTF-8 ({fix})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InvalidInputError(f"prompt file {path} has no prompts; write one prompt a line")
    return prompts[:limit] if limit else prompts


class _RecordingProcessor:
    """Cross-attention with explicit probabilities (diffusers' ``AttnProcessor`` math), recording both."""

    def __init__(self, recorder: _Recorder, index: int):
        self.recorder, self.index = recorder, index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        import torch

        if (hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None
                or attn.residual_connection):
            raise InvalidInputError("the profiler supports attn2 modules on (batch, tokens, channels) inputs "
                                    "without spatial or group norm or residual (SD-style transformer blocks)")
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (2B*heads, tokens, text_len)
        output = attn.batch_to_head_dim(torch.bmm(probs, value))
        output = attn.to_out[1](attn.to_out[0](output))  # (2B, tokens, channels): what CAIR caches
        self.recorder.record(self.index, probs.reshape(batch, attn.heads, *probs.shape[1:]), output)
        return output / attn.rescale_output_factor


class _Recorder:
    """Keeps the previous step's tensors per module and accumulates per-prompt changes."""

    def __init__(self, modules: int, steps: int, batch: int):
        self.previous: dict[tuple[str, int], np.ndarray] = {}
        # (quantity, norm) -> (batch, modules, steps - 1)
        self.changes = {(q, k): np.zeros((batch, modules, steps - 1)) for q in QUANTITIES for k in ("relative", "absolute")}
        self.step = 0  # 0-based index of the UNet evaluation running now

    def record(self, index: int, probs, output) -> None:
        half = output.shape[0] // 2
        current = {
            "maps": probs[half:].double().numpy(),  # conditional half: (B, heads, tokens, text_len)
            "outputs": ((output[:half] + output[half:]) / 2).double().numpy(),  # CAIR's cache: (B, tokens, C)
        }
        for quantity, value in current.items():
            previous = self.previous.get((quantity, index))
            if previous is not None:
                axes = tuple(range(1, value.ndim))
                self.changes[(quantity, "relative")][:, index, self.step - 1] = relative_l2(value, previous, axes)
                self.changes[(quantity, "absolute")][:, index, self.step - 1] = np.sqrt(
                    np.sum((value - previous) ** 2, axis=axes))
            self.previous[(quantity, index)] = value


def profile_model(config: ProfileConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the profile; returns the JSON-ready figures (series per quantity and norm, recommendation)."""
    import torch

    from cair_export.core.models import load_model
    from cair_export.core.reference import cair_denoise, cross_attention_sites, encode_prompts, installed_processors
    from cair_runtime.noise import image_seeds, seeded_latents

    if config.steps < 2:
        raise InvalidInputError(f"steps {config.steps} must be at least 2 to measure a change between steps")
    if config.batch < 1:
        raise InvalidInputError(f"batch {config.batch} must be at least 1")
    prompts = read_prompts(config.prompts, config.max_prompts)
    model = load_model(config.model, with_pipeline=True)
    pipe = model.diffusers_pipeline()
    unet, scheduler = model.unet, pipe.scheduler  # the UNet, or PixArt's transformer
    sites = cross_attention_sites(unet)
    if not sites:
        raise InvalidInputError(f"model {config.model} has no cross-attention (attn2) modules to profile")
    height = config.height or unet.config.sample_size * model.vae_scale_factor
    width = config.width or unet.config.sample_size * model.vae_scale_factor
    shape = (unet.config.in_channels, height // model.vae_scale_factor, width // model.vae_scale_factor)
    scheduler.set_timesteps(config.steps)
    evaluations = len(scheduler.timesteps)  # T, or T+1 for PNDM's warm-up

    all_changes: dict[tuple[str, str], list[np.ndarray]] = {}
    started = time.perf_counter()
    for start in range(0, len(prompts), config.batch):
        batch_prompts = prompts[start:start + config.batch]
        recorder = _Recorder(len(sites), evaluations, len(batch_prompts))
        with installed_processors(unet, sites, lambda index, _: _RecordingProcessor(recorder, index)):
            noise = torch.from_numpy(
                seeded_latents(image_seeds(config.seed + start, len(batch_prompts)), shape))
            # SDXL also takes pooled text embeddings and size ids (added conditions), as its pipeline makes them.
            prompt_embeds, negative_embeds, added, negative_added = encode_prompts(pipe, batch_prompts, None, noise)
            # The plain guided loop (no caching): every step runs both halves through the recorders.
            cair_denoise(unet, scheduler, noise, prompt_embeds, negative_embeds,
                         num_inference_steps=config.steps, cache_step=None, guidance_scale=config.guidance_scale,
                         added_cond=added, negative_added_cond=negative_added,
                         on_step=lambda i: setattr(recorder, "step", i))
        for key, value in recorder.changes.items():
            all_changes.setdefault(key, []).append(value)
        done = start + len(batch_prompts)
        elapsed = time.perf_counter() - started
        progress(f"profiled {done}/{len(prompts)} prompts ({elapsed:.0f} s, "
                 f"about {elapsed / done * (len(prompts) - done):.0f} s left)")

    series = {}
    for (quantity, norm), parts in all_changes.items():
        series.setdefault(quantity, {})[norm] = asdict(summarise_series(np.concatenate(parts)))
    outputs = series["outputs"]["relative"]
    cache_step = recommend_cache_step(outputs["steps"], outputs["mean"], config.steps, config.threshold, config.rule)
    bound = config.threshold * (outputs["mean"][0] if config.rule == "fraction-of-first" else 1.0)
    return {
        "model": config.model, "prompts_file": str(config.prompts), "prompts": len(prompts),
        "steps": config.steps, "evaluations": evaluations, "guidance_scale": config.guidance_scale,
        "seed": config.seed, "height": height, "width": width,
        "scheduler": scheduler.__class__.__name__, "modules": [site.module for site in sites],
        "normalisation": "relative L2 ||x_t - x_{t-1}|| / ||x_{t-1}|| per prompt and module (Frobenius norm), "
                         "unweighted mean over modules, then mean and variance (ddof 0) over prompts; "
                         "maps: conditional half's attention probabilities; outputs: attn2 output after to_out, "
                         "mean of the unconditional and conditional halves (the tensor CAIR caches)",
        "rule": f"{config.rule}: first step whose mean relative change of the cross-attention output is below "
                f"{bound:.4g}" + (f" ({config.threshold:g} x the first change)" if config.rule == "fraction-of-first"
                                  else "") + "; T when none is",
        "rule_kind": config.rule, "threshold": config.threshold, "bound": bound,
        "recommended_cache_step": cache_step,
        # Both rules at their documented defaults, for comparison whatever --rule chose.
        "recommendations_by_rule": {
            "below-threshold 0.05": recommend_cache_step(outputs["steps"], outputs["mean"], config.steps, 0.05),
            "fraction-of-first 0.5": recommend_cache_step(outputs["steps"], outputs["mean"], config.steps, 0.5,
                                                          "fraction-of-first")},
        "series": series, "seconds": time.perf_counter() - started,
    }


def plot_profile(figures: dict[str, Any], path: Path) -> None:
    """Two panels (maps, outputs): mean relative change per step with a +-1 std band, threshold and n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    titles = {"maps": "cross-attention maps", "outputs": "cross-attention outputs"}
    for axis, quantity in zip(axes, QUANTITIES):
        summary = figures["series"][quantity]["relative"]
        steps, mean = np.array(summary["steps"]), np.array(summary["mean"])
        std = np.sqrt(np.array(summary["variance"]))
        axis.plot(steps, mean, marker="o", markersize=3, label="mean over prompts")
        axis.fill_between(steps, np.maximum(mean - std, 0), mean + std, alpha=0.25, label="±1 std over prompts")
        axis.axvline(figures["recommended_cache_step"], color="C3", linestyle="--",
                     label=f"recommended n = {figures['recommended_cache_step']}")
        if quantity == "outputs":
            axis.axhline(figures["bound"], color="gray", linestyle=":", label=f"rule bound {figures['bound']:.3g}")
        axis.set_yscale("log")
        axis.set_xlabel("denoising step t")
        axis.set_ylabel("||x_t - x_{t-1}|| / ||x_{t-1}||")
        axis.set_title(titles[quantity])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(f"{figures['model']}: {figures['prompts']} prompts, {figures['scheduler']}, T = {figures['steps']}, "
                 f"guidance {figures['guidance_scale']:g}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_profile(figures: dict[str, Any]) -> str:
    """A per-step table of mean (std) relative changes and the recommendation."""
    maps, outputs = figures["series"]["maps"]["relative"], figures["series"]["outputs"]["relative"]
    lines = [f"{figures['model']}: {figures['prompts']} prompts, {figures['scheduler']}, T = {figures['steps']}, "
             f"{len(figures['modules'])} cross-attention modules",
             f"{'step':>4s}  {'maps: mean (std)':>20s}  {'outputs: mean (std)':>20s}"]
    for index, step in enumerate(outputs["steps"]):
        lines.append(f"{step:4d}  {maps['mean'][index]:10.4f} ({np.sqrt(maps['variance'][index]):7.4f})  "
                     f"{outputs['mean'][index]:10.4f} ({np.sqrt(outputs['variance'][index]):7.4f})")
    lines.append(f"recommended cache step n = {figures['recommended_cache_step']} ({figures['rule']})")
    lines.append("by rule: " + ", ".join(f"{rule}: n = {n}" for rule, n in figures["recommendations_by_rule"].items()))
    return "\n".join(lines)
