"""The demo: exports once, reuses the export, writes the grid and the figures."""

from PIL import Image

from cair_export.lab.demo import DEMO_PROMPTS, DemoConfig, run_demo


def test_demo_exports_once_and_writes_grid(tmp_path):
    messages = []
    config = DemoConfig(model="tiny-sd21", engines_dir=tmp_path / "engines", output=tmp_path / "grid.png",
                        steps=4, cache_step=2, repeats=1)
    figures = run_demo(config, progress=messages.append)
    assert any("exporting tiny-sd21" in m for m in messages)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > 2 * 64 and grid.height > len(DEMO_PROMPTS) * 64
    assert len(figures["psnr_db"]) == len(DEMO_PROMPTS)
    assert figures["mac_bound"] > figures["mac_bound_end_to_end"] > 1  # once-per-image work dilutes the saving
    assert figures["baseline_s"] > 0 and figures["cair_s"] > 0
    messages.clear()
    run_demo(config, progress=messages.append)
    assert any("reusing" in m for m in messages) and not any("exporting" in m for m in messages)
