"""``cair-serve`` end to end on the shipped ``shapes`` engine: one server process on 127.0.0.1 for the module.

Bounded: every request has a client timeout, the server a request timeout, the whole module
sends fewer than 150 requests, and the server is stopped with SIGTERM (and killed if it hangs).
ControlNet and IP-Adapter engines (at the end) go through the request checks and the replica's batch code
without Ray.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from email.message import Message
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install './runtime[serve]'")

from cair_runtime.serve.api import ApiError, RequestValidator  # noqa: E402
from cair_runtime.text2image import CairText2Image, png_bytes  # noqa: E402

REQUEST_TIMEOUT_S = 6  # the server's; the heavy request below would take about 20 s
CLIENT_TIMEOUT_S = 60
RETRY_AFTER_S = 2
MAX_IMAGES_HELD = 24  # the 16 concurrent requests (20 images) fit; a burst of 48 behind a busy replica does not
BODY_TIMEOUT_S = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _call(url: str, body: bytes | dict | None = None) -> tuple[int, Message, object]:
    """POST (with a body) or GET on loopback: (status, headers (case-insensitive), JSON or text)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT_S) as response:
            status, headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, headers, raw = error.code, error.headers, error.read()
    try:
        return status, headers, json.loads(raw)
    except ValueError:
        return status, headers, raw.decode(errors="replace")


SERVER_FLAGS = ["--max-ongoing-images", str(MAX_IMAGES_HELD), "--retry-after-s", str(RETRY_AFTER_S),
                "--request-timeout-s", str(REQUEST_TIMEOUT_S), "--body-timeout-s", str(BODY_TIMEOUT_S)]


