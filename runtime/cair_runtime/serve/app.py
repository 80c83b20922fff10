"""The Ray Serve application: one ``CairText2Image`` per replica behind the OpenAI-shaped HTTP API.

A replica holds one engine and serves many requests. Requests wait (at most ``batch_wait_ms``)
in one ``serve.batch`` queue; each batch is grouped by ``ImageRequest.batch_key`` (same size,
steps, cache step, guidance, scheduler) and run as engine batches of at most ``max_batch_size``
images, in a worker thread so the event loop keeps taking requests. Every image draws its noise
from its own seed, so an image never depends on what else shared its batch.

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

from cair_runtime.serve.api import ApiError, ImageRequest, RequestValidator, generation_response, models_response
from cair_runtime.serve.config import ScalingConfig, ServiceConfig, parse_config

logger = logging.getLogger("ray.serve")
http = FastAPI(title="cair-serve", description="CAIR text-to-image, OpenAI Images API shape")


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

    def __init__(self, config: ServiceConfig):
        from cair_runtime.text2image import CairText2Image

        options: dict[str, Any] = {}
        if config.backend == "onnxruntime":
            options = {"providers": config.providers, "threads": config.threads,
                       "graph_optimization": config.graph_optimization, "share_weights": config.share_weights}
        elif config.backend == "openvino":
            options = {"threads": config.threads, "precision": config.precision or "auto"}
        self.config = config
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

    @http.post("/v1/images/generations")
    async def generate(self, request: Request) -> JSONResponse:
        try:
            image_request = self.validator.parse(await request.body())
            pngs = await self._generate(image_request)
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
        return JSONResponse({"status": "ok", "model": self.model, "this_replica": self.served})

    def __del__(self) -> None:
        """Serve calls this when it stops the replica (after draining): release the engine."""
        pipeline = getattr(self, "pipeline", None)
        if pipeline is not None:
            pipeline.close()

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
                                f"({time.perf_counter() - started:.1f} s) and was cancelled", kind="timeout") from None
        except asyncio.CancelledError:  # the client went away: its images are no longer worth computing
            ticket.abandoned.set()
            raise
        if not isinstance(result, list):  # an exception, or None: skipped as abandoned (cannot happen here)
            logger.error("cair-serve: generation failed: %r", result)
            raise ApiError(500, f"generation failed: {result}", kind="server_error")
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
            [r.prompt for r in requests], negatives,
            height=first.height, width=first.width, num_inference_steps=first.steps, cache_step=first.cache_step,
            guidance_stop=first.guidance_stop, deep_interval=first.deep_interval, skip_mode=first.skip_mode,
            guidance_scale=first.guidance_scale, scheduler=first.scheduler,
            seed=[r.seed + k for r, (_, k) in zip(requests, chunk)], callback=stop_when_abandoned)
        return [png_bytes(image, parameters) for image, parameters in zip(result.images, result.parameters)]


def deployment_options(service: ServiceConfig, scaling: ScalingConfig) -> dict[str, Any]:
    """Ray Serve deployment options for these settings."""
    options: dict[str, Any] = {
        # A stopping replica finishes what it holds: at most one request timeout, plus the encoding.
        "graceful_shutdown_timeout_s": service.request_timeout_s + 10,
        "max_ongoing_requests": scaling.max_ongoing_requests,
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
            target_ongoing_requests=max(1, scaling.max_ongoing_requests // 2))
    return options


def make_app(service: ServiceConfig, scaling: ScalingConfig = ScalingConfig()) -> serve.Application:
    """The Serve application for these settings (what ``serve.run`` takes)."""
    return CairImageService.options(**deployment_options(service, scaling)).bind(service)


def build_app(args: Mapping[str, Any]) -> serve.Application:
    """Application builder for ``serve run cair_runtime.serve.app:build_app engine_dir=... [key=value ...]``
    and the ``args:`` of a Serve config file; keys are the fields of ``ServiceConfig`` and ``ScalingConfig``."""
    return make_app(*parse_config(args))
