"""The Ray Serve application: one ``CairText2Image`` per replica behind the OpenAI-shaped HTTP API.

A replica holds one engine and serves many requests. Requests wait (at most ``batch_wait_ms``)
in one ``serve.batch`` queue; each batch is grouped by ``ImageRequest.batch_key`` (same size,
steps, cache step, guidance, scheduler, control images, image prompt) and run as engine batches of
at most ``max_batch_size`` images, in a worker thread so the event loop keeps taking requests. Every
image draws its noise from its own seed, so an image never depends on what else shared its batch.

Requests wait in the replica, not at Serve's proxy: Serve's router polls a full replica with a
backoff of up to 0.5 s, and the replica would idle between its batches. So Serve's per-replica limit
is set above the replica's own, and the replica bounds its queue itself (``max_held_images``,
derived from its speed measured at start), answering a JSON 503 with ``Retry-After`` past it.
``/health`` and ``/ready`` are answered by the event loop, never behind the images.

    serve run cair_runtime.serve.app:build_app engine_dir=engines/shapes
"""

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.config import AutoscalingConfig
from starlette.exceptions import HTTPException

from cair_runtime.serve.api import ApiError, ImageRequest, RequestValidator, generation_response, models_response
from cair_runtime.serve.config import MAX_DERIVED_IMAGES, ScalingConfig, ServiceConfig, parse_config, serve_slots
from cair_runtime.serve.drain import watch_drain

logger = logging.getLogger("ray.serve")
http = FastAPI(title="cair-serve", description="CAIR text-to-image, OpenAI Images API shape")