class Server:
    def __init__(self, engine: Path, flags: list[str] = SERVER_FLAGS):
        self.engine, self.port = engine, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(engine.parent / f"cair-serve-{self.port}.log", "w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cair_runtime.serve.cli", str(engine), "--host", "127.0.0.1", "--port", str(self.port),
             "--num-cpus", "2", "--batch-wait-ms", "50", "--max-steps", "1000", "--threads", "1", *flags],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self, limit_s: float = 120) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"cair-serve exited {self.process.returncode}:\n{self.output()[-3000:]}")
            try:
                if _call(self.url + "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"cair-serve not ready after {limit_s} s:\n{self.output()[-3000:]}")

    def stop(self, limit_s: float = 90) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(limit_s)
            except subprocess.TimeoutExpired:
                self.process.kill()  # a hang is a failure, but never a leftover process
                self.process.wait(30)
                raise AssertionError(f"cair-serve did not stop within {limit_s} s of SIGTERM")
        return self.process.returncode


@pytest.fixture(scope="module")
def shapes(exported):
    return exported("shapes", with_pipeline=True)


@pytest.fixture(scope="module")
def server(shapes):
    server = Server(shapes)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        server.log.close()


@pytest.fixture(scope="module")
def direct(shapes):
    with CairText2Image(shapes, threads=1) as pipeline:
        yield pipeline


def _generate(server: Server, body: dict | bytes) -> tuple[int, Message, dict]:
    return _call(server.url + "/v1/images/generations", body)


def _pngs(payload: dict) -> list[bytes]:
    return [base64.b64decode(item["b64_json"]) for item in payload["data"]]


def _direct_pngs(pipeline: CairText2Image, body: dict) -> list[bytes]:
    width, height = map(int, body.get("size", "64x64").split("x"))
    result = pipeline(body["prompt"], body.get("negative_prompt"), num_images_per_prompt=body.get("n", 1),
                      height=height, width=width, num_inference_steps=body["steps"], cache_step=body.get("cache_step"),
                      guidance_stop=body.get("guidance_stop"), deep_interval=body.get("deep_interval"),
                      skip_mode=body.get("skip_mode"),
                      guidance_scale=float(body.get("guidance_scale", 7.5)), scheduler=body.get("scheduler"),
                      seed=body["seed"])
    return [png_bytes(image, parameters) for image, parameters in zip(result.images, result.parameters)]


PROMPTS = ["a small red circle on a white background", "a large blue square left of a green triangle",
           "a purple hexagon", "a yellow star on a black background"]


def _concurrent_bodies() -> list[dict]:
    """16 requests: two sizes, two schedulers, n of 1 and 2, negative prompts, and each of the first four twice."""
    bodies = []
    for i in range(12):
        body = {"prompt": PROMPTS[i % 4], "steps": 4, "seed": 100 + i, "n": 1 + (i % 3 == 0),
                "size": "64x64" if i % 2 else "48x64"}
        if i % 4 == 1:
            body["negative_prompt"] = "blurry"
        if i % 5 == 2:
            body.update(scheduler="euler-ancestral", cache_step=2, guidance_stop=2, deep_interval=1)
        bodies.append(body)
    return bodies + [dict(body) for body in bodies[:4]]


def test_concurrent_requests_are_batched_and_equal_direct_calls(server, direct):
    bodies = _concurrent_bodies()
    before = _call(server.url + "/health")[2]["this_replica"]
    barrier = threading.Barrier(len(bodies))

    def send(body):
        barrier.wait(10)  # all 16 leave together
        return _generate(server, body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(send, bodies))
    for body, (status, _, payload) in zip(bodies, answers):
        assert status == 200, payload
        assert [item["seed"] for item in payload["data"]] == [body["seed"] + k for k in range(body.get("n", 1))]
        assert payload["parameters"]["size"] == body["size"] and isinstance(payload["created"], int)
        width, height = map(int, body["size"].split("x"))
        for png, item in zip(_pngs(payload), payload["data"]):
            image = Image.open(io.BytesIO(png))
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (width, height)
            assert json.loads(image.text["parameters"])["seed"] == item["seed"]
            assert image.text["prompt"] == body["prompt"]
    for k in range(4):  # identical requests, identical bytes
        assert _pngs(answers[12 + k][2]) == _pngs(answers[k][2])
    for body, (_, _, payload) in zip(bodies[:12], answers):  # whatever shared their batch
        assert _pngs(payload) == _direct_pngs(direct, body), body
    after = _call(server.url + "/health")[2]["this_replica"]
    images = after["images"] - before["images"]
    assert images == sum(body["n"] for body in bodies)
    assert after["engine_batches"] - before["engine_batches"] < images  # compatible requests ran together


def test_a_b_a_gives_the_first_a_again(server):
    a = {"prompt": PROMPTS[0], "steps": 4, "seed": 7, "n": 2}
    b = {"prompt": PROMPTS[1], "steps": 5, "seed": 8, "size": "96x64", "scheduler": "dpm++2m"}
    first, middle, again = (_generate(server, body) for body in (a, b, a))
    assert first[0] == middle[0] == again[0] == 200
    assert _pngs(again[2]) == _pngs(first[2]) != _pngs(middle[2])


def test_models_and_health(server):
    status, _, payload = _call(server.url + "/v1/models")
    assert status == 200 and payload["object"] == "list"
    model = payload["data"][0]
    assert model["id"] == "shapes" and model["object"] == "model"
    assert model["cair"]["sizes"] == {"default": "64x64", "min": "32x32", "max": "128x128", "multiple_of": 4}
    assert model["cair"]["max_batch"] == 4 and model["cair"]["cache_step_hint"] == 5
    status, _, health = _call(server.url + "/health")
    assert status == 200 and health["status"] == "ok"
    queue = health["this_replica"]
    assert queue["max_held_images"] == MAX_IMAGES_HELD and queue["images_per_s_at_start"] > 0
    status, _, ready = _call(server.url + "/ready")
    assert status == 200 and ready["status"] == "ready"


def _assert_openai_error(status: int, headers: Message, payload: object, code: str | None) -> dict:
    assert isinstance(payload, dict) and set(payload["error"]) >= {"message", "type", "param", "code"}, payload
    assert payload["error"]["code"] == code and payload["error"]["message"], payload
    if status == 503:
        assert headers.get("Retry-After") == str(RETRY_AFTER_S), dict(headers)
    return payload["error"]


def test_ray_token_file_is_private(server):
    token = Path.home() / ".ray" / "auth_token"  # Ray 2.60 writes it for a new local cluster
    assert token.is_file() and token.stat().st_mode & 0o077 == 0, oct(token.stat().st_mode)


def test_every_error_has_the_openai_shape(server):
    status, headers, payload = _call(server.url + "/no/such/path")
    assert status == 404
    _assert_openai_error(status, headers, payload, None)
    status, headers, payload = _call(server.url + "/v1/images/generations")  # GET on a POST route
    assert status == 405
    _assert_openai_error(status, headers, payload, None)


LONG_PROMPT = " ".join(["red"] * 130)  # the shapes text encoder's windows hold 30 tokens; the export takes 4
BAD_REQUESTS = [  # (what, body, the field the error names)
    ("malformed JSON", b'{"prompt": "a red circle",', None),
    ("not an object", b'["a red circle"]', None),
    ("unknown field", {"prompt": "a", "quality": "hd"}, "quality"),
    ("missing prompt", {"n": 1}, "prompt"),
    ("prompt not a string", {"prompt": ["a", "b"]}, "prompt"),
    ("over-long prompt", {"prompt": LONG_PROMPT}, "prompt"),
    ("over-long negative prompt", {"prompt": "a", "negative_prompt": LONG_PROMPT}, "negative_prompt"),
    ("n zero", {"prompt": "a", "n": 0}, "n"),
    ("n above the limit", {"prompt": "a", "n": 5}, "n"),
    ("n as a string", {"prompt": "a", "n": "2"}, "n"),
    ("n fractional", {"prompt": "a", "n": 1.5}, "n"),
    ("size too large", {"prompt": "a", "size": "1024x1024"}, "size"),
    ("size not a multiple of the VAE factor", {"prompt": "a", "size": "66x64"}, "size"),
    ("size malformed", {"prompt": "a", "size": "64"}, "size"),
    ("NaN guidance", b'{"prompt": "a", "guidance_scale": NaN}', "guidance_scale"),
    ("guidance as a string", {"prompt": "a", "guidance_scale": "7.5"}, "guidance_scale"),
    ("negative seed", {"prompt": "a", "seed": -1}, "seed"),
    ("boolean seed", {"prompt": "a", "seed": True}, "seed"),
    ("url response format", {"prompt": "a", "response_format": "url"}, "response_format"),
    ("unknown scheduler", {"prompt": "a", "scheduler": "lms"}, "scheduler"),
    ("too few steps for the scheduler", {"prompt": "a", "scheduler": "pndm", "steps": 2}, "steps"),
    ("zero steps", {"prompt": "a", "steps": 0}, "steps"),
    ("steps above the limit", {"prompt": "a", "steps": 5000}, "steps"),
    ("cache step above steps", {"prompt": "a", "steps": 4, "cache_step": 9}, "cache_step"),
    ("guidance stop before n", {"prompt": "a", "steps": 4, "cache_step": 3, "guidance_stop": 2}, "guidance_stop"),
    ("planning interval zero", {"prompt": "a", "steps": 4, "planning_interval": 0}, "planning_interval"),
    ("deep interval zero", {"prompt": "a", "deep_interval": 0}, "deep_interval"),
    ("unknown skip mode", {"prompt": "a", "skip_mode": "random"}, "skip_mode"),
    ("another model", {"prompt": "a", "model": "dall-e-3"}, "model"),
]


def test_bad_requests_are_4xx_naming_the_field_and_the_replica_keeps_serving(server):
    for what, body, param in BAD_REQUESTS:
        status, _, payload = _generate(server, body)
        assert status == 400, (what, status, payload)
        error = payload["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, (what, error)
        assert param is None or param in error["message"], (what, error)
    status, _, payload = _generate(server, {"prompt": "n and size and seed", "n": 9, "size": "1x1", "seed": -3})
    assert status == 400 and [p["param"] for p in payload["error"]["problems"]] == ["n", "size", "seed"]
    status, _, payload = _generate(server, {"prompt": "red " * 40_000})
    assert status == 413 and "limited" in payload["error"]["message"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT_S) as sock:  # a lie, not read
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n{")
        assert sock.recv(65536).startswith(b"HTTP/1.1 413")
    assert _generate(server, {"prompt": PROMPTS[2], "steps": 2, "seed": 1})[0] == 200


def test_overload_is_503_with_retry_after_and_timeouts_cancel(server):
    # A heavy request (about 20 s of work) holds the replica until the server's timeout cancels it;
    # meanwhile a burst larger than the replica's slots plus the proxy's queue arrives.
    heavy = {"prompt": PROMPTS[3], "n": 4, "size": "128x128", "steps": 500, "seed": 5}
    burst = [{"prompt": PROMPTS[k % 4], "steps": 2, "seed": k} for k in range(48)]  # 28 past the limits
    with ThreadPoolExecutor(len(burst) + 1) as pool:
        started = time.monotonic()
        heavy_answer = pool.submit(_generate, server, heavy)
        _wait_for(lambda: _queue(server)["held_images"] == heavy["n"], "the heavy request runs")
        burst_answers = [pool.submit(_generate, server, body) for body in burst]
        # While the heavy request holds the engine nothing finishes: the replica fills up, and says so.
        _wait_for(lambda: _queue(server)["held_images"] == MAX_IMAGES_HELD, "the replica is full")
        ready = _call(server.url + "/ready")
        assert ready[0] == 503 and _assert_openai_error(*ready, "overloaded")
        answers = [answer.result() for answer in burst_answers]
        status, _, payload = heavy_answer.result()
        heavy_s = time.monotonic() - started
    assert status == 504 and payload["error"]["type"] == "timeout" and "cancelled" in payload["error"]["message"]
    assert payload["error"]["code"] == "request_timeout"
    assert REQUEST_TIMEOUT_S <= heavy_s < REQUEST_TIMEOUT_S + 10
    statuses = [answer[0] for answer in answers]
    assert set(statuses) <= {200, 503, 504}, statuses
    rejected = [answer for answer in answers if answer[0] == 503]
    # The replica holds the heavy request's 4 images and at least 20 more of the burst (more if some finish
    # while the burst arrives); the rest get a 503 at once, never a wait at the proxy.
    assert 0 < len(rejected) <= len(burst) - (MAX_IMAGES_HELD - heavy["n"]), statuses
    for answer in rejected:
        assert _assert_openai_error(*answer, "overloaded")["type"] == "server_error"
    # The cancelled work stopped: a new request is answered in seconds, not after the heavy one's 20 s.
    started = time.monotonic()
    assert _generate(server, {"prompt": PROMPTS[0], "steps": 2, "seed": 3})[0] == 200
    assert time.monotonic() - started < 10


def test_bad_flags_are_one_line_before_ray_starts(shapes, server, one_line_error):
    for argv, needle in (([str(shapes), "--port", str(server.port)], "cannot listen on 127.0.0.1"),
                         ([str(shapes / "missing")], "does not exist"),
                         ([str(shapes), "--autoscale", "3,1"], "autoscale"),
                         ([str(shapes), "--max-batch-size", "9"], "max batch 4"),
                         ([str(shapes), "--replicas", "2", "--autoscale", "1,2"], "not allowed with")):
        result = subprocess.run([sys.executable, "-m", "cair_runtime.serve.cli", *argv], capture_output=True,
                                text=True, timeout=60)
        one_line_error(result.returncode, result.stderr, needle, prog="cair-serve")


def test_a_served_png_replays_with_cair_run(server, shapes, tmp_path, replay):
    """A request that leaves the schedule to the engine: the PNG it gets back records the resolved
    schedule, and ``cair-run`` with those parameters gives the same pixels."""
    status, _, payload = _generate(server, {"prompt": PROMPTS[1], "steps": 5, "seed": 11, "negative_prompt": "blurry"})
    assert status == 200, payload
    served, again = tmp_path / "served.png", tmp_path / "again.png"
    served.write_bytes(_pngs(payload)[0])
    recorded = json.loads(Image.open(served).text["parameters"])
    assert {"cache_step", "guidance_stop", "deep_interval", "skip_mode"} <= set(recorded)
    assert replay(shapes, served, again) == (0, "")
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(served)))


def _wait_for(condition, what: str, limit_s: float = 60):
    """Poll ``condition()`` until it is true: tests wait for events, not for fixed times."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {limit_s} s: {what}")


def _read_answer(sock: socket.socket, needle: bytes) -> bytes:
    """What the server sends on a raw connection, up to ``needle`` (or until it closes the connection)."""
    answer = b""
    while needle not in answer:
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    return answer


def _queue(server: Server) -> dict:
    status, _, payload = _call(server.url + "/health")
    assert status == 200, payload
    return payload["this_replica"]


def test_health_and_a_generation_keep_their_time_beside_200_idle_connections(server):
    body = {"prompt": PROMPTS[0], "steps": 4, "seed": 21}

    def timed(call):
        started = time.monotonic()
        answer = call()
        return answer, time.monotonic() - started

    (health, health_s), (generation, generation_s) = (timed(lambda: _call(server.url + "/health")),
                                                      timed(lambda: _generate(server, body)))
    assert health[0] == generation[0] == 200
    silent, waiting = [], []  # 100 connections that send nothing, 100 that send headers but not their body
    try:
        for _ in range(100):
            silent.append(socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT_S))
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT_S)
            sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 64\r\n\r\n{")
            waiting.append(sock)
        _wait_for(lambda: _queue(server)["reading_bodies"] == 100, "the replica reads 100 bodies")
        during_health, during_health_s = timed(lambda: _call(server.url + "/health"))
        during, during_s = timed(lambda: _generate(server, body))
        assert during_health[0] == during[0] == 200 and _pngs(during[2]) == _pngs(generation[2])
        # "Their usual time", with room for a shared, busy machine: a few times the same call before.
        assert during_health_s < max(1.0, 5 * health_s) and during_s < 3 * generation_s + 1.0, (
            health_s, during_health_s, generation_s, during_s)
        # A body that never comes frees its slot after the body timeout, with an OpenAI-shaped 408.
        for sock in waiting:
            answer = _read_answer(sock, b'"code":"body_timeout"')
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert _queue(server)["reading_bodies"] == 0
    finally:
        for sock in silent + waiting:
            sock.close()


def test_sigterm_drains_the_request_in_flight_then_stops(server):
    """Last in the module: stops the server."""
    # about 1 s of work on an idle machine (every step a guided planning step), inside the 6 s timeout on a busy one
    body = {"prompt": PROMPTS[1], "n": 4, "size": "64x64", "steps": 100, "cache_step": 100, "seed": 11}
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(_generate, server, body)
        _wait_for(lambda: _queue(server)["held_images"] == 4, "the request runs")
        assert server.stop() == 0
        status, _, payload = answer.result()
    assert status == 200 and len(payload["data"]) == 4
    assert "cair-serve: stopped" in server.output()


def test_sigterm_answers_every_request_queued_at_the_proxy(shapes):
    """One replica whose Serve slots are all taken, so later requests wait at the proxy; on SIGTERM the
    running requests complete and every other one gets a 503 with Retry-After, none a closed connection."""
    server = Server(shapes, ["--max-ongoing-images", "2", "--max-ongoing-requests", "4", "--max-queued-requests", "32",
                             "--retry-after-s", str(RETRY_AFTER_S), "--request-timeout-s", "300",
                             "--body-timeout-s", "300"])
    body = json.dumps({"prompt": PROMPTS[2], "steps": 2, "seed": 1}).encode()
    head = (f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    slow: list[socket.socket] = []
    try:
        server.wait_ready()
        with ThreadPoolExecutor(16) as pool:
            slow.append(socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT_S))
            slow[0].sendall(head)  # a body still arriving: one slot
            _wait_for(lambda: _queue(server)["reading_bodies"] == 1, "the replica reads the first slow body")
            # two running requests (about 7 s of work on an idle machine): two slots, and the image limit
            running = [pool.submit(_generate, server, {"prompt": PROMPTS[k], "size": "128x128", "steps": 600,
                                                       "cache_step": 600, "seed": 40 + k}) for k in range(2)]
            _wait_for(lambda: _queue(server)["held_images"] == 2, "both requests run")
            slow.append(socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT_S))
            slow[1].sendall(head)  # the fourth slot
            queued = [pool.submit(_generate, server, {"prompt": PROMPTS[k % 4], "steps": 2, "seed": k})
                      for k in range(8)]
            time.sleep(1.0)
            # Had they reached the replica, its full image queue would have answered them 503 at once.
            assert not any(future.done() for future in queued) and not any(future.done() for future in running)
            server.process.send_signal(signal.SIGTERM)
            _wait_for(lambda: "draining" in server.output(), "cair-serve starts draining")
            late = pool.submit(_generate, server, {"prompt": PROMPTS[0], "steps": 2, "seed": 99})
            for sock in slow:
                sock.sendall(body)
            slow_answers = [_read_answer(sock, b"}}") for sock in slow]
            for answer in running:
                status, _, payload = answer.result()
                assert status == 200 and len(payload["data"]) == 1, payload
            refused = [answer.result() for answer in [*queued, late]]
        for answer in slow_answers:
            assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 2" in answer.lower(), answer[:300]
        codes = []
        for status, headers, payload in refused:
            assert status == 503, (status, payload)
            codes.append(_assert_openai_error(status, headers, payload, payload["error"]["code"])["code"])
        assert set(codes) <= {"draining", "overloaded"} and "draining" in codes, codes
        assert server.process.wait(120) == 0 and "cair-serve: stopped" in server.output()
    finally:
        for sock in slow:
            sock.close()
        server.stop()
        server.log.close()


# --- ControlNet engines: the request checks and the replica's batch code, without Ray ---------------------------

CONTROL_NETS = ("tiny:100", "tiny:101")  # test_controlnet's engine: one export per session serves both modules


def _control_file(seed: int, size: int = 64, kind: str = "PNG", mode: str = "RGB", **options) -> bytes:
    """A random control map as the bytes of an image file."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=kind, **options)
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


CONTROL_FILES = [_control_file(0), _control_file(1, kind="JPEG")]
CONTROL = [_b64(data) for data in CONTROL_FILES]


def _replica(folder: Path):
    """A replica of ``folder`` without Ray: its validator and its batch code."""
    from cair_runtime.serve.app import CairImageService
    from cair_runtime.serve.config import ServiceConfig

    replica = CairImageService.func_or_class.__wrapped__  # the class Serve wraps; its __init__ needs a Serve replica
    service = replica.__new__(replica)
    service.config, service.max_batch_size = ServiceConfig(str(folder), threads=1), 4
    service.served = {"requests": 0, "images": 0, "engine_batches": 0}
    service.pipeline = CairText2Image(folder, threads=1)
    service.validator = RequestValidator(service.pipeline, max_images=4, max_steps=50)
    return service


@pytest.fixture(scope="module")
def controlled(exported):
    """A replica of a tiny engine with two ControlNets."""
    service = _replica(exported("tiny-sd15", with_pipeline=True, controlnets=CONTROL_NETS, validate=False))
    yield service
    service.pipeline.close()


def _parse(validator, body: dict):
    return validator.parse(json.dumps(body).encode())


def test_control_images_are_served_as_the_python_api_makes_them(controlled, tmp_path):
    """A base64 PNG and JPEG, one per net: the replica's batch code gives the pixels the Python API makes
    from the same files, and only requests with the same control images and settings share an engine call."""
    from cair_runtime.serve.app import _Ticket

    paths = [tmp_path / "c0.png", tmp_path / "c1.jpg"]
    for path, data in zip(paths, CONTROL_FILES):
        path.write_bytes(data)
    settings = {"control_scale": [0.8, 1.2], "control_guidance_end": [1.0, 0.5], "guess_mode": True}
    body = {"prompt": PROMPTS[0], "n": 2, "steps": 3, "cache_step": 2, "seed": 5, "control_image": CONTROL, **settings}
    same = {**body, "prompt": PROMPTS[1], "n": 1, "seed": 9}
    swapped = {**body, "control_image": CONTROL[::-1]}
    requests = [_parse(controlled.validator, b) for b in (body, same, swapped)]
    assert requests[0].batch_key == requests[1].batch_key != requests[2].batch_key
    before = controlled.served["engine_batches"]
    served = asyncio.run(controlled._run_batch([_Ticket(request) for request in requests]))
    assert controlled.served["engine_batches"] - before == 2  # body and same in one call, swapped alone
    for b, request, pngs, files in zip((body, same, swapped), requests, served, (paths, paths, paths[::-1])):
        direct = controlled.pipeline(b["prompt"], num_images_per_prompt=b["n"], num_inference_steps=3, cache_step=2,
                                     seed=b["seed"], control_image=files, control_scale=[0.8, 1.2],
                                     control_guidance_end=[1.0, 0.5], guess_mode=True)
        digests = [f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}" for path in files]
        assert request.parameters()["control"] == {"images": digests, "scale": [0.8, 1.2], "start": [0.0, 0.0],
                                                   "end": [1.0, 0.5], "guess_mode": True}
        assert len(pngs) == len(direct.images) == b["n"]
        for png, image, parameters in zip(pngs, direct.images, direct.parameters):
            with Image.open(io.BytesIO(png)) as decoded:
                np.testing.assert_array_equal(np.asarray(decoded), image)
                recorded = json.loads(decoded.text["parameters"])
            # The PNG records what the Python API records, the control images by their files' digests.
            expected = json.loads(json.dumps(parameters))
            assert recorded == {**expected, "control": {**expected["control"], "images": digests}}


def test_a_controlnet_replica_warms_up_and_says_what_it_takes(controlled, direct):
    from cair_runtime.serve.cli import _check_engine

    assert _check_engine(controlled.config) == "tiny-sd15"  # cair-serve starts on a ControlNet export
    assert controlled._measure_speed() > 0  # the warm-up requests carry blank control maps
    described = controlled.validator.describe()
    assert described["controlnets"] == 2 and described["max_body_bytes"] > 64 * 1024
    plain = RequestValidator(direct, max_images=4, max_steps=50).describe()
    assert plain["controlnets"] == 0 and plain["max_body_bytes"] == 64 * 1024


def test_the_body_limit_holds_uncompressed_pngs_at_the_max_size(controlled):
    largest = _b64(_control_file(2, size=128, compress_level=0))  # the engine's max size, stored uncompressed
    body = json.dumps({"prompt": "a", "size": "128x128", "steps": 2, "control_image": [largest] * 2}).encode()
    assert len(body) > 2 * 64 * 1024 and controlled.validator.parse(body).width == 128
    with pytest.raises(ApiError) as caught:
        controlled.validator.parse(body + b" " * (controlled.validator.max_body_bytes - len(body) + 1))
    assert caught.value.status == 413


CONTROL_BAD_REQUESTS = [  # (what, the control fields, the field the error names, the message's fragment)
    ("invalid base64", {"control_image": ["not base64!", CONTROL[1]]}, "control_image",
     "control_image[0] is not valid base64"),
    ("a PNG of the wrong size", {"control_image": [CONTROL[0], _b64(_control_file(3, size=32))]}, "control_image",
     "image control_image[1] is 32x32 px; expected 64x64"),
    ("a truncated PNG of the wrong size, refused before decoding",
     {"control_image": [CONTROL[0], _b64(_control_file(3, size=32)[:100])]}, "control_image",
     "image control_image[1] is 32x32 px; expected 64x64"),
    ("one image for two nets", {"control_image": CONTROL[0]}, "control_image", "1 control images for the engine's 2"),
    ("no control image", {}, "control_image", "0 control images for the engine's 2"),
    ("start not before end", {"control_image": CONTROL, "control_guidance_start": 0.6, "control_guidance_end": 0.4},
     "control_guidance_start", "need 0 <= start < end <= 1"),
    ("three scales for two nets", {"control_image": CONTROL, "control_scale": [1, 1, 1]}, "control_scale",
     "3 control_scale values for 2 ControlNets"),
    ("a scale as a string", {"control_image": CONTROL, "control_scale": "1"}, "control_scale", "finite number"),
    ("a scale past float64", {"control_image": CONTROL, "control_scale": [1, 10**400]}, "control_scale",
     "finite number"),
    ("guess mode as a string", {"control_image": CONTROL, "guess_mode": "true"}, "guess_mode", "true or false"),
    ("an image as a number", {"control_image": 7}, "control_image", "base64 of a PNG or JPEG"),
    ("an RGBA PNG", {"control_image": [CONTROL[0], _b64(_control_file(4, mode="RGBA"))]}, "control_image",
     "mode RGBA"),
    ("a GIF", {"control_image": [CONTROL[0], _b64(_control_file(5, kind="GIF"))]}, "control_image",
     "control_image[1] is not a PNG or JPEG file"),
    ("a truncated PNG", {"control_image": [CONTROL[0], _b64(CONTROL_FILES[0][:300])]}, "control_image",
     "cannot read image control_image[1]"),
]


@pytest.mark.parametrize("what, fields, param, message", CONTROL_BAD_REQUESTS,
                         ids=[row[0] for row in CONTROL_BAD_REQUESTS])
def test_bad_control_requests_are_400_naming_the_field(controlled, what, fields, param, message):
    with pytest.raises(ApiError) as caught:
        _parse(controlled.validator, {"prompt": "a", "steps": 2, **fields})
    error = caught.value
    assert error.status == 400 and error.param == param and message in error.message, error.message
    assert "\n" not in error.message and len(error.message) < 1000  # one line; the base64 is not echoed


def test_a_plain_engine_refuses_control_fields(direct):
    validator = RequestValidator(direct, max_images=4, max_steps=50)
    with pytest.raises(ApiError) as caught:
        _parse(validator, {"prompt": "a", "control_image": CONTROL[0], "guess_mode": True})
    assert caught.value.status == 400 and [param for param, _ in caught.value.problems] == ["control_image",
                                                                                            "guess_mode"]
    assert "exported without a ControlNet" in caught.value.message


# --- IP-Adapter engines: the same, with test_ip_adapter's export ---------------------------------------------------

IMAGE_PROMPT_FILES = [_control_file(6, size=40), _control_file(7, size=72, kind="JPEG")]  # any size: resized, cropped
IMAGE_PROMPT = [_b64(data) for data in IMAGE_PROMPT_FILES]


@pytest.fixture(scope="module")
def prompted(exported):
    """A replica of a tiny engine with an IP-Adapter."""
    service = _replica(exported("tiny-sd15", with_pipeline=True, ip_adapter="tiny", validate=False,
                                max_prompt_chunks=1))
    yield service
    service.pipeline.close()


def test_an_image_prompt_is_served_as_the_python_api_makes_it(prompted, tmp_path):
    """A base64 PNG and JPEG image prompt: the replica's batch code gives the pixels the Python API makes from
    the same file and seed; requests share an engine call only with the same image prompt and scale."""
    from cair_runtime.serve.app import _Ticket

    paths = [tmp_path / "style.png", tmp_path / "style.jpg"]
    for path, data in zip(paths, IMAGE_PROMPT_FILES):
        path.write_bytes(data)
    body = {"prompt": PROMPTS[0], "n": 2, "steps": 3, "cache_step": 2, "seed": 5,
            "ip_adapter_image": IMAGE_PROMPT[0], "ip_adapter_scale": 0.7}
    same = {**body, "prompt": PROMPTS[1], "n": 1, "seed": 9}
    other = {**body, "n": 1, "ip_adapter_image": IMAGE_PROMPT[1]}
    plain = {key: value for key, value in body.items() if not key.startswith("ip_adapter")}
    requests = [_parse(prompted.validator, b) for b in (body, same, other, plain)]
    rescaled = _parse(prompted.validator, {**body, "ip_adapter_scale": 1})
    assert requests[0].batch_key == requests[1].batch_key
    assert len({requests[0].batch_key, requests[2].batch_key, requests[3].batch_key, rescaled.batch_key}) == 4
    before = prompted.served["engine_batches"]
    served = asyncio.run(prompted._run_batch([_Ticket(request) for request in requests]))
    assert prompted.served["engine_batches"] - before == 3  # body and same in one call
    for b, request, pngs, path in zip((body, same, other, plain), requests, served, (*paths[:1], *paths, None)):
        direct = prompted.pipeline(b["prompt"], num_images_per_prompt=b["n"], num_inference_steps=3, cache_step=2,
                                   seed=b["seed"], ip_adapter_image=path, ip_adapter_scale=0.7)
        recorded = None if path is None else {"image": f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}",
                                              "scale": 0.7}
        assert request.parameters().get("ip_adapter") == recorded
        assert len(pngs) == len(direct.images) == b["n"]
        for png, image, parameters in zip(pngs, direct.images, direct.parameters):
            with Image.open(io.BytesIO(png)) as decoded:
                np.testing.assert_array_equal(np.asarray(decoded), image)
                # The PNG records what the Python API records, the image prompt by its file's digest.
                assert json.loads(decoded.text["parameters"]) == {**json.loads(json.dumps(parameters)),
                                                                  **({} if path is None else {"ip_adapter": recorded})}


