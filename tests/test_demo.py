"""The demo: exports once, calibrates once, reuses both, writes the grid and the figures."""

import pytest
from PIL import Image

from cair_export.lab.demo import DEMO_PROMPTS, DemoConfig, run_demo
from cair_runtime.manifest import load_manifest
from cair_runtime.schedule import Schedule


def test_demo_exports_once_and_writes_grid(tmp_path):
    messages = []
    config = DemoConfig(model="tiny-sd21", engines_dir=tmp_path / "engines", output=tmp_path / "grid.png",
                        steps=4, cache_step=2, repeats=1, calibration_prompts=2)
    figures = run_demo(config, progress=messages.append)
    assert any("exporting tiny-sd21" in m for m in messages) and any("calibrating" in m for m in messages)
    columns = figures["columns"]
    assert list(columns) == ["baseline", "cair", "calibrated"]
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > 3 * 3 * 64 and grid.height > len(DEMO_PROMPTS) * 3 * 64  # three columns, upscaled 3x

    # The third column runs the schedule calibrate wrote, and its MAC bound is the one calibrate measured.
    section = load_manifest(tmp_path / "engines" / "tiny-sd21").schedule
    assert columns["calibrated"]["schedule"] == Schedule.from_record(section).parameters()
    assert columns["calibrated"]["mac_bound"] == pytest.approx(section["evidence"]["speedup_bound"], rel=1e-9)
    assert columns["baseline"]["mac_bound"] == 1 and columns["cair"]["schedule"]["guidance_stop"] == 2
    for name in ("cair", "calibrated"):
        assert len(columns[name]["psnr_db"]) == len(DEMO_PROMPTS)
    cair = columns["cair"]
    assert cair["mac_bound"] > cair["mac_bound_end_to_end"] > 1  # once-per-image work dilutes the saving
    assert all(column["seconds"] > 0 for column in columns.values())

    messages.clear()
    run_demo(config, progress=messages.append)
    assert any("reusing" in m for m in messages)
    assert not any("exporting" in m or "calibrating" in m for m in messages)

