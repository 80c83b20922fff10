"""What a served engine is configured with: the service (one replica) and its scaling.

``cair-serve`` flags, ``serve run cair_runtime.serve.app:build_app key=value`` arguments and the
``args:`` of a Serve config file all map onto these fields one to one (``parse_config``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from cair_runtime.errors import InvalidInputError


@dataclass(frozen=True)
class ServiceConfig:
    """One replica: the engine it loads and how it takes requests."""

    engine_dir: str  # folder written by `cair-export export` (a pipeline export)
    backend: str = "onnxruntime"  # what runs the UNet graphs: onnxruntime, tensorrt, aoti, openvino
    precision: str | None = None  # openvino: fp32, bf16, int8 or auto (None: auto); other backends: the export's
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # onnxruntime execution providers
    threads: int = 0  # onnxruntime (openvino) intra-op threads per session, 0 = its default
    graph_optimization: str | None = None  # onnxruntime level for the UNet graphs (None: the backend's default)
    share_weights: bool = False  # onnxruntime: both UNet sessions on one memory-mapped copy of the weights
    max_concurrency: int = 1  # engine batches a replica runs at once, each in its own engine context
    max_batch_size: int | None = None  # images per engine batch; None = the engine's max; 1 = no batching
    batch_wait_ms: float = 10.0  # how long the first request of a batch waits for compatible ones
    max_images: int | None = None  # limit on a request's n; None = the engine's max batch
    max_steps: int = 100  # limit on a request's steps
    request_timeout_s: float = 300.0  # a request still running after this is cancelled (504)
    body_timeout_s: float = 10.0  # a request body not fully received after this is answered 408 (frees its slot)


@dataclass(frozen=True)
class ScalingConfig:
    """The deployment: how many replicas, what each holds, and where requests queue."""

    replicas: int = 1  # fixed replica count (ignored when autoscale is set)
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; Serve scales on ongoing requests
    # Images a replica holds (queued for a batch or running); a request that would go past gets a JSON 503
    # with Retry-After. None: the images the replica measures (at start) it finishes in queue_wait_s.
    max_ongoing_images: int | None = None
    queue_wait_s: float = 10.0  # with max_ongoing_images None: the longest a request should wait in a replica
    # Serve's per-replica limit on requests of any kind handed to it at once (images held, /health, bodies
    # still arriving). None: max_ongoing_images (or its largest derived value) plus CONNECTION_HEADROOM, so
    # that requests wait inside the replica, where a freed slot is taken at once, and not at the proxy.
    max_ongoing_requests: int | None = None
    max_queued_requests: int = 64  # requests waiting at each proxy beyond those; more get Serve's 503
    retry_after_s: float = 5.0  # Retry-After of those 503 responses
    replica_cpus: float = 1.0  # Ray CPUs each replica reserves
    replica_gpus: float = 0.0  # Ray GPUs each replica reserves (1 on a GPU cluster)


MAX_DERIVED_IMAGES = 1000  # the largest derived max_ongoing_images: a held request is a prompt and a future
CONNECTION_HEADROOM = 256  # Serve slots beyond the images held: probes, /v1/models, bodies still arriving

_INTEGERS = {"threads", "max_concurrency", "max_batch_size", "max_images", "max_steps", "replicas",
             "max_ongoing_images", "max_ongoing_requests", "max_queued_requests"}
# None: the backend's or the engine's default, or a derived value
_OPTIONAL = {"graph_optimization", "precision", "max_batch_size", "max_images", "autoscale", "max_ongoing_images",
             "max_ongoing_requests"}
_BOOLEANS = {"share_weights"}
_NUMBERS = {"batch_wait_ms", "request_timeout_s", "body_timeout_s", "retry_after_s", "replica_cpus", "replica_gpus",
            "queue_wait_s"}


def _integer(name: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    raise InvalidInputError(f"{name} {value!r} is not an integer")


def _convert(name: str, value: Any) -> Any:
    """A builder argument (a string from `serve run key=value`, or a YAML scalar) to the field's type."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if name not in _OPTIONAL:
            raise InvalidInputError(f"{name} needs a value")
        return None
    if name in _INTEGERS:
        return _integer(name, value)
    if name in _BOOLEANS:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise InvalidInputError(f"{name} {value!r} is not true or false")
    if name in _NUMBERS:
        try:
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return float(value)
        except ValueError:
            pass
        raise InvalidInputError(f"{name} {value!r} is not a number")
    if name in ("providers", "autoscale"):
        items = [item.strip() if isinstance(item, str) else item
                 for item in (value.split(",") if isinstance(value, str) else value)]
        if name == "providers":
            return tuple(item for item in items if item)
        if len(items) != 2:
            raise InvalidInputError(f"autoscale {value!r} must be MIN,MAX (two replica counts)")
        return (_integer("autoscale", items[0]), _integer("autoscale", items[1]))
    return str(value)


