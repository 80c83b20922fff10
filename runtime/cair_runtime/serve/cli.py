"""``cair-serve ENGINE_DIR``: serve an engine folder over HTTP on Ray Serve until SIGTERM or Ctrl-C.

Starts (or joins, with ``--address``) a Ray cluster, starts Serve's HTTP proxy on ``--host``/``--port``
and runs the application of ``cair_runtime.serve.app``. SIGTERM and SIGINT drain: the replicas
answer new requests with a 503 and ``Retry-After`` while they finish the ones they accepted, then
Serve and Ray shut down. Bad flags or a bad engine folder are one line and exit code 2, before Ray
starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from cair_runtime.backends import BACKENDS
from cair_runtime.cli import OneLineArgumentParser, run_command
from cair_runtime.errors import CairError, InvalidInputError, ManifestError, MissingDependencyError
from cair_runtime.serve.config import ScalingConfig, ServiceConfig, parse_config


def _configs(args: argparse.Namespace) -> tuple[ServiceConfig, ScalingConfig]:
    names = [field.name for config in (ServiceConfig, ScalingConfig) for field in dataclasses.fields(config)]
    return parse_config({name: getattr(args, name) for name in names if getattr(args, name) is not None})


def _check_engine(service: ServiceConfig) -> str:
    """The engine folder's model name; refuses a folder the replicas could not load, before Ray starts."""
    from cair_runtime.manifest import load_manifest

    manifest = load_manifest(service.engine_dir)
    if manifest.pipeline is None:
        raise ManifestError(f"{service.engine_dir} is a UNet-only export; serving text to image needs a pipeline "
                            "export (a preset like tiny-sd21, shapes, or a diffusers pipeline folder)")
    engine_max = manifest.dim("batch").max
    if service.max_batch_size is not None and service.max_batch_size > engine_max:
        raise InvalidInputError(f"--max-batch-size {service.max_batch_size} is above the engine's max batch "
                                f"{engine_max}; re-export with a larger --max-batch")
    return str(manifest.model.get("name"))


def _check_port(host: str, port: int) -> None:
    """A port that is taken or an address that is not this machine's: say so before Ray starts."""
    if not 1 <= port <= 65535:
        raise InvalidInputError(f"--port {port} is outside 1..65535; pick a free TCP port", field="port")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as error:
            raise InvalidInputError(f"cannot listen on {host}:{port} ({error.strerror}); pick another --port "
                                    "or stop what uses it") from None


def _start_ray(args: argparse.Namespace) -> None:
    """Start (or join) Ray; files a local Ray writes (its session folder, its token file) are private to this user."""
    import ray

    if args.address:
        ray.init(address=args.address, include_dashboard=False, log_to_driver=args.verbose)
        return
    previous = os.umask(0o077)  # inherited by the processes ray.init starts: its logs and sockets too
    try:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=args.verbose)
    finally:
        os.umask(previous)
    token = Path.home() / ".ray" / "auth_token"  # written by an earlier Ray with the default umask (0644)
    if token.is_file() and token.stat().st_uid == os.getuid():
        token.chmod(0o600)