def test_an_ip_adapter_replica_warms_up_and_says_what_it_takes(prompted, direct):
    assert prompted._measure_speed() > 0  # the warm-up requests have no image prompt
    described = prompted.validator.describe()
    assert described["ip_adapter"] is True and described["controlnets"] == 0
    assert described["max_body_bytes"] > 64 * 1024
    assert RequestValidator(direct, max_images=4, max_steps=50).describe()["ip_adapter"] is False


def _gray_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


IP_ADAPTER_BAD_REQUESTS = [  # (what, the IP-Adapter fields, the field the error names, the message's fragment)
    ("invalid base64", {"ip_adapter_image": "not base64!"}, "ip_adapter_image", "ip_adapter_image is not valid base64"),
    ("an image as a list", {"ip_adapter_image": IMAGE_PROMPT}, "ip_adapter_image", "base64 of a PNG or JPEG"),
    ("a GIF", {"ip_adapter_image": _b64(_control_file(5, kind="GIF"))}, "ip_adapter_image", "not a PNG or JPEG"),
    ("an RGBA PNG", {"ip_adapter_image": _b64(_control_file(4, mode="RGBA"))}, "ip_adapter_image", "mode RGBA"),
    ("a truncated PNG", {"ip_adapter_image": _b64(IMAGE_PROMPT_FILES[0][:300])}, "ip_adapter_image",
     "cannot read image ip_adapter_image"),
    ("a side past the limit", {"ip_adapter_image": _b64(_gray_png(8200, 8))}, "ip_adapter_image",
     "is 8200x8 px; images are read up to 8192"),
    ("a scale as a string", {"ip_adapter_image": IMAGE_PROMPT[0], "ip_adapter_scale": "1"}, "ip_adapter_scale",
     "finite number"),
    ("a scale past float64", {"ip_adapter_image": IMAGE_PROMPT[0], "ip_adapter_scale": -10**400},
     "ip_adapter_scale", "finite number"),
    ("a scale without an image", {"ip_adapter_scale": 0.5}, "ip_adapter_scale", "give ip_adapter_image too"),
    ("a scale with a null image", {"ip_adapter_image": None, "ip_adapter_scale": 0.5}, "ip_adapter_scale",
     "give ip_adapter_image too"),
]


