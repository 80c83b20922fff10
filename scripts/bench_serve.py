"""Load benchmark of ``cair-serve`` on loopback against the direct runtime in the same window.

For each configuration (by default: the derived defaults, and the old fixed limits of 16 requests per
replica and 64 at the proxy, with and without Serve's router backoff shortened), it starts
``cair-serve`` and, for every client count ``C`` (default 1, 4, 16, 32, 64, 128), sends ``max(--requests,
3 C)`` requests (one image each, distinct prompts and seeds) from ``C`` client threads, each sending its
next request when the last is answered. Right before each level, the same requests run as direct
``CairText2Image`` calls in this process (one image per call, one at a time), so both see the same
machine load. It reports images/s, the server-to-direct ratio, p50/p90/p99 latency at the client,
CPU-seconds per image (the server's whole process tree; the direct calls' process) and the answers
by HTTP status.

Bounded: at most 500 requests per level, a client timeout per request, ``--time-limit`` for the
whole run (a level that would start after it is skipped), and every server is stopped with SIGTERM
(killed if it hangs). Talks to 127.0.0.1 only.

    python scripts/bench_serve.py engines/shapes --threads 1 --json docs/serving_bench.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil

PROMPTS = ["a small red circle on a white background", "a large blue square left of a green triangle",
           "a purple hexagon at the top", "a yellow star on a black background", "a small green triangle",
           "a large orange circle right of a small blue square"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bodies(count: int, steps: int, size: str) -> list[dict]:
    return [{"prompt": PROMPTS[k % len(PROMPTS)], "seed": 1000 + k, "steps": steps, "size": size, "n": 1}
            for k in range(count)]


def _post(url: str, body: dict, timeout: float) -> tuple[int | str, float]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError:  # refused, reset or closed without an answer, or the client's timeout
        status = "no answer"
    return status, time.perf_counter() - started


def _tree_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of a process and everything under it, by process name (``ray::ProxyActor``, ...)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    by_name: dict[str, float] = collections.defaultdict(float)
    for process in processes:
        try:
            times = process.cpu_times()
            by_name[process.name()] += times.user + times.system + times.children_user + times.children_system
        except psutil.NoSuchProcess:
            pass
    return dict(by_name)


def _summary(latencies: list[float], images: int, wall_s: float, cpu_s: float, statuses: dict) -> dict:
    values = np.array(latencies or [float("nan")])
    return {"images": images, "wall_s": round(wall_s, 3), "images_per_s": images / wall_s,
            "cpu_s_per_image": cpu_s / images if images else float("nan"), "statuses": statuses,
            **{f"p{q}_s": float(np.percentile(values, q)) for q in (50, 90, 99)}}


class Server:
    def __init__(self, engine: str, flags: list[str], log_path: str, env: dict[str, str] | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cair_runtime.serve.cli", engine, "--host", "127.0.0.1", "--port", str(self.port),
             *flags], stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})})

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds used so far by cair-serve and every process under it (Ray's, the replicas, the proxy)."""
        return _tree_cpu_s(self.process.pid)

    def wait_ready(self, limit_s: float = 180) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cair-serve exited {self.process.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"cair-serve not ready after {limit_s} s; see {self.log.name}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self.log.close()


def bench_direct(pipeline, bodies: list[dict]) -> dict:
    """The same requests as direct calls, one image per call, one at a time."""
    from cair_runtime.text2image import png_bytes

    width, height = map(int, bodies[0]["size"].split("x"))
    latencies, cpu0, started = [], time.process_time(), time.perf_counter()
    for body in bodies:
        begun = time.perf_counter()
        result = pipeline(body["prompt"], num_inference_steps=body["steps"], height=height, width=width,
                          seed=body["seed"])
        png_bytes(result.images[0], result.parameters[0])  # the served path encodes PNGs too
        latencies.append(time.perf_counter() - begun)
    return _summary(latencies, len(bodies), time.perf_counter() - started, time.process_time() - cpu0,
                    {"200": len(bodies)})


def _replica_counts(server: Server) -> dict:
    """The answering replica's counts from ``/health`` (with one replica: the replica's)."""
    with urllib.request.urlopen(server.url + "/health", timeout=30) as response:
        return json.loads(response.read())["this_replica"]


def bench_server(server: Server, bodies: list[dict], level: int, timeout: float) -> dict:
    url = server.url + "/v1/images/generations"
    with ThreadPoolExecutor(level) as pool:
        list(pool.map(lambda body: _post(url, body, timeout), bodies[:level]))  # warm-up: connections, batch shapes
        counts0, cpu0, started = _replica_counts(server), server.cpu_s(), time.perf_counter()
        answers = list(pool.map(lambda body: _post(url, body, timeout), bodies))
        wall_s, cpu1, counts1 = time.perf_counter() - started, server.cpu_s(), _replica_counts(server)
    cpu_by_process = {name: round(cpu1[name] - cpu0.get(name, 0.0), 2) for name in cpu1}
    batches = counts1["engine_batches"] - counts0["engine_batches"]
    ok = [latency for status, latency in answers if status == 200]
    statuses = dict(sorted(collections.Counter(str(status) for status, _ in answers).items()))
    return {**_summary(ok, len(ok), wall_s, sum(cpu_by_process.values()), statuses), "cpu_s_by_process": cpu_by_process,
            "images_per_engine_batch": (counts1["images"] - counts0["images"]) / batches if batches else None,
            "held_images_limit": counts1.get("max_held_images")}


CONFIGS = {  # name: (flags, environment of the server)
    "derived": ([], {}),
    "old-limits": (["--max-ongoing-images", "16", "--max-ongoing-requests", "16", "--max-queued-requests", "64"], {}),
    "old-limits-short-backoff": (["--max-ongoing-images", "16", "--max-ongoing-requests", "16",
                                  "--max-queued-requests", "64"],
                                 {"RAY_SERVE_ROUTER_RETRY_MAX_BACKOFF_S": "0.01",
                                  "RAY_SERVE_ROUTER_RETRY_INITIAL_BACKOFF_S": "0.005"}),
}


def _machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            model = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir", help="a pipeline export, e.g. engines/shapes (cair-export demo writes it)")
    parser.add_argument("--levels", default="1,4,16,32,64,128", help="client counts (default 1,4,16,32,64,128)")
    parser.add_argument("--requests", type=int, default=48, help="least requests per level, one image each "
                                                                  "(default 48; 3 per client at least)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps per image (default 25)")
    parser.add_argument("--size", default="64x64", help="WIDTHxHEIGHT (default 64x64)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads of the replica and direct calls")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the server's Ray instance (default 2)")
    parser.add_argument("--time-limit", type=float, default=1200, help="seconds for the whole run (default 1200)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"from {', '.join(CONFIGS)}")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.time_limit
    levels = [int(level) for level in args.levels.split(",")]
    timeout = 300.0
    rows: list[dict] = []
    machine = {"before": _machine()}
    print(json.dumps(machine["before"]), flush=True)
    from cair_runtime.text2image import CairText2Image

    with CairText2Image(args.engine_dir, threads=args.threads) as pipeline:
        bench_direct(pipeline, _bodies(4, args.steps, args.size))  # warm-up
        for config in args.configs.split(","):
            flags, env = CONFIGS[config]
            if time.monotonic() > deadline:
                print(f"time limit reached; skipped {config}", flush=True)
                continue
            server = Server(args.engine_dir, ["--num-cpus", str(args.num_cpus), "--threads", str(args.threads), *flags],
                            f"/tmp/bench_serve_{config}.log", env)
            try:
                server.wait_ready()
                for level in levels:
                    if time.monotonic() > deadline:
                        print(f"time limit reached; skipped {config} at {level} clients", flush=True)
                        break
                    bodies = _bodies(min(500, max(args.requests, 3 * level)), args.steps, args.size)
                    direct = bench_direct(pipeline, bodies)
                    served = bench_server(server, bodies, level, timeout)
                    rows.append({"config": config, "clients": level, "load_average": os.getloadavg()[0],
                                 "server": served, "direct": direct,
                                 "ratio": served["images_per_s"] / direct["images_per_s"]})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                server.stop()
    machine["after"] = _machine()
    lines = [f"{args.steps} steps, {args.size}, 1 image per request; {machine['before']['cpu']}, "
             f"{machine['before']['cores']} cores; load average {machine['before']['load_average']} before, "
             f"{machine['after']['load_average']} after",
             "", "| config | clients | server images/s | direct images/s | server / direct | p50 (s) | p90 (s) | "
             "p99 (s) | CPU-s per image (server / direct) | answers | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        served, direct = row["server"], row["direct"]
        lines.append(f"| {row['config']} | {row['clients']} | {served['images_per_s']:.2f} | "
                     f"{direct['images_per_s']:.2f} | {row['ratio']:.2f}x | {served['p50_s']:.3f} | "
                     f"{served['p90_s']:.3f} | {served['p99_s']:.3f} | {served['cpu_s_per_image']:.3f} / "
                     f"{direct['cpu_s_per_image']:.3f} | "
                     f"{', '.join(f'{k}: {v}' for k, v in served['statuses'].items())} | {row['load_average']:.1f} |")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"args": vars(args), "machine": machine, "rows": rows, "table": lines}, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
