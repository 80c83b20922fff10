"""A bounded pool of per-call backend contexts: how many generations share one engine at once.

Shared and read-only: a backend's sessions/engines, its weights, the manifest. Per call: a
context (IO bindings, cache and output buffers, TensorRT execution contexts, streams, CUDA
graphs). A call takes a context from the pool for its whole generation and gives it back;
contexts are created lazily, up to ``max_size``, and reused. When all are busy a call waits for
one. A pool of one is the global-lock case.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Callable, Generic, Iterator, Protocol, TypeVar

from cair_runtime.checks import is_integer
from cair_runtime.errors import EngineClosedError, InvalidInputError


class Closeable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closeable)


def default_concurrency(device: str) -> int:
    """Contexts per engine when the caller does not say: 2 on a GPU (one generation's host work
    overlaps the other's kernels), up to 4 on the CPU (the cores are shared by the sessions' pools,
    so more calls at once mostly add cache memory)."""
    return 2 if device.startswith("cuda") else max(1, min(4, os.cpu_count() or 1))


def check_concurrency(value: object) -> int:
    if not is_integer(value) or value < 1:
        raise InvalidInputError(f"max_concurrency {value!r} must be a positive integer")
    return value


class ContextPool(Generic[C]):
    """Up to ``max_size`` contexts made by ``create``; ``acquire()`` lends one for a ``with`` block."""

    def __init__(self, create: Callable[[], C], max_size: int):
        self._create = create
        self.max_size = check_concurrency(max_size)
        self._condition = threading.Condition()
        self._idle: list[C] = []
        self._live = 0  # created and not closed: idle + lent
        self._closed = False
        self.contexts: list[C] = []  # every live context, for inspection (tests, memory accounting)

    @contextmanager
    def acquire(self) -> Iterator[C]:
        with self._condition:
            while True:
                if self._closed:
                    raise EngineClosedError("this engine was closed; create a new one to run it again")
                if self._idle:
                    context = self._idle.pop()
                    break
                if self._live < self.max_size:
                    self._live += 1
                    context = None
                    break
                self._condition.wait()
        if context is None:
            try:
                context = self._create()
            except BaseException:
                with self._condition:
                    self._live -= 1
                    self._condition.notify()
                raise
            with self._condition:
                self.contexts.append(context)
        broken = True
        try:
            yield context
            broken = False
        finally:
            # A call that failed half-way may leave bindings half-set: such a context is not reused.
            self._give_back(context, discard=broken)

    def _give_back(self, context: C, discard: bool) -> None:
        with self._condition:
            discard = discard or self._closed
            if discard:
                self._live -= 1
                self.contexts.remove(context)
            else:
                self._idle.append(context)
            self._condition.notify_all()
        if discard:
            context.close()

    def discard_idle(self) -> None:
        """Close every idle context: the next calls get fresh ones (after the backend swapped its sessions)."""
        with self._condition:
            idle, self._idle = self._idle, []
            self._live -= len(idle)
            for context in idle:
                self.contexts.remove(context)
            self._condition.notify_all()
        for context in idle:
            context.close()

    def close(self) -> None:
        """Refuse new calls, wait for running ones to give their contexts back, close every context."""
        with self._condition:
            self._closed = True
            while self._live > len(self._idle):
                self._condition.wait()
            idle, self._idle, self._live, self.contexts = self._idle, [], 0, []
        for context in idle:
            context.close()

    @property
    def closed(self) -> bool:
        return self._closed


class CallGate:
    """Calls in flight on an object shared by threads: ``close()`` refuses new calls and waits for running ones.

    For work outside a pooled context (a pipeline's text encoding and decoding), so that closing
    never pulls a session from under a running call.
    """

    def __init__(self, what: str):
        self._what = what
        self._condition = threading.Condition()
        self._running = 0
        self._closed = False

    @contextmanager
    def enter(self) -> Iterator[None]:
        with self._condition:
            if self._closed:
                raise EngineClosedError(f"{self._what} was closed; create a new one to run it again")
            self._running += 1
        try:
            yield
        finally:
            with self._condition:
                self._running -= 1
                self._condition.notify_all()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            while self._running:
                self._condition.wait()
