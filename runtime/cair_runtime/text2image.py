"""Text to image (and image to image) with an exported pipeline folder: tokenize, encode, CAIR loop, decode.

Mirrors diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (prompt encoding,
``num_images_per_prompt`` ordering, SDXL time ids and zeroed negative embeddings, VAE
post-processing) with onnxruntime sessions for the text encoder(s) and the VAE decoder, and the
UNet engine of ``CairEngine``; with an init image, their ``...Img2ImgPipeline`` (image
pre-processing, the VAE encoder's latent sample, the start step set by ``strength``). Needs only
numpy, onnxruntime, tokenizers and Pillow.
"""

from __future__ import annotations

import functools
import io
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cair_runtime.backends.pool import CallGate
from cair_runtime.checks import check_finite_result, check_guidance_scale, is_finite_number, is_integer
from cair_runtime.errors import InvalidInputError, ManifestError
from cair_runtime.manifest import size_problem
from cair_runtime.files import write_atomically
from cair_runtime.lora import LoraSet
from cair_runtime.images import clip_pixels, load_image
from cair_runtime.noise import image_generators, image_seeds, standard_normal
from cair_runtime.pipeline import CairEngine, StageTimings, check_image_count
from cair_runtime.schedule import DEFAULT_STEPS, Schedule, schedule_request


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the text encoder takes; the tail was dropped."""


@dataclass
class Text2ImageResult:
    images: np.ndarray  # (N, H, W, 3) uint8, prompt-major: prompt 0's images first
    decoded: np.ndarray  # (N, 3, H, W) float32 in [0, 1], before rounding to uint8
    latents: np.ndarray  # (N, C, h, w) final latents
    timings: StageTimings
    text_s: float  # prompt encoding
    vae_s: float  # decoding
    parameters: list[dict[str, Any]] = field(default_factory=list)  # per image, for PNG metadata
    image_s: float = 0.0  # image to image: encoding the init image (VAE encoder, latent samples)


class _Tokenizer:
    """A CLIP or T5 tokenizer from ``tokenizer.json``; a prompt becomes windows of ``max_length`` ids.

    Long prompts follow the convention of A1111's web UI and compel: the prompt's tokens (without
    the start and end tokens) are split into chunks of ``max_length - 2`` (75), each wrapped in the
    start and end tokens and padded to ``max_length``; the text encoder encodes each window on its
    own and the UNet reads the windows' embeddings concatenated. One window is diffusers' own
    tokenization (``padding="max_length"``, truncation keeping the end token). T5 (PixArt) has no start
    token and one window (300 tokens for PixArt-Sigma), with a mask of the tokens besides the ids; Gemma
    (Sana) has no end token. Both pipelines lower-case and strip their prompts first.

    Sana's ``instruction`` (``SanaPipeline``'s "complex human instruction") goes before every prompt (not
    negative prompts): ``encode(..., instructed=True)`` tokenizes instruction and prompt into
    ``instruction tokens + max_length - 2`` ids, and ``selected`` keeps the start token's row and the last
    ``max_length - 1`` of the encoder's output, as ``SanaPipeline.encode_prompt``.
    """

    def __init__(self, path: Path, spec: dict[str, Any]):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.max_length = int(spec["max_length"])
        self.masked = bool(spec.get("attention_mask", False))  # T5
        self.bos = None if spec.get("bos_token_id") is None else int(spec["bos_token_id"])
        self.eos, self.pad = int(spec["eos_token_id"]), int(spec["pad_token_id"])
        self.ends = self.eos in self.tokenizer.encode("").ids  # CLIP and T5 end every text with EOS, Gemma not
        self.instruction = spec.get("instruction")  # Sana's text before each prompt
        self.instruction_tokens = 0 if self.instruction is None else len(self.tokenizer.encode(self.instruction).ids)

    @property
    def window(self) -> int:
        """Prompt tokens per window: ``max_length`` less the start and end tokens the tokenizer adds (Sana's
        prompts, after the instruction: ``max_length - 2``)."""
        return self._plain_window - (self.instruction is not None)

    @property
    def _plain_window(self) -> int:
        return self.max_length - (self.bos is not None) - self.ends

    def _text(self, prompt: str) -> str:
        return prompt.lower().strip() if self.masked else prompt  # PixArt's and Sana's _text_preprocessing

    def _body(self, prompt: str) -> tuple[list[int], list[str]]:
        """The prompt's ids and token strings without the start and end tokens the post-processor adds."""
        encoding = self.tokenizer.encode(self._text(prompt))
        ids, tokens = list(encoding.ids), list(encoding.tokens)
        if ids and self.bos is not None and ids[0] == self.bos:
            ids, tokens = ids[1:], tokens[1:]
        if ids and self.ends and ids[-1] == self.eos:
            ids, tokens = ids[:-1], tokens[:-1]
        return ids, tokens

    def chunks_needed(self, prompt: str) -> int:
        """Windows that hold all of ``prompt`` (at least one)."""
        return max(1, -(-len(self._body(prompt)[0]) // self.window))

    def __call__(self, prompts: Sequence[str], chunks: int = 1) -> np.ndarray:
        """(len(prompts) * chunks, max_length) ids, prompt-major; tokens beyond ``chunks`` windows are
        dropped with a ``PromptTruncatedWarning``, and windows a prompt does not fill hold only the start
        and end tokens (an empty prompt's window)."""
        return self.encode(prompts, chunks)[0]

    def encode(self, prompts: Sequence[str], chunks: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The ids, as ``__call__``, and their mask: 1 for the start, prompt and end tokens, 0 for padding."""
        window = self._plain_window  # negative prompts too: Sana encodes them without its instruction
        ids = np.full((len(prompts), chunks, self.max_length), self.pad, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            body, tokens = self._body(prompt)
            keep = chunks * window
            if len(body) > keep:
                dropped = "".join(tokens[keep:]).replace("</w>", " ").strip()
                warnings.warn(f"prompt longer than {chunks} window(s) of {window} tokens, truncated; "
                              f"dropped: {dropped!r}", PromptTruncatedWarning, stacklevel=3)
            for chunk in range(chunks):
                part = body[chunk * window:(chunk + 1) * window]
                wrapped = [*([] if self.bos is None else [self.bos]), *part, *([self.eos] if self.ends else [])]
                ids[row, chunk, :len(wrapped)] = wrapped
                mask[row, chunk, :len(wrapped)] = 1
        shape = (len(prompts) * chunks, self.max_length)
        return ids.reshape(shape), mask.reshape(shape)

    def encode_instructed(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Sana: the instruction then each prompt, truncated to ``instruction tokens + max_length - 2`` ids
        (the end of a long prompt is dropped, with a ``PromptTruncatedWarning``), padded to that length."""
        length = self.instruction_tokens + self.max_length - 2
        ids = np.full((len(prompts), length), self.pad, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            encoding = self.tokenizer.encode(self.instruction + self._text(prompt))
            if len(encoding.ids) > length:
                dropped = "".join(encoding.tokens[length:]).replace("▁", " ").strip()
                warnings.warn(f"prompt longer than {self.max_length - 2} tokens after Sana's instruction, truncated; "
                              f"dropped: {dropped!r}", PromptTruncatedWarning, stacklevel=3)
            kept = encoding.ids[:length]
            ids[row, :len(kept)], mask[row, :len(kept)] = kept, 1
        return ids, mask

    def selected(self, array: np.ndarray) -> np.ndarray:
        """An instructed encoding's rows the transformer reads: the start token's and the last ``max_length - 1``."""
        return np.concatenate([array[:, :1], array[:, 1 - self.max_length:]], axis=1)


def png_bytes(image: np.ndarray, parameters: dict[str, Any]) -> bytes:
    """One (H, W, 3) uint8 image as PNG bytes, with the generation parameters as text chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in parameters.items():
        info.add_text(key, "" if value is None else str(value))
    info.add_text("parameters", json.dumps(parameters))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: np.ndarray, path: str | Path, parameters: dict[str, Any]) -> None:
    """Save one (H, W, 3) uint8 image with the generation parameters as PNG text chunks."""
    data = png_bytes(image, parameters)
    write_atomically(path, lambda file: file.write(data))


def _in_flight(method: Callable) -> Callable:
    """Run ``method`` as a call in flight: ``close()`` waits for it, and refuses it once closed."""
    @functools.wraps(method)
    def call(self, *args: Any, **kwargs: Any) -> Any:
        with self._calls.enter():
            return method(self, *args, **kwargs)
    return call


class CairText2Image:
    """An exported pipeline folder ready to turn prompts into images.

    The UNet graphs run on ``backend``; the text encoder(s) and the VAE decoder (once per call)
    run in onnxruntime with ``providers`` and ``threads`` (one budget: every session's intra-op
    pool; on the openvino backend they are compiled by OpenVINO like the UNet, at its precision). Thread-safe:
    share one instance between request threads. The text encoders and the
    VAE are plain ``InferenceSession.run`` calls (thread-safe in onnxruntime); the UNet loop runs
    in a per-call context from the engine's pool (``max_concurrency``, see ``CairEngine``).
    Keywords beyond these go to ``CairEngine`` (``max_concurrency``, ``verify``, ``loras``) and the
    backend. LoRA adapters reach the UNet graphs and the text encoder(s) alike.
    """

    def __init__(self, folder: str | Path, backend: str = "onnxruntime",
                 providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0, **backend_options: Any):
        from cair_runtime.backends.onnxruntime import adapter_optimization, make_session

        if backend == "onnxruntime":
            backend_options = {"providers": providers, "threads": threads, **backend_options}
        elif backend == "openvino":  # one thread budget for every graph, as on onnxruntime
            backend_options = {"threads": threads, **backend_options}
        loras = backend_options.pop("loras", None)
        self.engine = CairEngine(folder, backend, **backend_options)
        self._calls = CallGate(f"the pipeline of {folder}")  # close() waits for calls in flight
        manifest = self.engine.manifest
        if manifest.pipeline is None:
            raise ManifestError(f"{folder} is a UNet-only export (no text encoder or VAE); export a pipeline "
                                "(a preset like tiny-sd21, or a diffusers pipeline folder) for text-to-image, "
                                "or pass --encoder-hidden-states")
        self.pipeline = manifest.pipeline

        def session(kind: str, overrides: dict[str, np.ndarray] | None = None):
            import onnxruntime as ort

            if hasattr(self.engine.backend, "session") and not overrides:  # OpenVINO: every graph on it
                return self.engine.backend.session(kind)

            # Run once per call: no idle spinning that would take the UNet's cores.
            return make_session(Path(folder) / manifest.graphs[kind].file, providers, threads=threads,
                                device_id=backend_options.get("device_id", 0), spinning=False,
                                initializers={name: ort.OrtValue.ortvalue_from_numpy(array)
                                              for name, array in (overrides or {}).items()}, prepacking=True,
                                graph_optimization=adapter_optimization("all") if overrides else "all")

        self._session = session
        self._text_overridden: set[str] = set()  # text encoders whose sessions hold adapter weights
        self.text_encoders = [(spec, _Tokenizer(Path(folder) / spec["tokenizer"], spec), session(spec["graph"]))
                              for spec in self.pipeline["text_encoders"]]
        self.vae = session(self.pipeline["vae_graph"])
        # Folders exported before image to image have no VAE encoder: text to image only.
        encoder = self.pipeline.get("vae_encoder_graph")
        self.vae_encoder = None if encoder is None else session(encoder)
        # IP-Adapter exports: the CLIP vision encoder of the image prompt.
        encoder = self.pipeline.get("image_encoder_graph")
        self.image_encoder = None if encoder is None else session(encoder)
        self.engine.adapters.register(self._swap_text_weights)
        if loras is not None:
            try:
                self.engine.default_loras = self.engine.resolve_loras(loras)
            except BaseException:
                self.engine.close()
                raise

    def _swap_text_weights(self, overrides: dict[str, dict[str, np.ndarray]]) -> None:
        """``AdapterSwitch``'s hook: rebuild the text encoder sessions whose weights change (no call in flight)."""
        rebuilt = []
        for spec, tokenizer, session in self.text_encoders:
            kind = spec["graph"]
            if kind in overrides or kind in self._text_overridden:
                self._text_overridden.discard(kind)
                session = None  # the old session goes first
                session = self._session(kind, overrides.get(kind))
                if kind in overrides:
                    self._text_overridden.add(kind)
            rebuilt.append((spec, tokenizer, session))
        self._text_arrays = overrides  # the sessions' OrtValues wrap these arrays
        self.text_encoders = rebuilt

    def close(self) -> None:
        """Wait for running calls, then release the sessions and the engine; calls after this raise
        ``EngineClosedError``. Closing twice is fine."""
        self._calls.close()
        self.engine.close()
        self.text_encoders, self.vae, self.vae_encoder, self.image_encoder = [], None, None, None

    def __enter__(self) -> CairText2Image:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @property
    def max_prompt_chunks(self) -> int:
        """The most text-encoder windows a prompt may take here (the export's ``--max-prompt-chunks``)."""
        return self.engine.text_lengths[1] // self.text_encoders[0][1].max_length

    def prompt_chunks(self, texts: Sequence[str]) -> int:
        """Windows that hold every text of ``texts`` (all of a call's prompts and negative prompts share them)."""
        return max(tokenizer.chunks_needed(text) for _, tokenizer, _ in self.text_encoders for text in texts)

    def check_prompt_length(self, prompt: str) -> None:
        """Refuse (instead of truncating with a warning) a prompt longer than the folder's windows hold."""
        needed, most = self.prompt_chunks([prompt]), self.max_prompt_chunks
        if needed > most:
            window = self.text_encoders[0][1].window
            raise InvalidInputError(f"prompt has more than {most * window} tokens ({needed} windows of {window}); "
                                    f"this engine takes at most {most}: shorten it, or re-export with "
                                    "--max-prompt-chunks", field="prompt")

    def resolve_prompt_chunks(self, texts: Sequence[str], prompt_chunks: int | None) -> int:
        """The windows a call encodes its texts in: ``prompt_chunks`` if given (checked), else as many as
        its longest text needs, up to the folder's most (longer texts are truncated with a warning)."""
        most = self.max_prompt_chunks
        if prompt_chunks is None:
            return min(self.prompt_chunks(texts), most)
        if not is_integer(prompt_chunks) or not 1 <= prompt_chunks <= most:
            raise InvalidInputError(f"prompt chunks {prompt_chunks!r} must be an integer from 1 to {most} (this "
                                    "engine's --max-prompt-chunks; 1 truncates at one text-encoder window)",
                                    field="prompt_chunks")
        return prompt_chunks

    @property
    def model_name(self) -> str:
        return str(self.engine.manifest.model.get("name"))

    def encode_prompt(self, prompts: Sequence[str], chunks: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
        """Prompt embeddings (B, chunks * L, D) and, for SDXL, pooled text_embeds (B, P); as diffusers'
        encode_prompt for one window. With several, each window is encoded on its own and the
        embeddings concatenated along the text axis; SDXL's pooled embedding is the first window's."""
        embeds, pooled, _ = self.encode_text(prompts, chunks)
        return embeds, pooled

    def encode_text(self, prompts: Sequence[str], chunks: int = 1, negative: bool = False
                    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``encode_prompt``'s embeddings and pooled embedding, and for a T5 or Gemma encoder (PixArt, Sana) the
        tokens' mask (B, L) the transformer reads too, as ``PixArtSigmaPipeline.encode_prompt``; else None.
        ``negative``: negative prompts, which Sana encodes without its instruction."""
        max_batch = self.engine.manifest.dim("batch").max
        embeds, pooled, masks = [], None, None
        for spec, tokenizer, session in self.text_encoders:
            instructed = tokenizer.instruction is not None and not negative
            ids, mask = tokenizer.encode_instructed(prompts) if instructed else tokenizer.encode(prompts, chunks)
            feeds = [{"input_ids": ids[i:i + max_batch], **({"attention_mask": mask[i:i + max_batch]}
                                                            if tokenizer.masked else {})}
                     for i in range(0, len(ids), max_batch)]
            parts = [session.run(None, feed) for feed in feeds]
            names = ("last_hidden_state",) if tokenizer.masked else (
                "last_hidden_state", "penultimate_hidden_state", "pooled")
            outputs = {name: np.concatenate([p[index] for p in parts]) for index, name in enumerate(names)}
            if instructed:
                outputs, mask = {name: tokenizer.selected(value) for name, value in outputs.items()}, tokenizer.selected(mask)
            hidden = outputs[spec["prompt_output"]]
            embeds.append(hidden.reshape(len(prompts), chunks * hidden.shape[1], hidden.shape[2]))
            if spec["graph"] == self.pipeline.get("pooled_from"):
                pooled = outputs["pooled"][::chunks]  # each prompt's first window
            if tokenizer.masked:
                masks = mask.astype(np.float32)
        return np.concatenate(embeds, axis=-1), pooled, masks  # SDXL: (B, chunks * L, 768 + 1280)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Final latents -> images in [0, 1], (N, 3, H, W); as diffusers' VAE decode + postprocess."""
        scaled = latents / np.float32(self.pipeline["vae_scaling_factor"])
        max_batch = self.engine.manifest.dim("batch").max
        images = np.concatenate([self.vae.run(None, {"latent_sample": scaled[i:i + max_batch]})[0]
                                 for i in range(0, len(scaled), max_batch)])
        return np.clip(images / 2 + 0.5, 0.0, 1.0)

    def encode_image(self, image: np.ndarray, generators: Sequence[np.random.Generator]) -> np.ndarray:
        """An (H, W, 3) uint8 init image -> scaled latents (N, C, h, w), image k sampled with ``generators[k]``.

        As diffusers' img2img ``prepare_latents`` with one generator per image: ``preprocess``
        (x / 255 * 2 - 1), ``vae.encode``, ``retrieve_latents`` with its default
        ``sample_mode="sample"`` (``mean + std * noise``, the noise image k's generator's first draw),
        times ``scaling_factor``.
        """
        pixels = image.astype(np.float32) / np.float32(255.0)
        sample = (np.float32(2.0) * pixels - np.float32(1.0)).transpose(2, 0, 1)[np.newaxis]  # (1, 3, H, W)
        mean, std = self.vae_encoder.run(["latent_mean", "latent_std"], {"sample": np.ascontiguousarray(sample)})
        noise = standard_normal(list(generators), (len(generators), *mean.shape[1:]))
        return (mean + std * noise) * np.float32(self.pipeline["vae_scaling_factor"])

    def encode_image_prompt(self, image: np.ndarray) -> np.ndarray:
        """An (H, W, 3) uint8 image prompt -> its CLIP image embedding (1, D): the export's preprocessing
        (``clip_pixels``, as transformers' CLIPImageProcessor) and its ``image_encoder`` graph."""
        pixels = clip_pixels(image, self.pipeline["image_processor"])[np.newaxis]
        return self.image_encoder.run(["image_embeds"], {"pixel_values": pixels})[0]

    def _check_image_prompt(self, image: Any, scale: float) -> tuple[np.ndarray, float, dict[str, Any]] | None:
        """The image prompt read (any size: it is resized and cropped for the encoder), and what the
        parameters record; None without one (the scale then weighs nothing)."""
        if image is None:
            return None
        if self.image_encoder is None:
            raise InvalidInputError("this engine was exported without an IP-Adapter; re-export with --ip-adapter "
                                    "to use an image prompt", field="ip_adapter_image")
        if not is_finite_number(scale):
            raise InvalidInputError(f"IP-Adapter scale {scale!r} must be a finite number", field="ip_adapter_scale")
        try:
            pixels, name = load_image(image)
        except InvalidInputError as error:
            raise InvalidInputError(f"IP-Adapter {error}", field="ip_adapter_image") from None
        return pixels, float(scale), {"ip_adapter": {"image": name, "scale": float(scale)}}

    def _check_image(self, image: Any, height: int | None, width: int | None) -> tuple[np.ndarray, str]:
        """The init image read and checked against the engine (size, VAE factor), before any work."""
        if self.engine.manifest.transformer:
            raise InvalidInputError("image to image is for UNet folders; diffusers has no PixArt or Sana "
                                    "image-to-image pipeline to follow", field="image")
        if self.vae_encoder is None:
            raise ManifestError(f"{self.engine.folder} has no VAE encoder (exported before image to image); "
                                "re-export it with this cair-export for --image")
        pixels, name = load_image(image)
        engine, factor = self.engine, self.engine.vae_scale_factor
        image_height, image_width = pixels.shape[:2]
        problems = [size_problem(label, value, factor) for label, value in (("height", image_height),
                                                                          ("width", image_width))]
        for label, value, dim in (("height", image_height, "latent_height"), ("width", image_width, "latent_width")):
            limits = engine.manifest.dim(dim)
            if not limits.min * factor <= value <= limits.max * factor:
                problems.append(f"{label} {value} is outside the engine's "
                                f"{limits.min * factor}..{limits.max * factor} px")
        problems = [p for p in problems if p]
        if problems:
            raise InvalidInputError(f"image {name} is {image_width}x{image_height} px: {'; '.join(problems)}; "
                                    "resize it (the output has the image's size)", field="image")
        for label, asked, actual in (("height", height, image_height), ("width", width, image_width)):
            if asked is not None and asked != actual:
                raise InvalidInputError(f"{label} {asked} differs from the image's {actual} px; image to image keeps "
                                        f"the image's size: drop --{label} or resize the image", field=label)
        return pixels, name

    @_in_flight
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = 7.5,
        scheduler: str | None = None,
        seed: int | Sequence[int] = 0,
        latents: np.ndarray | None = None,
        callback: Callable[[int, int], None] | None = None,
        loras: Sequence[Any] | LoraSet | None = None,
        image: str | Path | np.ndarray | None = None,
        strength: float = 0.8,
        cache_observer: Callable[..., None] | None = None,
        prompt_chunks: int | None = None,
        control_image: Any = None,
        control_scale: float | Sequence[float] = 1.0,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        guess_mode: bool = False,
        ip_adapter_image: str | Path | np.ndarray | None = None,
        ip_adapter_scale: float = 1.0,
        schedule: Schedule | None = None,
        **schedule_fields: Any,
    ) -> Text2ImageResult:
        """Generate ``num_images_per_prompt`` images per prompt.

        Image k (prompt-major) draws its initial noise and any ancestral noise from its own
        ``np.random.default_rng(seed_k)``, with ``seed_k = seed + k`` or ``seed[k]`` for a list of
        one seed per image: each image is reproducible from its own seed, recorded in its
        parameters, whatever else is in the call. With ``latents`` the parameters say so instead
        of naming a seed (the seeds then drive only ancestral noise). ``loras``: adapters
        ``[(path.safetensors, scale), ...]`` for this call (None: the pipeline's default; ``[]``: none).
        The schedule, as for ``CairEngine.denoise``: a ``Schedule``, or its fields as keywords
        (``cache_step``, ``guidance_stop``, ``deep_interval``, ``skip_mode``), unset ones from the
        folder's calibrated schedule, else its defaults. Each image's parameters record the schedule
        that ran, resolved, so that running them again gives the same image.

        Image to image: ``image`` (a file path, or an (H, W, 3) uint8 RGB array; grayscale is
        converted, other modes refused) is the init image of every image of the call, and sets
        their size; ``strength`` in (0, 1] runs the last ``min(int(T * strength), T)`` of
        ``num_inference_steps`` (n, m and k count those). Image k's generator draws the VAE's latent
        sample, then the noise added to it, then any ancestral noise, as diffusers' img2img
        pipelines with one generator per image; ``latents``, if given, is the added noise.
        ``cache_observer``: as for ``CairEngine.denoise`` (measuring tools).

        Long prompts: every prompt and negative prompt of the call is encoded in ``prompt_chunks``
        text-encoder windows (75 tokens each for CLIP; see ``_Tokenizer``); None: as many as the call's longest
        text needs, up to the folder's ``max_prompt_chunks`` (longer texts are truncated with a
        ``PromptTruncatedWarning``); 1: diffusers' truncation. The parameters record the count used.

        ControlNet (an engine exported with ``--controlnet``): ``control_image``, one per net (a file
        path or an (H, W, 3) uint8 RGB array, or a list of them; grayscale is converted), the
        preprocessed control map at the output size (canny edges, depth and the like are the
        caller's; it is not resized), read as pixels / 255 for every image of the call;
        ``control_scale``, ``control_guidance_start/end`` and ``guess_mode`` as diffusers'
        ControlNet pipelines take them (one value, or one per net).

        IP-Adapter (an engine exported with ``--ip-adapter``): ``ip_adapter_image`` (a file path or an
        (H, W, 3) uint8 RGB array of any size; grayscale is converted) is the image prompt of every
        image of the call, encoded once by the folder's CLIP vision encoder; ``ip_adapter_scale``
        weighs it (diffusers' ``set_ip_adapter_scale``). Without it the engine runs as the plain model.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InvalidInputError("no prompt given; pass at least one (an empty string is allowed)")
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = None if negative_prompt is None else [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise InvalidInputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one each")
        bad = [p for p in prompts + (negatives or []) if not isinstance(p, str)]
        if bad:
            raise InvalidInputError(f"prompts must be strings, got {bad[0]!r}")
        if not is_integer(num_images_per_prompt) or num_images_per_prompt < 1:
            raise InvalidInputError(f"images per prompt {num_images_per_prompt!r} must be a positive integer")
        count = len(prompts) * num_images_per_prompt
        check_image_count(count)
        seeds = image_seeds(seed, count)
        engine = self.engine
        chunks = self.resolve_prompt_chunks(prompts + (negatives or []), prompt_chunks)
        # The schedule first: a bad one (or a bad strength) fails before the image is read.
        schedule = engine.resolve_schedule(schedule_request(
            schedule, num_inference_steps, None if image is None else strength, schedule_fields))
        if (schedule.strength is not None) != (image is not None):
            raise InvalidInputError("a schedule with a strength is for image to image (an init image), and image to "
                                    "image needs one", field="strength")
        pixels = image_name = None
        if image is not None:
            pixels, image_name = self._check_image(image, height, width)
            height, width = pixels.shape[:2]
        check_guidance_scale(guidance_scale)
        sampler = engine.make_scheduler(scheduler, schedule)
        latent_height, latent_width = engine.latent_size(height, width)
        engine.check_dims({"latent_height": latent_height, "latent_width": latent_width})
        control = self._check_control(control_image, control_scale, control_guidance_start, control_guidance_end,
                                      guess_mode, latent_height, latent_width)
        image_prompt = self._check_image_prompt(ip_adapter_image, ip_adapter_scale)
        lora_set = engine.resolve_loras(loras)
        with engine.adapters.using(lora_set):  # text encoders and UNet on the same adapters for the whole call
            return self._generate(prompts, negatives, num_images_per_prompt, seeds, schedule, sampler, height, width,
                                  guidance_scale, scheduler, latents, callback, lora_set, pixels, image_name,
                                  cache_observer, chunks, control, image_prompt)

    def _check_control(self, images: Any, scale, start, end, guess_mode: bool, latent_height: int,
                       latent_width: int) -> tuple[list[np.ndarray], Any, dict[str, Any]] | None:
        """The control images read and checked (one per fused ControlNet, at the output size), the
        request, and what the parameters record; None for an engine without ControlNets."""
        from cair_runtime.control import ControlRequest

        given = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        self.engine.check_control_count(len(given))  # before any file is read
        if not given:
            return None
        request = ControlRequest.make(len(given), scale, start, end, guess_mode)
        factor = self.engine.vae_scale_factor
        size = (latent_height * factor, latent_width * factor)
        arrays, names = [], []
        for image in given:
            pixels, name = load_image(image)
            if pixels.shape[:2] != size:
                raise InvalidInputError(f"control image {name} is {pixels.shape[1]}x{pixels.shape[0]} px; the output "
                                        f"is {size[1]}x{size[0]}: give the control map at the output size (it is not "
                                        "resized)", field="control_image")
            arrays.append((pixels.astype(np.float32) / 255).transpose(2, 0, 1)[None])
            names.append(name)
        recorded = {"control": {"images": names, "scale": list(request.scales), "start": list(request.starts),
                                "end": list(request.ends), "guess_mode": request.guess_mode}}
        return arrays, request, recorded

    def _generate(self, prompts, negatives, num_images_per_prompt, seeds, schedule, sampler, height, width,
                  guidance_scale, scheduler, latents, callback, lora_set, pixels, image_name,
                  cache_observer=None, chunks=1, control=None, image_prompt=None) -> Text2ImageResult:
        engine = self.engine
        count = len(prompts) * num_images_per_prompt
        started = time.perf_counter()
        prompt_embeds, pooled, mask = self.encode_text(prompts, chunks)
        negative_mask = None
        if negatives is None and self.pipeline.get("force_zeros_for_empty_prompt"):
            negative_embeds = np.zeros_like(prompt_embeds)
            negative_pooled = None if pooled is None else np.zeros_like(pooled)
        else:
            negative_embeds, negative_pooled, negative_mask = self.encode_text(negatives or [""] * len(prompts), chunks,
                                                                               negative=True)
        text_s = time.perf_counter() - started

        def per_image(array: np.ndarray | None) -> np.ndarray | None:  # prompt-major, as diffusers repeats
            return None if array is None else np.repeat(array, num_images_per_prompt, axis=0)

        generators = image_generators(seeds)
        image_latents, image_s, ip_embeds = None, 0.0, None
        if pixels is not None:
            started = time.perf_counter()
            image_latents = self.encode_image(pixels, generators)
            image_s = time.perf_counter() - started
        if image_prompt is not None:  # one embedding for every image of the call
            started = time.perf_counter()
            ip_embeds = np.repeat(self.encode_image_prompt(image_prompt[0]), count, axis=0)
            image_s += time.perf_counter() - started
        result = engine.denoise_resolved(
            per_image(prompt_embeds), per_image(negative_embeds), schedule, sampler, guidance_scale,
            latents=latents, height=height, width=width, generators=generators, text_embeds=per_image(pooled),
            negative_text_embeds=per_image(negative_pooled), callback=callback, lora_set=lora_set,
            image_latents=image_latents, cache_observer=cache_observer,
            control_images=None if control is None else [np.repeat(a, count, axis=0) for a in control[0]],
            control=None if control is None else control[1], ip_image_embeds=ip_embeds,
            ip_adapter_scale=1.0 if image_prompt is None else image_prompt[1], attention_mask=per_image(mask),
            negative_attention_mask=per_image(negative_mask))

        started = time.perf_counter()
        decoded = self.decode(result.latents)
        check_finite_result(decoded, "decoded images")
        vae_s = time.perf_counter() - started
        images = (decoded.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
        parameters = [{
            "prompt": prompts[k // num_images_per_prompt],
            "negative_prompt": None if negatives is None else negatives[k // num_images_per_prompt],
            "prompt_chunks": chunks,
            **({"seed": seeds[k]} if latents is None else {"seed": None, "latents": "supplied by the caller"}),
            **schedule.parameters(),  # resolved: running these parameters again gives this image
            "guidance_scale": guidance_scale, "scheduler": scheduler or engine.manifest.scheduler_config.get("_class_name"),
            "model": self.model_name, "height": images.shape[1], "width": images.shape[2],
            **({"precision": engine.backend.precision} if hasattr(engine.backend, "precision") else {}),
            **({"loras": [{"file": a["file"], "scale": a["scale"]} for a in lora_set.adapters]} if lora_set.adapters else {}),
            **({} if pixels is None else {"image": image_name}),
            **({} if control is None else control[2]),
            **({} if image_prompt is None else image_prompt[2]),
        } for k in range(count)]
        return Text2ImageResult(images, decoded.astype(np.float32), result.latents, result.timings, text_s, vae_s,
                                parameters, image_s)
