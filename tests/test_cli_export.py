"""``cair-export`` from a user's seat: each bad input is one line, exit code 2, nothing written."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from cair_export.cli import main
from cair_export.core.models.presets import PRESETS


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _tiny_unet_folder(path, safe=True):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**PRESETS["tiny-sd15"].unet_config)
    unet.save_pretrained(path, safe_serialization=safe)
    return path


def test_missing_model_folder(tmp_path, capsys, one_line_error):
    code, _, err = _run(capsys, "export", str(tmp_path / "nope"), str(tmp_path / "out"))
    one_line_error(code, err, "neither a preset", "nope", prog="cair-export")
    assert not (tmp_path / "out").exists()


def test_malformed_model_folder(tmp_path, capsys, one_line_error):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model_index.json").write_text("{not json")
    code, _, err = _run(capsys, "export", str(folder), str(tmp_path / "out"))
    one_line_error(code, err, "model_index.json", "not readable JSON", prog="cair-export")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(capsys, "export", str(empty), str(tmp_path / "out"))
    one_line_error(code, err, "neither model_index.json", prog="cair-export")
    assert not (tmp_path / "out").exists()


def test_unet_without_cross_attention_is_refused(tmp_path, capsys, one_line_error):
    UNet2DModel(sample_size=8, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
                layers_per_block=1).save_pretrained(tmp_path / "unet2d")
    code, _, err = _run(capsys, "export", str(tmp_path / "unet2d"), str(tmp_path / "out"))
    one_line_error(code, err, "UNet2DModel", "no cross-attention", prog="cair-export")
    assert not (tmp_path / "out").exists()


def test_pickle_checkpoint_is_refused(tmp_path, capsys, one_line_error):
    folder = _tiny_unet_folder(tmp_path / "pickled", safe=False)
    assert (folder / "diffusion_pytorch_model.bin").exists()
    code, _, err = _run(capsys, "export", str(folder), str(tmp_path / "out"))
    one_line_error(code, err, "pickle", "safetensors only", prog="cair-export")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path, capsys, one_line_error):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = _run(capsys, "export", "tiny-sd15", str(out))
    one_line_error(code, err, "not empty", "--overwrite", prog="cair-export")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("flag,value", [("--height", "60"), ("--width", "100"), ("--height", "0")])
def test_size_not_multiple_of_8(tmp_path, capsys, flag, value, one_line_error):
    code, _, err = _run(capsys, "export", "tiny-sd15", str(tmp_path / "out"), flag, value)
    one_line_error(code, err, "multiple of 8", prog="cair-export")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("steps,cache_step", [("25", "0"), ("25", "26"), ("10", "-1")])
def test_cache_step_outside_1_to_T(capsys, steps, cache_step, one_line_error):
    code, _, err = _run(capsys, "macs", "sd15", "--steps", steps, "--cache-step", cache_step)
    one_line_error(code, err, "outside 1..", prog="cair-export")


def test_usage_errors_are_one_line():
    result = subprocess.run([sys.executable, "-m", "cair_export.cli", "export", "tiny-sd15"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "out_dir" in result.stderr


def test_local_unet_folder_exports(tmp_path, capsys):
    """A UNet folder in diffusers layout (safetensors) exports like a preset; the flags that leave parts out."""
    folder = _tiny_unet_folder(tmp_path / "unet")
    code, _, err = _run(capsys, "export", str(folder), str(tmp_path / "out"), "--fidelity-guidance", "none",
                        "--deep-branch", "none")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["model"]["source"] == str(folder)
    assert "validating planning -> fidelity handoff" in err
    # merged caches (batch B), no shallow graphs: the lean layout
    assert manifest["fidelity_guidance"] == "none" and manifest.get("deep_branch") is None
    assert set(manifest["graphs"]) == {"planning", "fidelity"}


def test_export_cli_writes_engine_folder(tmp_path):
    """The console script, as the README runs it."""
    result = subprocess.run(["cair-export", "export", "tiny-sd21", str(tmp_path / "engine")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert {"manifest.json", "planning.onnx", "fidelity.onnx", "shallow.onnx", "shallow_planning.onnx"} <= {
        p.name for p in (tmp_path / "engine").iterdir()}  # the default: every schedule runs on it


def test_exported_model_is_found_again_from_its_manifest(tmp_path):
    """build --backend aoti reloads the source model: presets, the shipped model and folders."""
    from cair_export.core.models.loading import load_exported_model

    assert load_exported_model({"name": "tiny-sd15", "source": "preset"}).name == "tiny-sd15"
    shipped = load_exported_model({"name": "shapes", "source": "shipped"})
    assert shipped.name == "shapes" and shipped.source == "shipped"
    folder = _tiny_unet_folder(tmp_path / "unet")
    assert load_exported_model({"name": "unet", "source": str(folder)}).source == str(folder)


@pytest.mark.parametrize("argv, needle", [
    (["demo", "--repeats", "0"], "expected a positive number"),
    (["build", "nowhere", "--backend", "aoti", "--device", "foo"], "invalid choice: 'foo'"),
    (["evaluate", "--classifier", "/nonexistent", "--num-images", "4", "--tgate-images", "0"],
     "cannot read the classifier's config in /nonexistent"),
    (["evaluate", "--threads", "-1", "--num-images", "4"], "--threads -1 at least 0"),
])
def test_measuring_commands_refuse_bad_input_before_work(capsys, argv, needle, one_line_error):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse rejects a flag's value itself
        code = exit_.code
    one_line_error(code, capsys.readouterr().err, needle, prog="cair-export")


def test_outputs_are_checked_before_the_work(tmp_path, capsys, one_line_error):
    """An output that cannot be written is refused up front, not after a long profile or evaluation."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    for argv in (["profile", "shapes", "--prompts", "cair_export/lab/prompts/shapes.txt", "--steps", "3",
                  "--json", str(blocker / "out.json")],
                 ["evaluate", "--num-images", "4", "--plot", str(blocker / "out.png")],
                 ["demo", "--output", str(tmp_path)]):
        code, _, err = _run(capsys, *argv)
        one_line_error(code, err, prog="cair-export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
