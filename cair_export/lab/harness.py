"""Pieces every measurement shares: what machine it ran on, the stamp on its report, alternating rounds."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_summary() -> str:
    """``"<processor>, <N> cores"``: the machine line of profile and evaluate reports."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def run_stamp(command: str) -> dict[str, str]:
    """What a saved report starts with: the command, the date (minutes) and the machine."""
    return {"command": command, "date": datetime.datetime.now().isoformat(timespec="minutes"),
            "machine": machine_summary()}


def alternate_rounds(runs: Mapping[Hashable, Callable[[], Any]], repeats: int,
                     record: Callable[[Hashable, int, float, Any], None], label: str = "") -> None:
    """Round 0 is a warm-up, then ``repeats`` rounds run every configuration once in turn, so drift hits them alike.

    ``record(key, round_index, seconds, result)`` sees every run, the warm-up included (round 0).
    """
    for round_index in range(repeats + 1):
        for key, run in runs.items():
            started = time.perf_counter()
            result = run()
            elapsed = time.perf_counter() - started
            tag = "warm-up" if round_index == 0 else f"round {round_index}/{repeats}"
            print(f"  [{label}] {key} {tag}: {elapsed:.3f} s", file=sys.stderr, flush=True)
            record(key, round_index, elapsed, result)