def parse_config(args: Mapping[str, Any]) -> tuple[ServiceConfig, ScalingConfig]:
    """Builder arguments -> (service, scaling) configs; unknown keys are refused, every problem reported."""
    service_fields = [field.name for field in dataclasses.fields(ServiceConfig)]
    scaling_fields = [field.name for field in dataclasses.fields(ScalingConfig)]
    unknown = sorted(set(args) - set(service_fields) - set(scaling_fields))
    if unknown:
        raise InvalidInputError(f"unknown argument(s) {', '.join(unknown)}; known: "
                                f"{', '.join([*service_fields, *scaling_fields])}")
    if "engine_dir" not in args:
        raise InvalidInputError("engine_dir is required (the folder written by `cair-export export`)")
    values = {name: _convert(name, value) for name, value in args.items()}
    service = ServiceConfig(**{name: values[name] for name in service_fields if name in values})
    scaling = ScalingConfig(**{name: values[name] for name in scaling_fields if name in values})
    check_config(service, scaling)
    return service, scaling


def check_config(service: ServiceConfig, scaling: ScalingConfig) -> None:
    """Every out-of-range setting, reported together."""
    problems = []
    for name, value, low in (("max_batch_size", service.max_batch_size, 1), ("max_images", service.max_images, 1),
                             ("max_steps", service.max_steps, 1),
                             ("max_concurrency", service.max_concurrency, 1), ("replicas", scaling.replicas, 1),
                             ("max_ongoing_images", scaling.max_ongoing_images, 1),
                             ("max_ongoing_requests", scaling.max_ongoing_requests, 1),
                             ("max_queued_requests", scaling.max_queued_requests, 1)):
        if value is not None and value < low:
            problems.append(f"{name} {value} must be at least {low}")
    for name, value in (("batch_wait_ms", service.batch_wait_ms), ("retry_after_s", scaling.retry_after_s),
                        ("replica_cpus", scaling.replica_cpus), ("replica_gpus", scaling.replica_gpus)):
        if not math.isfinite(value) or value < 0:
            problems.append(f"{name} {value} must be a non-negative number")
    for name, value in (("request_timeout_s", service.request_timeout_s), ("body_timeout_s", service.body_timeout_s),
                        ("queue_wait_s", scaling.queue_wait_s)):
        if not math.isfinite(value) or value <= 0:
            problems.append(f"{name} {value} must be positive")
    if scaling.autoscale is not None:
        low, high = scaling.autoscale
        if not 0 <= low <= high or high < 1:
            problems.append(f"autoscale {low},{high} must be MIN,MAX with 0 <= MIN <= MAX and MAX >= 1")
        if scaling.max_ongoing_images is None:  # the autoscaler's target must be known before any replica measures
            problems.append("autoscale needs max_ongoing_images (the replica queue it keeps half full)")
    if service.precision is not None and service.backend != "openvino":
        problems.append(f"precision {service.precision} is the openvino backend's choice; drop it or use backend "
                        "openvino")
    if service.precision not in (None, "auto", "fp32", "bf16", "int8"):
        problems.append(f"precision {service.precision} must be one of auto, fp32, bf16, int8")
    if problems:
        raise InvalidInputError("; ".join(problems))


def serve_slots(scaling: ScalingConfig) -> int:
    """Serve's max_ongoing_requests per replica: the images it may hold plus room for everything else."""
    if scaling.max_ongoing_requests is not None:
        return scaling.max_ongoing_requests
    return (scaling.max_ongoing_images or MAX_DERIVED_IMAGES) + CONNECTION_HEADROOM


def as_args(service: ServiceConfig, scaling: ScalingConfig) -> dict[str, Any]:
    """The builder arguments that give back these configs (what a Serve config file's ``args:`` holds)."""
    args = {**dataclasses.asdict(service), **dataclasses.asdict(scaling)}
    args["providers"] = ",".join(service.providers)
    args["autoscale"] = None if scaling.autoscale is None else ",".join(map(str, scaling.autoscale))
    return args
