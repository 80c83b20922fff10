"""The drain: how ``cair-serve`` tells every replica to stop taking work and learns when they are empty.

On SIGTERM, ``cair-serve`` starts the drain on a small named actor. Each replica polls it (a thread,
every ``POLL_S``) with what it holds; once it sees the drain it answers new generations with a 503
and ``Retry-After`` while it finishes the ones it accepted. ``cair-serve`` shuts Serve down only
when every replica is empty and has had no new generation for ``QUIET_S``: requests that were still
waiting at a proxy when the drain began reach a replica within that time (Serve's router retries a
full replica at most every 0.5 s) and get their 503 instead of a closed connection.

Without ``cair-serve`` (``serve run``, a RayService) there is no such actor, and Serve's own
graceful shutdown applies.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import ray

ACTOR_NAME = "cair-serve-drain"
NAMESPACE = "cair-serve"
POLL_S = 0.25  # how often a replica reports; a new request may be accepted this long after the drain began
QUIET_S = 2.0  # no new generation for this long, and nothing held: the replica is drained


@ray.remote(num_cpus=0)
class DrainControl:
    """Whether a drain has begun, and what each replica last reported."""

    def __init__(self) -> None:
        self.draining_since: float | None = None
        self.reports: dict[str, tuple[float, bool, int, float]] = {}  # replica -> (time, saw drain, held, quiet s)

    def report(self, replica: str, held: int, quiet_s: float) -> bool:
        draining = self.draining_since is not None
        self.reports[replica] = (time.monotonic(), draining, held, quiet_s)
        return draining

    def start(self) -> None:
        if self.draining_since is None:
            self.draining_since = time.monotonic()

    def state(self) -> dict[str, Any]:
        """``drained``: every replica heard lately saw the drain, holds nothing and has been quiet."""
        now = time.monotonic()
        fresh = {replica: report for replica, report in self.reports.items() if now - report[0] < 4 * POLL_S + 1}
        drained = (self.draining_since is not None and bool(fresh)
                   and all(saw and held == 0 and quiet_s >= QUIET_S for _, saw, held, quiet_s in fresh.values()))
        return {"drained": drained, "replicas": len(fresh), "held": sum(report[2] for report in fresh.values())}


def start_control() -> Any:
    """The control actor for this cluster (``cair-serve`` calls this before it runs the application)."""
    return DrainControl.options(name=ACTOR_NAME, namespace=NAMESPACE, get_if_exists=True).remote()


def watch_drain(replica: str, status: Callable[[], tuple[int, float]], on_drain: Callable[[], None]) -> bool:
    """In a replica: report ``status()`` (held images, quiet seconds) to the control actor from a daemon
    thread and call ``on_drain`` once when the drain begins. False when there is no control actor."""
    try:
        control = ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        return False

    def poll() -> None:
        drained_seen = False
        while True:
            try:
                if ray.get(control.report.remote(replica, *status()), timeout=10) and not drained_seen:
                    drained_seen = True
                    on_drain()
            except ray.exceptions.GetTimeoutError:  # a busy machine: report again
                continue
            except ray.exceptions.RayError:  # the control actor is gone (the server is stopping)
                return
            time.sleep(POLL_S)

    threading.Thread(target=poll, name="cair-drain-watch", daemon=True).start()
    return True