@pytest.mark.parametrize("what, fields, param, message", IP_ADAPTER_BAD_REQUESTS,
                         ids=[row[0] for row in IP_ADAPTER_BAD_REQUESTS])
def test_bad_image_prompts_are_400_naming_the_field(prompted, what, fields, param, message):
    with pytest.raises(ApiError) as caught:
        _parse(prompted.validator, {"prompt": "a", "steps": 2, **fields})
    error = caught.value
    assert error.status == 400 and error.param == param and message in error.message, error.message
    assert "\n" not in error.message and len(error.message) < 1000  # one line; the base64 is not echoed


def test_a_plain_engine_refuses_image_prompts_and_a_huge_guidance_is_400(direct):
    validator = RequestValidator(direct, max_images=4, max_steps=50)
    with pytest.raises(ApiError) as caught:
        _parse(validator, {"prompt": "a", "ip_adapter_image": IMAGE_PROMPT[0], "ip_adapter_scale": 0.5})
    assert caught.value.status == 400 and [param for param, _ in caught.value.problems] == ["ip_adapter_image",
                                                                                            "ip_adapter_scale"]
    assert "exported without an IP-Adapter" in caught.value.message
    with pytest.raises(ApiError) as caught:  # a JSON integer past float64's range: a 400, not an OverflowError
        _parse(validator, {"prompt": "a", "guidance_scale": 10**400})
    assert caught.value.param == "guidance_scale" and "finite number" in caught.value.message
    assert len(caught.value.message) < 200  # its 401 digits are not echoed


