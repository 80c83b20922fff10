"""The HTTP API's shapes: an OpenAI Images request checked field by field, the responses, the errors.

``POST /v1/images/generations`` takes the OpenAI Images API's body (``prompt``, ``n``, ``size``,
``response_format``, ``model``) plus this project's parameters (``negative_prompt``, ``steps``,
``cache_step``, ``guidance_stop``, ``deep_interval``, ``planning_interval``, ``skip_mode``, ``guidance_scale``, ``seed``,
``scheduler``; the schedule's fields left out or null take the engine's calibrated schedule), for an engine
with ControlNets their control images (base64 PNG or JPEG files) and settings, and for an engine with an
IP-Adapter an image prompt and its scale. Nothing is coerced: a wrong type, an unknown field or a value the
engine cannot take is a 400 whose ``error.param`` names the field.
No web framework here (plain data in, plain data out), so it is tested without a server.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import re
import secrets
import time
from dataclasses import dataclass, field as dataclass_field
from typing import Any, Sequence

import numpy as np

from cair_runtime.checks import check_guidance_scale, is_finite_number, is_integer
from cair_runtime.control import ControlRequest
from cair_runtime.errors import CairError, InvalidInputError
from cair_runtime.images import load_image
from cair_runtime.schedulers import SCHEDULER_NAMES
from cair_runtime.noise import image_seeds
from cair_runtime.schedule import SKIP_MODES, Schedule

MAX_BODY_BYTES = 64 * 1024  # a request is a prompt and a few numbers; anything larger is refused unread
MAX_IMAGE_FILE_BYTES = 16 * 2**20  # base64 of one image file (control map, image prompt), whatever the engine's size
CONTROL_FIELDS = ("control_image", "control_scale", "control_guidance_start", "control_guidance_end", "guess_mode")
IP_ADAPTER_FIELDS = ("ip_adapter_image", "ip_adapter_scale")
_IMAGE_FORMATS = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG: the only decoders a request reaches
MAX_SEED = 2**63 - 1  # seeds stay within a signed 64-bit integer, whatever language the client speaks
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
MAX_JSON_NESTING = 32  # a request is one object of strings, numbers and short lists


class ApiError(Exception):
    """A request the API refuses or cannot finish: an HTTP status and an OpenAI-shaped JSON error body.

    ``kind`` is the body's ``type`` and ``code`` its ``code`` (a stable word a client can branch on,
    e.g. ``overloaded``, ``draining``); ``retry_after_s`` adds a ``Retry-After`` header (every 503 has one).
    """

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 problems: Sequence[tuple[str | None, str]] = (), headers: dict[str, str] | None = None,
                 code: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.problems = list(problems) or [(param, message)]
        self.headers = dict(headers or {})
        if retry_after_s is not None:
            self.headers["Retry-After"] = f"{max(1, math.ceil(retry_after_s))}"  # whole seconds (RFC 9110)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code,
                          "problems": [{"param": param, "message": message} for param, message in self.problems]}}


@dataclass(frozen=True)
class ImageRequest:
    """A checked generation request; image k of it uses seed ``seed + k`` (``image_seeds``)."""

    prompt: str
    negative_prompt: str | None
    n: int
    height: int
    width: int
    schedule: Schedule  # resolved against the engine: the request's fields, the rest the folder's defaults
    guidance_scale: float
    scheduler: str | None  # None: the model's own
    seed: int
    prompt_chunks: int = 1  # text-encoder windows the prompt and negative prompt are encoded in
    # ControlNet engines: one (H, W, 3) uint8 RGB control map per net, compared through their digests
    control_images: tuple = dataclass_field(default=(), compare=False, repr=False)
    control_digests: tuple[str, ...] = ()  # sha256 of each control image's file, as the client sent it
    control: ControlRequest | None = None  # scales, starts, ends, guess mode; None: an engine without ControlNets
    # IP-Adapter engines: the image prompt as (H, W, 3) uint8 RGB (any size), compared through its digest
    ip_adapter_image: np.ndarray | None = dataclass_field(default=None, compare=False, repr=False)
    ip_adapter_digest: str | None = None  # sha256 of the image prompt's file; None: no image prompt
    ip_adapter_scale: float = 1.0

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one engine batch (everything but prompt, negative and seed)."""
        return (self.height, self.width, self.schedule, self.guidance_scale, self.scheduler,
                self.negative_prompt is None,  # SDXL: no negative prompt (zeros) differs from ""
                self.prompt_chunks,  # a prompt's windows are its own, whatever shares its batch
                # A call takes one set of control images and one image prompt for all its images.
                self.control_digests, self.control, self.ip_adapter_digest, self.ip_adapter_scale)

    def conditioning_arguments(self) -> dict[str, Any]:
        """The pipeline call's keywords for the control images and the image prompt (none for a plain request)."""
        arguments: dict[str, Any] = {}
        if self.control is not None:
            arguments.update(control_image=list(self.control_images), control_scale=self.control.scales,
                             control_guidance_start=self.control.starts, control_guidance_end=self.control.ends,
                             guess_mode=self.control.guess_mode)
        if self.ip_adapter_digest is not None:
            arguments.update(ip_adapter_image=self.ip_adapter_image, ip_adapter_scale=self.ip_adapter_scale)
        return arguments

    def conditioning_parameters(self) -> dict[str, Any]:
        """What the response and the PNGs record of the control and the image prompt: the settings, the images
        by their files' digests."""
        recorded: dict[str, Any] = {}
        if self.control is not None:
            recorded["control"] = {"images": [f"sha256:{digest}" for digest in self.control_digests],
                                   "scale": list(self.control.scales), "start": list(self.control.starts),
                                   "end": list(self.control.ends), "guess_mode": self.control.guess_mode}
        if self.ip_adapter_digest is not None:
            recorded["ip_adapter"] = {"image": f"sha256:{self.ip_adapter_digest}", "scale": self.ip_adapter_scale}
        return recorded

    @property
    def seeds(self) -> list[int]:
        return image_seeds(self.seed, self.n)

    def parameters(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "n": self.n,
                "size": f"{self.width}x{self.height}", **self.schedule.parameters(),
                "guidance_scale": self.guidance_scale, "scheduler": self.scheduler, "seed": self.seed,
                "prompt_chunks": self.prompt_chunks, **self.conditioning_parameters()}


