"""Load benchmark of ``cair-serve`` on loopback: throughput and latency at fixed concurrency levels.

Runs, one after another, ``cair-serve`` with one replica and batching, one replica without batching
(``--max-batch-size 1``) and two replicas with batching, and sends each the same requests (one image
each, distinct prompts and seeds) from ``C`` client threads for every level ``C``. Before and after
them, the same requests as direct ``CairText2Image`` calls in this process: one at a time (the served
path's overhead is the latency at concurrency 1 against that; two rounds show the machine's drift)
and four to a call (what batching can give).

Bounded: ``--requests`` per level, a client timeout per request, ``--time-limit`` for the whole run
(a level that would start after it is skipped), and every server is stopped with SIGTERM (killed if
it hangs). Talks to 127.0.0.1 only.

    python scripts/bench_serve.py engines/shapes --levels 1,4,16 --requests 48 --steps 10 --markdown docs/serving_bench.md
"""

from __future__ import annotations

import argparse
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


def _post(url: str, body: dict, timeout: float) -> tuple[int, float]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    return status, time.perf_counter() - started


def _summary(latencies: list[float], images: int, wall_s: float, errors: int = 0) -> dict:
    values = np.array(latencies)
    return {"images": images, "wall_s": wall_s, "images_per_s": images / wall_s, "errors": errors,
            **{f"p{q}_s": float(np.percentile(values, q)) for q in (50, 95, 99)}}


class Server:
    def __init__(self, engine: str, flags: list[str], log_path: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cair_runtime.serve.cli", engine, "--host", "127.0.0.1", "--port", str(self.port),
             *flags], stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})

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


def bench_direct(engine: str, bodies: list[dict], threads: int) -> dict[str, dict]:
    from cair_runtime.text2image import CairText2Image, png_bytes

    width, height = map(int, bodies[0]["size"].split("x"))
    steps = bodies[0]["steps"]
    results = {}
    with CairText2Image(engine, threads=threads) as pipeline:
        pipeline(PROMPTS[0], num_inference_steps=steps, height=height, width=width)  # warm-up
        for label, per_call in (("direct, 1 image per call", 1), ("direct, 4 images per call", 4)):
            latencies, started = [], time.perf_counter()
            for start in range(0, len(bodies), per_call):
                part = bodies[start:start + per_call]
                begun = time.perf_counter()
                result = pipeline([b["prompt"] for b in part], num_inference_steps=steps, height=height, width=width,
                                  seed=[b["seed"] for b in part])
                for image, parameters in zip(result.images, result.parameters):
                    png_bytes(image, parameters)  # the served path encodes PNGs too
                latencies += [time.perf_counter() - begun] * len(part)
            results[label] = _summary(latencies, len(bodies), time.perf_counter() - started)
    return results


def bench_server(server: Server, bodies: list[dict], level: int, timeout: float) -> dict:
    url = server.url + "/v1/images/generations"
    with ThreadPoolExecutor(level) as pool:  # warm-up: every replica and batch shape once
        list(pool.map(lambda body: _post(url, body, timeout), bodies[:2 * level]))
        started = time.perf_counter()
        answers = list(pool.map(lambda body: _post(url, body, timeout), bodies))
        wall_s = time.perf_counter() - started
    ok = [latency for status, latency in answers if status == 200]
    return _summary(ok or [float("nan")], len(ok), wall_s, errors=len(answers) - len(ok))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir", help="a pipeline export, e.g. engines/shapes (cair-export demo writes it)")
    parser.add_argument("--levels", default="1,4,16", help="client concurrency levels (default 1,4,16)")
    parser.add_argument("--requests", type=int, default=48, help="requests per level, one image each (default 48)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per image (default 10)")
    parser.add_argument("--size", default="64x64", help="WIDTHxHEIGHT (default 64x64)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads of one replica / direct calls")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds for the whole run (default 900)")
    parser.add_argument("--configs", default="batching,no-batching,two-replicas")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", help="write the table here")
    args = parser.parse_args(argv)
    if args.requests > 500:
        parser.error("--requests is capped at 500 per level")
    deadline = time.monotonic() + args.time_limit
    levels = [int(level) for level in args.levels.split(",")]
    bodies = _bodies(args.requests, args.steps, args.size)
    timeout = 120.0
    rows: list[dict] = []

    def direct(round_label: str) -> None:
        for label, summary in bench_direct(args.engine_dir, bodies, args.threads).items():
            rows.append({"config": f"{label} ({round_label})", "concurrency": 1, **summary})
            print(json.dumps(rows[-1]), flush=True)

    direct("before")
    common = ["--num-cpus", "2", "--max-ongoing-requests", "32", "--max-queued-requests", "256",
              "--batch-wait-ms", "10"]
    configs = {
        "1 replica, batching": [*common, "--threads", str(args.threads)],
        "1 replica, no batching": [*common, "--threads", str(args.threads), "--max-batch-size", "1"],
        "2 replicas, batching": [*common, "--replicas", "2", "--threads", str(max(1, args.threads // 2))],
    }
    wanted = {"batching": "1 replica, batching", "no-batching": "1 replica, no batching",
              "two-replicas": "2 replicas, batching"}
    for key in args.configs.split(","):
        label = wanted[key]
        if time.monotonic() > deadline:
            print(f"time limit reached; skipped {label}", flush=True)
            continue
        server = Server(args.engine_dir, configs[label], f"/tmp/bench_serve_{key}.log")
        try:
            server.wait_ready()
            for level in levels:
                if time.monotonic() > deadline:
                    print(f"time limit reached; skipped {label} at concurrency {level}", flush=True)
                    break
                rows.append({"config": label, "concurrency": level, **bench_server(server, bodies, level, timeout)})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            server.stop()
    direct("after")

    direct_p50 = min(row["p50_s"] for row in rows if row["config"].startswith("direct, 1 image"))
    lines = [f"{args.requests} requests per row, 1 image each, {args.size}, {args.steps} steps, default cache step; "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; direct p50 = the better of the "
             "two direct rounds, one image per call",
             "", "| configuration | concurrency | images/s | p50 (s) | p95 (s) | p99 (s) | p50 / direct p50 | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['config']} | {row['concurrency']} | {row['images_per_s']:.2f} | {row['p50_s']:.3f} | "
                     f"{row['p95_s']:.3f} | {row['p99_s']:.3f} | {row['p50_s'] / direct_p50:.2f}x | {row['errors']} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as file:
            file.write(table + "\n")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"args": vars(args), "rows": rows}, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