@http.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own answers (unknown path, wrong method) in the OpenAI error shape too."""
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    body = ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}", kind=kind).body()
    return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))


@http.exception_handler(Exception)
async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    """A bug: logged with its traceback, answered as an OpenAI-shaped 500 rather than plain text."""
    logger.exception("cair-serve: %s %s failed", request.method, request.url.path)
    body = ApiError(500, f"the server failed: {type(error).__name__}: {error}", kind="server_error",
                    code="internal_error").body()
    return JSONResponse(body, status_code=500)


class _Abandoned(Exception):
    """Every request an engine batch was for has timed out or gone away: stop spending work on it."""


@dataclass
class _Ticket:
    """One request in the batch queue; ``abandoned`` is set (from the event loop) when nobody waits for it."""

    request: ImageRequest
    abandoned: threading.Event = field(default_factory=threading.Event)


@serve.deployment(name="CairText2Image", max_constructor_retry_count=3)
@serve.ingress(http)
class CairImageService:
    """A replica: one engine, the request checks, the batch queue.

    (No ``from __future__ import annotations`` in this module: FastAPI reads the route methods'
    annotations as objects, after Serve has rewritten their signatures.)
    """

    def __init__(self, config: ServiceConfig, scaling: ScalingConfig = ScalingConfig()):
        from cair_runtime.text2image import CairText2Image

        options: dict[str, Any] = {}
        if config.backend == "onnxruntime":
            options = {"providers": config.providers, "threads": config.threads,
                       "graph_optimization": config.graph_optimization, "share_weights": config.share_weights}
        elif config.backend == "openvino":
            options = {"threads": config.threads, "precision": config.precision or "auto"}
        self.config, self.scaling = config, scaling
        self.pipeline = CairText2Image(config.engine_dir, config.backend, max_concurrency=config.max_concurrency,
                                       **options)
        self.model = self.pipeline.model_name
        self.created = int(time.time())
        engine_max = self.pipeline.engine.manifest.dim("batch").max
        self.max_batch_size = config.max_batch_size or engine_max
        if self.max_batch_size > engine_max:
            raise ValueError(f"max_batch_size {self.max_batch_size} is above the engine's max batch {engine_max}")
        self.served = {"requests": 0, "images": 0, "engine_batches": 0}  # /health reports this replica's counts
        self.validator = RequestValidator(self.pipeline, max_images=config.max_images or engine_max,
                                          max_steps=config.max_steps)
        # As many batches at once as the engine has contexts (max_concurrency, default 1): on a GPU a
        # second context overlaps one batch's host work (text encoder, scheduler, PNG) with another's
        # UNet; on a CPU the cores are already busy. Requests wait here while the batches run.
        self._batched = serve.batch(max_batch_size=self.max_batch_size,
                                    batch_wait_timeout_s=config.batch_wait_ms / 1000,
                                    max_concurrent_batches=config.max_concurrency,
                                    batch_size_fn=self._batch_images)(self._run_batch)
        # Admission: the images this replica holds (queued for a batch or running). Requests wait here,
        # where a finished batch is followed by the next at once; past the limit they get a 503 at once.
        self.held_images = 0
        self.reading_bodies = 0  # requests whose body is still arriving (each holds a Serve slot)
        self.images_per_s = self._measure_speed()
        self.max_held_images = scaling.max_ongoing_images or self._derived_limit()
        self.draining = False
        self.last_arrival = time.monotonic()
        replica = serve.get_replica_context().replica_id.unique_id
        self.drain_watched = watch_drain(replica, lambda: (self.held_images, time.monotonic() - self.last_arrival),
                                         self._start_draining)
        logger.info("cair-serve: replica %s holds at most %d images (%.1f images/s measured at start)",
                    replica, self.max_held_images, self.images_per_s)

    @http.post("/v1/images/generations")
    async def generate(self, request: Request) -> JSONResponse:
        self.last_arrival = time.monotonic()
        try:
            body = await self._read_body(request)
            if self.draining:
                raise ApiError(503, "the server is shutting down and takes no new requests; retry (another replica "
                               "or the restarted server will answer)", kind="server_error", code="draining",
                               retry_after_s=self.scaling.retry_after_s)
            image_request = self.validator.parse(body)
            self._admit(image_request.n)
            try:
                pngs = await self._generate(image_request)
            finally:
                self.held_images -= image_request.n
            self.served["requests"] += 1
            return JSONResponse(generation_response(image_request, self.model, pngs))
        except ApiError as error:
            return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @http.get("/v1/models")
    async def models(self) -> JSONResponse:
        description = {**self.validator.describe(), "backend": self.config.backend,
                       "max_batch_size": self.max_batch_size, "batch_wait_ms": self.config.batch_wait_ms,
                       "request_timeout_s": self.config.request_timeout_s}
        return JSONResponse(models_response(self.model, description, self.created))

    @http.get("/health")
    async def health(self) -> JSONResponse:
        """Liveness: answered by the event loop, never behind the image queue."""
        return JSONResponse({"status": "draining" if self.draining else "ok", "model": self.model,
                             "this_replica": {**self.served, **self._queue()}})

    @http.get("/ready")
    async def ready(self) -> JSONResponse:
        """Readiness: 200 while this replica can take a request of one image, else a 503 saying why."""
        queue = self._queue()
        if self.draining or queue["held_images"] >= queue["max_held_images"]:
            code = "draining" if self.draining else "overloaded"
            error = ApiError(503, f"not ready: {code}", kind="server_error", code=code,
                             retry_after_s=self.scaling.retry_after_s)
            return JSONResponse({**error.body(), "this_replica": queue}, status_code=503, headers=error.headers)
        return JSONResponse({"status": "ready", "model": self.model, "this_replica": queue})

    def __del__(self) -> None:
        """Serve calls this when it stops the replica (after draining): release the engine."""
        pipeline = getattr(self, "pipeline", None)
        if pipeline is not None:
            pipeline.close()

    def _queue(self) -> dict[str, Any]:
        return {"held_images": self.held_images, "max_held_images": self.max_held_images,
                "reading_bodies": self.reading_bodies,
                "images_per_s_at_start": round(self.images_per_s, 2), "draining": self.draining}

    def _start_draining(self) -> None:  # from the drain watcher's thread
        self.draining = True
        logger.info("cair-serve: draining; %d images held", self.held_images)

    def _admit(self, images: int) -> None:
        """Hold a request's images, or refuse it with a 503 when the replica's queue is full.

        503, not 429: the limit is the server's capacity, not the client's quota, and any client
        retrying after ``Retry-After`` (or on another replica) is welcome.
        """
        if self.held_images and self.held_images + images > self.max_held_images:  # one request always fits
            wait_s = self.held_images / max(self.images_per_s, 1e-3)
            raise ApiError(503, f"the server is at capacity ({self.held_images} images queued or running, at most "
                                f"{self.max_held_images}; about {wait_s:.0f} s of work); retry after the "
                                "Retry-After seconds", kind="server_error", code="overloaded",
                           retry_after_s=self.scaling.retry_after_s)
        self.held_images += images

    async def _read_body(self, request: Request) -> bytes:
        """The body, within ``body_timeout_s`` and the validator's ``max_body_bytes``: a client that never sends it
        frees its slot."""
        limit = self.validator.max_body_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise ApiError(413, f"the body has {length} bytes; requests are limited to {limit}")

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"the body has more than {limit} bytes; requests are limited to {limit}")
                chunks.append(chunk)
            return b"".join(chunks)

        self.reading_bodies += 1
        try:
            return await asyncio.wait_for(read(), self.config.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.config.body_timeout_s:g} s",
                           code="body_timeout") from None
        finally:
            self.reading_bodies -= 1

    def _measure_speed(self) -> float:
        """Images per second of full engine batches at the default size and 25 steps, timed on the request
        path with 3 and 6 steps (a large model's replica does not spend minutes measuring); warms the engine."""
        seconds = []
        for steps in (3, 6):
            request = self.validator.parse(self.validator.warm_up_body(steps))
            tickets = [_Ticket(request)] * self.max_batch_size
            started = time.perf_counter()
            self._generate_chunk(tickets, [(index, 0) for index in range(len(tickets))], tickets[:1])
            seconds.append(time.perf_counter() - started)
        per_step = max(seconds[1] - seconds[0], 0.0) / 3
        batch_s = max(seconds[0] - 3 * per_step, 0.0) + 25 * per_step
        return self.max_batch_size * self.config.max_concurrency / max(batch_s, 1e-6)

    def _derived_limit(self) -> int:
        """What this replica finishes within ``queue_wait_s``: at least two batches per engine context."""
        floor = 2 * self.max_batch_size * self.config.max_concurrency
        return int(min(max(self.scaling.queue_wait_s * self.images_per_s, floor), MAX_DERIVED_IMAGES))

    async def _generate(self, request: ImageRequest) -> list[bytes]:
        ticket = _Ticket(request)
        timeout = self.config.request_timeout_s
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(self._batched(ticket), timeout)
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11
            ticket.abandoned.set()
            logger.warning("cair-serve: a request ran past its %s s timeout and was cancelled", timeout)
            raise ApiError(504, f"the request ran past the server's {timeout:g} s timeout "
                                f"({time.perf_counter() - started:.1f} s) and was cancelled", kind="timeout",
                           code="request_timeout") from None
        except asyncio.CancelledError:  # the client went away: its images are no longer worth computing
            ticket.abandoned.set()
            raise
        if not isinstance(result, list):  # an exception, or None: skipped as abandoned (cannot happen here)
            logger.error("cair-serve: generation failed: %r", result)
            raise ApiError(500, f"generation failed: {result}", kind="server_error", code="generation_failed")
        return result

    def _batch_images(self, tickets: list[_Ticket]) -> int:
        """A batch's size in images; a request larger than the batch limit counts as full and runs alone."""
        if len(tickets) == 1:
            return min(tickets[0].request.n, self.max_batch_size)
        return sum(ticket.request.n for ticket in tickets)

    async def _run_batch(self, tickets: list[_Ticket]) -> list[list[bytes] | Exception | None]:
        """Group compatible requests, run them as engine batches, hand each request its PNGs."""
        results: list[Any] = [[None] * ticket.request.n for ticket in tickets]
        groups: dict[tuple, list[int]] = {}
        for index, ticket in enumerate(tickets):
            groups.setdefault(ticket.request.batch_key, []).append(index)
        for indices in groups.values():
            images = [(index, k) for index in indices for k in range(tickets[index].request.n)]
            for start in range(0, len(images), self.max_batch_size):
                chunk = images[start:start + self.max_batch_size]
                owners = [tickets[index] for index in dict.fromkeys(index for index, _ in chunk)]
                if all(owner.abandoned.is_set() for owner in owners):
                    continue
                try:
                    self.served["engine_batches"] += 1
                    pngs = await asyncio.to_thread(self._generate_chunk, tickets, chunk, owners)
                    self.served["images"] += len(pngs)
                except _Abandoned:
                    continue
                except Exception as error:  # a bug or an engine failure: those requests get a 500
                    for index, _ in chunk:
                        results[index] = error
                    continue
                for (index, k), png in zip(chunk, pngs, strict=True):
                    if not isinstance(results[index], Exception):
                        results[index][k] = png
        return [result if isinstance(result, Exception) or all(png is not None for png in result) else None
                for result in results]

    def _generate_chunk(self, tickets: list[_Ticket], chunk: list[tuple[int, int]],
                        owners: list[_Ticket]) -> list[bytes]:
        """One engine call (in a worker thread): image k of request i with seed ``seed_i + k``."""
        from cair_runtime.text2image import png_bytes

        requests = [tickets[index].request for index, _ in chunk]
        first = requests[0]  # all share the batch key

        def stop_when_abandoned(step: int, total: int) -> None:
            if all(owner.abandoned.is_set() for owner in owners):
                raise _Abandoned

        negatives = None if first.negative_prompt is None else [r.negative_prompt for r in requests]
        result = self.pipeline(
            [r.prompt for r in requests], negatives, height=first.height, width=first.width,
            schedule=first.schedule, guidance_scale=first.guidance_scale, scheduler=first.scheduler,
            seed=[r.seeds[k] for r, (_, k) in zip(requests, chunk)], callback=stop_when_abandoned,
            prompt_chunks=first.prompt_chunks, **first.conditioning_arguments())
        recorded = first.conditioning_parameters()  # the control images and image prompt by digest, not as "array"
        return [png_bytes(image, {**parameters, **recorded})
                for image, parameters in zip(result.images, result.parameters)]


def deployment_options(service: ServiceConfig, scaling: ScalingConfig) -> dict[str, Any]:
    """Ray Serve deployment options for these settings."""
    options: dict[str, Any] = {
        # A stopping replica finishes what it holds: at most one request timeout, plus the encoding.
        "graceful_shutdown_timeout_s": service.request_timeout_s + 10,
        "max_ongoing_requests": serve_slots(scaling),
        "max_queued_requests": scaling.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": scaling.retry_after_s},
        "ray_actor_options": {"num_cpus": scaling.replica_cpus, "num_gpus": scaling.replica_gpus},
    }
    if scaling.autoscale is None:
        options["num_replicas"] = scaling.replicas
    else:
        low, high = scaling.autoscale
        options["num_replicas"] = "auto"
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=low, max_replicas=high, initial_replicas=max(low, 1),
            target_ongoing_requests=max(1, (scaling.max_ongoing_images or 2) // 2))
    return options


def make_app(service: ServiceConfig, scaling: ScalingConfig = ScalingConfig()) -> serve.Application:
    """The Serve application for these settings (what ``serve.run`` takes)."""
    return CairImageService.options(**deployment_options(service, scaling)).bind(service, scaling)


def build_app(args: Mapping[str, Any]) -> serve.Application:
    """Application builder for ``serve run cair_runtime.serve.app:build_app engine_dir=... [key=value ...]``
    and the ``args:`` of a Serve config file; keys are the fields of ``ServiceConfig`` and ``ScalingConfig``."""
    return make_app(*parse_config(args))