def _shown(value: Any) -> str:
    """A value as an error echoes it: its repr, shortened (a JSON number may have 4300 digits, a prompt 64 KiB)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _nesting(value: Any) -> int:
    """How deep lists and objects nest in a parsed JSON value (iteratively: no recursion to overflow)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
    return deepest


def _image_file_bytes(height: int, width: int) -> int:
    """Room for one image file of this size: the base64 of an uncompressed RGB PNG, within the cap."""
    png = height * (3 * width + 1) + 64 * 1024  # a filter byte per row; chunk and zlib block headers
    return min(4 * -(-png // 3), MAX_IMAGE_FILE_BYTES)


def _read_image_file(text: str, name: str, param: str, size: tuple[int, int] | None = None) -> tuple[np.ndarray, str]:
    """A request's base64 PNG or JPEG file as (H, W, 3) uint8 RGB, read as the Python API reads a file (``size``:
    the (height, width) it must have, checked before decoding), and the file's sha256."""
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError as error:  # binascii.Error, or a character outside ASCII
        raise InvalidInputError(f"{name} is not valid base64 ({error}); send the file's bytes base64-encoded, "
                                "on one line", field=param) from None
    if not data.startswith(_IMAGE_FORMATS):
        raise InvalidInputError(f"{name} is not a PNG or JPEG file (it starts {data[:8]!r}); send the image as one",
                                field=param)
    file = io.BytesIO(data)
    file.name = name  # image errors name their file: here the field
    try:
        pixels, _ = load_image(file, size)
    except InvalidInputError as error:
        raise InvalidInputError(str(error), field=param) from None
    return pixels, hashlib.sha256(data).hexdigest()


class RequestValidator:
    """Checks request bodies against one engine (a ``CairText2Image``) and the service's limits."""

    FIELDS = ("prompt", "n", "size", "response_format", "model", "negative_prompt", "steps", "cache_step",
              "guidance_stop", "deep_interval", "planning_interval", "skip_mode", "guidance_scale", "seed", "scheduler",
              "prompt_chunks", *CONTROL_FIELDS, *IP_ADAPTER_FIELDS)

    def __init__(self, pipeline: Any, max_images: int, max_steps: int):
        self.pipeline, self.engine = pipeline, pipeline.engine
        self.max_images, self.max_steps = max_images, max_steps
        self.model = pipeline.model_name
        factor = self.engine.vae_scale_factor
        height, width = (self.engine.manifest.dim(name) for name in ("latent_height", "latent_width"))
        self.default_size = (height.opt * factor, width.opt * factor)
        self.size_range = ((height.min * factor, height.max * factor), (width.min * factor, width.max * factor))
        # A plain request is a prompt and a few numbers; room for one image at the max size per ControlNet, and
        # one for an IP-Adapter's image prompt (any size, but a photo at the output's size compresses well).
        files = self.engine.controlnets + self.engine.ip_adapter
        self.max_body_bytes = MAX_BODY_BYTES + files * _image_file_bytes(height.max * factor, width.max * factor)

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/models`` says about the engine, beside the OpenAI model fields."""
        manifest = self.engine.manifest
        (min_h, max_h), (min_w, max_w) = self.size_range
        default_h, default_w = self.default_size
        return {
            "sizes": {"default": f"{default_w}x{default_h}", "min": f"{min_w}x{min_h}", "max": f"{max_w}x{max_h}",
                      "multiple_of": self.engine.vae_scale_factor},
            "max_batch": manifest.dim("batch").max, "max_images": self.max_images, "max_steps": self.max_steps,
            "controlnets": self.engine.controlnets, "ip_adapter": self.engine.ip_adapter,
            "max_body_bytes": self.max_body_bytes,
            "cache_step_hint": manifest.model.get("cache_step_hint"),
            # Long prompts: windows of 75 tokens (cair_runtime.text2image._Tokenizer), at most this many.
            "max_prompt_chunks": self.pipeline.max_prompt_chunks,
            "max_prompt_tokens": self.pipeline.max_prompt_chunks * self.pipeline.text_encoders[0][1].window,
            "schedulers": list(SCHEDULER_NAMES), "default_scheduler": manifest.scheduler_config.get("_class_name"),
            "family": manifest.model.get("family"), "fidelity_guidance": manifest.fidelity_guidance,
            # The calibrated schedule requests run with (cair-export calibrate), without its evidence; None: n = the hint.
            "schedule": None if manifest.schedule is None else
            {key: value for key, value in manifest.schedule.items() if key != "evidence"},
        }

    def warm_up_body(self, steps: int) -> bytes:
        """A request at the default size (a replica's warm-up); on a ControlNet engine with blank control maps
        (an IP-Adapter engine needs no image prompt: without one it runs as the plain model)."""
        body: dict[str, Any] = {"prompt": "a warm-up prompt", "steps": steps, "seed": 0}
        if self.engine.controlnets:
            from cair_runtime.text2image import png_bytes

            blank = png_bytes(np.zeros((*self.default_size, 3), np.uint8), {})
            body["control_image"] = [base64.b64encode(blank).decode("ascii")] * self.engine.controlnets
        return json.dumps(body).encode()

    def parse(self, body: bytes) -> ImageRequest:
        """A request body -> ``ImageRequest``; an ``ApiError`` (400) naming every bad field otherwise."""
        if len(body) > self.max_body_bytes:
            raise ApiError(413, f"the body has {len(body)} bytes; requests are limited to {self.max_body_bytes}")
        try:
            payload = json.loads(body)
            # Python 3.12+ parses nesting that overflowed its predecessors' stack: refused alike on every version
            unread = "nested too deeply" if _nesting(payload) > MAX_JSON_NESTING else None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ApiError(400, f"the body is not valid JSON ({error}); send a JSON object") from None
        except (ValueError, RecursionError) as error:  # a number of over 4300 digits; nesting past the stack
            unread = "nested too deeply" if isinstance(error, RecursionError) else str(error).split(";")[0]
        if unread:
            raise ApiError(400, f"the body is JSON this server does not read ({unread}); send a flat JSON "
                                "object of strings and numbers")
        if not isinstance(payload, dict):
            raise ApiError(400, f"the body is a JSON {type(payload).__name__}; send a JSON object with a prompt")
        problems: list[tuple[str | None, str]] = []
        nets = self.engine.controlnets
        for name in payload:
            if name not in self.FIELDS:
                problems.append((name, f"unknown field {name!r}; known fields: {', '.join(self.FIELDS)}"))
            elif name in CONTROL_FIELDS and not nets:
                problems.append((name, f"{name}: the model {self.model!r} was exported without a ControlNet and "
                                       "takes no control images; drop the control fields, or serve an export with "
                                       "--controlnet"))
            elif name in IP_ADAPTER_FIELDS and not self.engine.ip_adapter:
                problems.append((name, f"{name}: the model {self.model!r} was exported without an IP-Adapter and "
                                       "takes no image prompt; drop the ip_adapter fields, or serve an export with "
                                       "--ip-adapter"))

        def field(name: str, check, default: Any, required: bool = False, echo: bool = True) -> Any:
            if name not in payload:
                if required:
                    problems.append((name, f"{name} is required"))
                return default
            message = check(payload[name])
            if message:
                problems.append((name, f"{name} {_shown(payload[name])}: {message}" if echo else f"{name}: {message}"))
                return default
            return payload[name]

        most = self.pipeline.max_prompt_chunks
        prompt_chunks = field("prompt_chunks", lambda v: None if v is None or (is_integer(v) and 1 <= v <= most) else
                              f"must be an integer from 1 to {most} (text-encoder windows; 1 truncates at one), or null "
                              "for as many as the prompt needs", None)
        # Without prompt_chunks a prompt longer than the engine's windows is refused, not truncated.
        check_length = prompt_chunks is None
        prompt = field("prompt", lambda v: self._check_prompt(v, check_length), None, required=True)
        negative = field("negative_prompt", lambda v: None if v is None else self._check_prompt(v, check_length), None)
        n = field("n", lambda v: None if is_integer(v) and 1 <= v <= self.max_images
                  else f"must be an integer from 1 to {self.max_images}", 1)
        size = field("size", self._check_size, None)
        field("response_format", lambda v: None if v == "b64_json" else
              "only 'b64_json' is served: the images come back in the response; this server stores no "
              "files, so there is no 'url' to give", "b64_json")
        field("model", lambda v: None if v is None or v == self.model
              else f"this server serves the model {self.model!r}", None)
        steps = field("steps", lambda v: None if is_integer(v) and 1 <= v <= self.max_steps
                      else f"must be an integer from 1 to {self.max_steps}", 25)
        cache_step = field("cache_step", lambda v: None if v is None or is_integer(v) else
                           "must be an integer (1..steps; steps = no CAIR) or null for the engine's hint", None)
        guidance_stop = field("guidance_stop", lambda v: None if v is None or is_integer(v) else
                              "must be an integer (cache_step..steps) or null for the engine's default", None)
        deep_interval = field("deep_interval", lambda v: None if v is None or is_integer(v) else
                              "must be an integer >= 1 or null for the engine's default", None)
        planning_interval = field("planning_interval", lambda v: None if v is None or is_integer(v) else
                                  "must be an integer >= 1 or null for the engine's default", None)
        skip_mode = field("skip_mode", lambda v: None if v is None or v in SKIP_MODES else
                          f"must be one of {', '.join(SKIP_MODES)} or null for the engine's default", None)
        guidance = field("guidance_scale", lambda v: None if is_finite_number(v) else "must be a finite number", 7.5)
        seed = field("seed", lambda v: None if v is None or (is_integer(v) and 0 <= v <= MAX_SEED - self.max_images)
                     else f"must be an integer from 0 to {MAX_SEED - self.max_images}, or null for a random one", None)
        scheduler = field("scheduler", lambda v: None if v is None or v in SCHEDULER_NAMES
                          else f"must be one of {', '.join(SCHEDULER_NAMES)} (or null for the model's own)", None)
        if nets:  # the types here; the values below, as the Python API checks them
            per_net = (lambda v: None if is_finite_number(v) or (isinstance(v, list) and all(map(is_finite_number, v)))
                       else f"must be a finite number, or a list of one per ControlNet ({nets} here)")
            control_image = field("control_image", lambda v: None if isinstance(v, str) or (
                isinstance(v, list) and all(isinstance(item, str) for item in v)) else
                f"must be the base64 of a PNG or JPEG file, or a list of one per ControlNet ({nets} here)",
                None, echo=False)  # megabytes of base64 are not echoed
            control_scale = field("control_scale", per_net, 1.0)
            control_start = field("control_guidance_start", per_net, 0.0)
            control_end = field("control_guidance_end", per_net, 1.0)
            guess_mode = field("guess_mode", lambda v: None if isinstance(v, bool) else "must be true or false", False)
        ip_image, ip_scale = None, 1.0
        if self.engine.ip_adapter:
            ip_image = field("ip_adapter_image", lambda v: None if v is None or isinstance(v, str) else
                             "must be the base64 of a PNG or JPEG file (any size), or null for none", None, echo=False)
            ip_scale = field("ip_adapter_scale", lambda v: None if is_finite_number(v) else "must be a finite number",
                             1.0)
            if "ip_adapter_scale" in payload and payload.get("ip_adapter_image") is None:
                problems.append(("ip_adapter_scale", "ip_adapter_scale weighs an image prompt; give ip_adapter_image "
                                                     "too"))
        if size is None:
            height, width = self.default_size
        else:
            match = _SIZE.fullmatch(size)
            width, height = int(match[1]), int(match[2])
        bad = {param for param, _ in problems}
        control_images, control_digests, control = (), (), None
        if nets and not bad & {"size", *CONTROL_FIELDS}:
            try:
                control_images, control_digests = self._read_control_images(control_image, (height, width))
                _, control, _ = self.pipeline._check_control(  # the Python API's checks: count, size, settings
                    list(control_images), control_scale, control_start, control_end, guess_mode,
                    *self.engine.latent_size(height, width))
            except CairError as error:
                param = getattr(error, "field", None) or "control_image"
                problems.append((param, f"{param}: {error}"))
        ip_pixels = ip_digest = None
        if ip_image is not None and "ip_adapter_image" not in bad:
            try:
                ip_pixels, ip_digest = _read_image_file(ip_image, "ip_adapter_image", "ip_adapter_image")
            except CairError as error:
                problems.append(("ip_adapter_image", f"ip_adapter_image: {error}"))
        schedule = None
        if not problems:  # the engine's own checks, on values of the right types
            try:
                schedule = self.engine.resolve_schedule({"steps": steps, "cache_step": cache_step,
                                                         "guidance_stop": guidance_stop,
                                                         "deep_interval": deep_interval, "skip_mode": skip_mode,
                                                         "planning_interval": planning_interval})
                check_guidance_scale(guidance)
                self.engine.make_scheduler(scheduler, schedule)
                prompt_chunks = self.pipeline.resolve_prompt_chunks([prompt] + ([negative] if negative else []),
                                                                     prompt_chunks)
            except CairError as error:
                param = getattr(error, "field", None) or "scheduler"
                problems.append((param, f"{param}: {error}"))
        if problems:
            message = "; ".join(message for _, message in problems)
            raise ApiError(400, message, param=problems[0][0], problems=problems)
        return ImageRequest(prompt=prompt, negative_prompt=negative, n=n, height=height, width=width,
                            schedule=schedule, guidance_scale=float(guidance), scheduler=scheduler,
                            seed=secrets.randbelow(2**31) if seed is None else seed, prompt_chunks=prompt_chunks,
                            control_images=control_images, control_digests=control_digests, control=control,
                            ip_adapter_image=ip_pixels, ip_adapter_digest=ip_digest,
                            ip_adapter_scale=float(ip_scale))

    def _read_control_images(self, value: str | list[str] | None,
                             size: tuple[int, int]) -> tuple[tuple, tuple[str, ...]]:
        """The control images as (H, W, 3) uint8 RGB at the output ``size`` (height, width), and their files' sha256."""
        files = [] if value is None else [value] if isinstance(value, str) else value
        self.engine.check_control_count(len(files))  # before anything is decoded
        read = [_read_image_file(text, "control_image" if isinstance(value, str) else f"control_image[{j}]",
                                 "control_image", size) for j, text in enumerate(files)]
        return tuple(image for image, _ in read), tuple(digest for _, digest in read)

    def _check_prompt(self, value: Any, check_length: bool = True) -> str | None:
        if not isinstance(value, str):
            return "must be a string"
        if not check_length:  # the request chose its windows: truncation was asked for
            return None
        try:
            self.pipeline.check_prompt_length(value)  # the pipeline would truncate with a warning; an API refuses
        except CairError as error:
            return str(error).removeprefix("prompt ")
        return None

    def _check_size(self, value: Any) -> str | None:
        match = _SIZE.fullmatch(value) if isinstance(value, str) else None
        (min_h, max_h), (min_w, max_w) = self.size_range
        allowed = (f"this engine serves WIDTHxHEIGHT with width {min_w}..{max_w} and height {min_h}..{max_h} px, "
                   f"multiples of {self.engine.vae_scale_factor}")
        if match is None:
            return f"must be a string 'WIDTHxHEIGHT'; {allowed}"
        width, height = int(match[1]), int(match[2])
        try:
            latent_height, latent_width = self.engine.latent_size(height, width)
            self.engine.check_dims({"latent_height": latent_height, "latent_width": latent_width})
        except CairError:
            return allowed
        return None


def generation_response(request: ImageRequest, model: str, pngs: Sequence[bytes]) -> dict[str, Any]:
    """The OpenAI Images response: ``created`` and one ``b64_json`` per image, with the seed each used."""
    return {
        "created": int(time.time()),
        "model": model,
        "data": [{"b64_json": base64.b64encode(png).decode("ascii"), "seed": seed, "revised_prompt": None}
                 for png, seed in zip(pngs, request.seeds, strict=True)],
        "parameters": request.parameters(),
    }


def models_response(model: str, description: dict[str, Any], created: int) -> dict[str, Any]:
    """``GET /v1/models``: the OpenAI list of one model, with what the engine takes under ``cair``."""
    return {"object": "list",
            "data": [{"id": model, "object": "model", "created": created, "owned_by": "cair-serve",
                      "cair": description}]}
