"""Pieces every measurement shares: what machine it ran on and the stamp on its report."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path


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


def report_heading(title: str, figures: dict, command: str) -> list[str]:
    """A report's first lines: title, date, machine, run time and the command in a code block."""
    return [f"# {title}", "",
            f"Date: {figures['date']}. Machine: {figures['machine']} (shared with other jobs: latencies are "
            f"indicative). Run time {figures['seconds'] / 60:.1f} min.", "", "```", command, "```", ""]