def _drain(control, timeout_s: float) -> None:
    """Wait until every replica saw the drain, holds nothing and has been quiet (at most ``timeout_s``)."""
    import ray

    control.start.remote()
    deadline = time.monotonic() + timeout_s
    state: dict = {}
    while time.monotonic() < deadline:
        try:
            state = ray.get(control.state.remote(), timeout=10)
        except ray.exceptions.GetTimeoutError:  # a busy machine: ask again
            continue
        if state["drained"]:
            return
        time.sleep(0.25)
    print(f"cair-serve: drain not finished after {timeout_s:g} s ({state.get('held', '?')} images held); stopping",
          flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    service, scaling = _configs(args)  # checked: every bad setting in one line
    model = _check_engine(service)
    _check_port(args.host, args.port)
    try:
        import ray
        from ray import serve

        from cair_runtime.serve.app import make_app
        from cair_runtime.serve.drain import start_control
    except ImportError as error:
        raise MissingDependencyError(f"cair-serve needs Ray Serve ({error}); "
                                     "pip install 'cair-runtime[serve]'") from None

    _start_ray(args)
    stop = threading.Event()  # handlers set after ray.init, which installs its own
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            serve.start(http_options={"host": args.host, "port": args.port,
                                      "keep_alive_timeout_s": service.body_timeout_s})
            control = start_control()
            serve.run(make_app(service, scaling), name="cair", route_prefix="/", blocking=False)
        except Exception as error:  # a replica that cannot load the engine, a proxy that cannot bind...
            summary = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise CairError(f"Ray Serve could not start the application: {summary}; the replicas' logs are in "
                            "/tmp/ray/session_latest/logs/serve") from None
        replicas = (f"{scaling.autoscale[0]}..{scaling.autoscale[1]} replicas (autoscaling)" if scaling.autoscale
                    else f"{scaling.replicas} replica{'s' * (scaling.replicas > 1)}")
        print(f"cair-serve: serving {model} on http://{args.host}:{args.port}/v1/images/generations with {replicas}; "
              "SIGTERM or Ctrl-C drains and stops", flush=True)
        while not stop.wait(1.0):
            pass
        print("cair-serve: draining (finishing the requests accepted; new ones get 503) and stopping", flush=True)
        _drain(control, service.request_timeout_s + service.body_timeout_s + 10)
        # Deleting the application first lets each replica finish anything still held (Serve's graceful
        # replica shutdown) while the proxies still deliver the answers; shutdown() alone drops them.
        serve.delete("cair")
        serve.shutdown()
    finally:
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("cair-serve: stopped", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    service, scaling = ServiceConfig(engine_dir=""), ScalingConfig()
    parser = OneLineArgumentParser(prog="cair-serve", description=(
        "Serve an engine folder over HTTP on Ray Serve: POST /v1/images/generations (OpenAI Images API shape), "
        "GET /v1/models, GET /health."))
    parser.add_argument("engine_dir", help="folder written by `cair-export export` (a pipeline export)")
    where = parser.add_argument_group("where")
    where.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy listens on (default 127.0.0.1)")
    where.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    where.add_argument("--address", help="join this Ray cluster (e.g. auto) instead of starting a local one")
    where.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    scale = parser.add_argument_group("replicas and queues")
    count = scale.add_mutually_exclusive_group()
    count.add_argument("--replicas", type=int, help=f"fixed number of replicas (default {scaling.replicas})")
    count.add_argument("--autoscale", metavar="MIN,MAX", help="autoscale between MIN and MAX replicas")
    scale.add_argument("--max-ongoing-images", type=int,
                       help="images a replica holds, queued or running; a request past that gets 503 (default: "
                            "what the replica measures it finishes in --queue-wait-s)")
    scale.add_argument("--queue-wait-s", type=float,
                       help=f"the longest a request should wait in a replica (default {scaling.queue_wait_s:g})")
    scale.add_argument("--max-ongoing-requests", type=int,
                       help="Serve's limit on requests of any kind a replica is handed at once (default: "
                            "--max-ongoing-images plus room for probes and bodies still arriving)")
    scale.add_argument("--max-queued-requests", type=int,
                       help="requests waiting at the proxy beyond those; more get 503 "
                            f"(default {scaling.max_queued_requests})")
    scale.add_argument("--retry-after-s", type=float, help=f"Retry-After of a 503 (default {scaling.retry_after_s:g})")
    scale.add_argument("--replica-cpus", type=float, help=f"Ray CPUs per replica (default {scaling.replica_cpus:g})")
    scale.add_argument("--replica-gpus", type=float,
                       help=f"Ray GPUs per replica (default {scaling.replica_gpus:g}; 1 with a GPU backend)")
    requests = parser.add_argument_group("requests")
    requests.add_argument("--batch-wait-ms", type=float,
                          help="how long a request waits for compatible ones to batch with "
                               f"(default {service.batch_wait_ms:g})")
    requests.add_argument("--max-batch-size", type=int,
                          help="images per engine batch (default: the engine's max batch; 1 = no batching)")
    requests.add_argument("--max-images", type=int,
                          help="largest n a request may ask for (default: the engine's max batch)")
    requests.add_argument("--max-steps", type=int,
                          help=f"most steps a request may ask for (default {service.max_steps})")
    requests.add_argument("--request-timeout-s", type=float,
                          help=f"cancel a request after this long, 504 (default {service.request_timeout_s:g})")
    requests.add_argument("--body-timeout-s", type=float,
                          help="answer 408 to a request whose body has not arrived after this long; also the "
                               f"idle keep-alive limit of a connection (default {service.body_timeout_s:g})")
    runtime = parser.add_argument_group("runtime (as cair-run)")
    runtime.add_argument("--backend", choices=BACKENDS, help="what runs the UNet graphs (default onnxruntime)")
    runtime.add_argument("--providers",
                         help="onnxruntime execution providers, comma separated (default CPUExecutionProvider)")
    runtime.add_argument("--threads", type=int, help="intra-op threads, 0 = onnxruntime's default")
    runtime.add_argument("--precision", choices=("auto", "fp32", "bf16", "int8"),
                         help="openvino backend: compute precision (default auto: bf16 on CPUs with bf16 units)")
    runtime.add_argument("--graph-optimization", choices=("disable", "basic", "extended", "all"))
    runtime.add_argument("--share-weights", action="store_true", default=None,
                         help="onnxruntime: both UNet sessions on one memory-mapped copy of the weights (about half "
                              "the memory per replica; on the CPU about 20%% slower per step)")
    runtime.add_argument("--max-concurrency", type=int,
                         help="engine batches a replica runs at once, one engine context each "
                              f"(default {service.max_concurrency})")
    parser.add_argument("--verbose", action="store_true", help="show the replicas' logs")
    parser.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
