"""Signals as exceptions: SIGINT and SIGTERM unwind the stack, so every ``finally`` and clean-up runs.

Without this, SIGTERM ends the process at once and a temporary file or folder being renamed into
place stays behind. Used by ``cair-run`` and ``cair-export``.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt, so that every ``finally`` cleans up."""


def stop_on_signals() -> Callable[[], None]:
    """SIGINT raises KeyboardInterrupt and SIGTERM ``Terminated`` (once); returns what restores the handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # only the main thread may set handlers
    signals = (signal.SIGINT, signal.SIGTERM)

    def stop(signum, frame):
        for number in signals:  # a second signal must not interrupt the cleanup
            signal.signal(number, signal.SIG_IGN)
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated

    previous = {number: signal.getsignal(number) for number in signals}
    for number in signals:
        if previous[number] is not signal.SIG_IGN:  # a shell's background job ignores SIGINT: keep that
            signal.signal(number, stop)

    def restore() -> None:
        for number, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(number, handler)

    return restore