# --- diffusion transformers: a PixArt-Sigma folder, through the same replica code -------------------------------


@pytest.mark.parametrize("preset, family, tokens", [("tiny-pixart-sigma", "pixart-sigma", 299),
                                                    ("tiny-sana", "sana", 298)])
def test_a_transformer_replica_serves_what_the_python_api_makes(exported, preset, family, tokens):
    """The replica's validator and batch code on a PixArt-Sigma and a Sana export: its warm-up, what /v1/models
    says (one 300-token window: 299 prompt tokens for T5's, 298 after Sana's instruction and start token), and
    PNGs equal to the Python API's images."""
    from cair_runtime.serve.app import _Ticket
    from cair_runtime.serve.cli import _check_engine

    service = _replica(exported(preset, with_pipeline=True))
    try:
        assert _check_engine(service.config) == preset
        assert service._measure_speed() > 0
        described = service.validator.describe()
        assert described["family"] == family and described["max_prompt_tokens"] == tokens
        bodies = [{"prompt": PROMPTS[0], "n": 2, "steps": 4, "cache_step": 2, "seed": 3},
                  {"prompt": PROMPTS[1], "n": 1, "steps": 4, "cache_step": 2, "seed": 8}]
        requests = [_parse(service.validator, body) for body in bodies]
        served = asyncio.run(service._run_batch([_Ticket(request) for request in requests]))
        for body, pngs in zip(bodies, served):
            direct = service.pipeline(body["prompt"], num_images_per_prompt=body["n"], num_inference_steps=4,
                                      cache_step=2, seed=body["seed"])
            assert len(pngs) == body["n"]
            for png, image in zip(pngs, direct.images):
                with Image.open(io.BytesIO(png)) as decoded:  # batched with the other request: fp32 rounding
                    # differs with the batch size, a level at most in a few pixels (Sana's DC-AE)
                    assert np.abs(np.asarray(decoded).astype(int) - image).max() <= 1
    finally:
        service.pipeline.close()
