"""``cair-export calibrate``: convergence measured on the engine, the probe's rule, the schedule runs use by default."""

import dataclasses
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from cair_export.cli import main
from cair_export.core.macs import count_graph_macs, generation_macs, manifest_model
from cair_export.core.models import load_model
from cair_export.lab.calibrate import CalibrateConfig, calibrate, candidates
from cair_export.lab.profile import ProfileConfig, profile_model
from cair_runtime.errors import InvalidInputError, ManifestError
from cair_runtime.manifest import MANIFEST_NAME, load_manifest
from cair_runtime.pipeline import CairEngine
from cair_runtime.schedule import Schedule
from cair_runtime.text2image import CairText2Image

STEPS = 6
LEAN = {"fidelity_guidance": "none", "deep_branch": None}  # merged caches, no shallow graphs
PROMPTS = ["a red circle", "a blue square on a white background", "a cat"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# probe prompts\n" + "\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def calibrated(exported, prompt_file, tmp_path_factory):
    """A copy of the default tiny-sd15 pipeline export (per-half caches, shallow graphs), calibrated at T = 8."""
    folder = tmp_path_factory.mktemp("calibrated") / "engine"
    shutil.copytree(exported("tiny-sd15", with_pipeline=True), folder)
    section = calibrate(CalibrateConfig(folder, prompt_file, steps=STEPS, min_psnr=20.0, deep_intervals=(1, 2)),
                        progress=lambda message: None)
    return folder, section


def test_convergence_on_the_engine_equals_the_torch_profiler(calibrated, exported, prompt_file):
    """The engine's planning caches, read after every step, give the profiler's series (torch, diffusers
    loop): per-half caches (fidelity CFG) and caches merged inside the graph alike."""
    _, section = calibrated
    size = {"height": section["evidence"]["height"], "width": section["evidence"]["width"]}
    profile = profile_model(ProfileConfig(model="tiny-sd15", prompts=prompt_file, steps=STEPS, batch=4, **size),
                            progress=lambda message: None)
    torch_series = profile["series"]["outputs"]["relative"]
    merged = calibrate(CalibrateConfig(exported("tiny-sd15", with_pipeline=True, **LEAN), prompt_file, steps=STEPS,
                                       write=False), progress=lambda message: None)
    for engine_series in (section["evidence"]["convergence"], merged["evidence"]["convergence"]):
        assert engine_series["steps"] == torch_series["steps"] == list(range(2, profile["evaluations"] + 1))
        np.testing.assert_allclose(engine_series["mean_relative_change"], torch_series["mean"], rtol=2e-3)


def test_the_rule_picks_the_cheapest_schedule_over_the_bound(calibrated):
    """The walk probes the candidates cheapest first and stops at the first over the bound: that one
    is the cheapest candidate over the bound, since every cheaper one was probed and fell short."""
    folder, section = calibrated
    evidence = section["evidence"]
    rows = evidence["candidates"]
    grid = candidates(evidence["converged_step"], STEPS, True, True, (1, 2), guided_shallow=True)
    assert evidence["candidate_count"] == len(grid) and any(s.planning_interval > 1 for s in grid)
    assert any(s.cache_step == STEPS and s.planning_interval == 2 for s in grid)  # DeepCache's own point
    probed = [Schedule.from_record(r) for r in rows]
    assert set(probed) <= set(grid) and len(set(probed)) == len(probed)
    costs = [r["gmacs_per_image"] for r in rows]
    assert costs == sorted(costs)
    assert evidence["met"]
    chosen = Schedule.from_record(section)
    first = next(r for r in rows if r["meets_bound"])
    assert all(not r["meets_bound"] for r in rows if r["gmacs_per_image"] < first["gmacs_per_image"])
    assert Schedule.from_record(first).cache_step == chosen.cache_step and first["gmacs_per_image"] == min(
        r["gmacs_per_image"] for r in rows if r["meets_bound"])
    assert all(r["gmacs_per_image"] <= first["gmacs_per_image"] for r in rows)  # nothing dearer was probed
    assert evidence["frontier"] and all(r in rows for r in evidence["frontier"])
    # The written manifest carries the section, and it passes the schema.
    assert load_manifest(folder).schedule == json.loads(json.dumps(section))


def test_candidate_macs_are_the_models_own_count(calibrated):
    """MACs counted on the manifest's UNet config equal those of the model the folder was exported from."""
    folder, section = calibrated
    height, width = section["evidence"]["height"], section["evidence"]["width"]
    branch = load_manifest(folder).deep_branch["branch"]
    model_count = count_graph_macs(load_model("tiny-sd15", device="meta"), height, width, fidelity_guidance="cfg",
                                   deep_branch_id=branch)
    manifest_count = count_graph_macs(manifest_model(load_manifest(folder)), height, width, fidelity_guidance="cfg",
                                      deep_branch_id=branch)
    assert manifest_count == model_count
    for row in section["evidence"]["candidates"]:
        expected = generation_macs(model_count, STEPS, row["cache_step"], fidelity_guidance="cfg",
                                   guidance_stop=row["guidance_stop"], deep_interval=row["deep_interval"],
                                   planning_interval=row["planning_interval"])
        assert row["gmacs_per_image"] * 1e9 == pytest.approx(expected["conv_linear"]["cair_total"])


def test_runs_use_the_calibrated_schedule_for_what_they_leave_unset(calibrated):
    folder, section = calibrated
    n, m, k, k_p = (section[key] for key in ("cache_step", "guidance_stop", "deep_interval", "planning_interval"))
    with CairText2Image(folder) as pipe:
        default = pipe("a red circle", num_inference_steps=STEPS, seed=3)
        explicit = pipe("a red circle", num_inference_steps=STEPS, seed=3, cache_step=n, guidance_stop=m,
                        deep_interval=k, planning_interval=k_p, skip_mode="uniform")
        baseline = pipe("a red circle", num_inference_steps=STEPS, seed=3, cache_step=STEPS, planning_interval=1)
        assert pipe.engine.resolve_schedule({"steps": STEPS}) == Schedule(STEPS, n, m, k, "uniform",
                                                                          planning_interval=k_p)
    np.testing.assert_array_equal(default.latents, explicit.latents)
    assert default.parameters[0]["cache_step"] == n
    if (n, m, k, k_p) != (STEPS, STEPS, 1, 1):
        assert not np.array_equal(default.latents, baseline.latents)


def test_backends_without_schedules_keep_only_the_calibrated_n(calibrated):
    folder, section = calibrated
    with CairEngine(folder) as engine:
        engine.backend.schedules = False  # as TensorRT and AOTInductor: planning and fidelity only
        assert engine.resolve_schedule({"steps": STEPS}) == Schedule(STEPS, section["cache_step"], STEPS)


def test_other_step_counts_scale_n_and_m():
    manifest = SimpleNamespace(fidelity_guidance="cfg", model={}, graphs={"shallow": None}, schedule={
        "steps": 25, "cache_step": 6, "guidance_stop": 15, "deep_interval": 3, "skip_mode": "uniform"})

    def defaults(run):
        schedule = Schedule.defaults(manifest, None, run)
        return schedule.cache_step, schedule.guidance_stop, schedule.deep_interval, schedule.skip_mode

    assert defaults(25) == (6, 15, 3, "uniform")
    assert defaults(50) == (12, 30, 3, "uniform")
    assert defaults(10) == (2, 6, 3, "uniform")
    assert defaults(1) == (1, 1, 3, "uniform")
    manifest.schedule = {**manifest.schedule, "cache_step": 25, "guidance_stop": 25}
    assert defaults(40) == (40, 40, 3, "uniform")


def test_a_schedule_the_folder_cannot_run_is_refused(exported, tmp_path):
    folder = tmp_path / "engine"
    shutil.copytree(exported("tiny-sd15", with_pipeline=True, **LEAN), folder)  # merged caches, no shallow graph
    manifest = load_manifest(folder)
    for bad, needle in (({"cache_step": 5, "guidance_stop": 8, "deep_interval": 1}, "--fidelity-guidance cfg"),
                        ({"cache_step": 5, "guidance_stop": 5, "deep_interval": 2}, "shallow graph"),
                        ({"cache_step": 9, "guidance_stop": 9, "deep_interval": 1}, r"cache step 9 is outside 1\.\.8")):
        section = {"steps": 8, "skip_mode": "uniform", **bad}
        (folder / MANIFEST_NAME).write_text(dataclasses.replace(manifest, schedule=section).to_json())
        with pytest.raises(ManifestError, match=needle):
            load_manifest(folder)


def test_calibrate_from_the_cli(exported, prompt_file, tmp_path, capsys, one_line_error):
    folder = tmp_path / "engine"
    shutil.copytree(exported("shapes", with_pipeline=True), folder)
    before = (folder / MANIFEST_NAME).read_bytes()
    shapes_prompts = tmp_path / "shapes.txt"
    shapes_prompts.write_text("a small red circle at the bottom on a green background\n"
                              "a large purple square on the left on a gray background\n")
    code = main(["calibrate", str(folder), "--prompts", str(shapes_prompts), "--steps", "25", "--threshold", "0.1",
                 "--dry-run", "--json", str(tmp_path / "calibration.json")])
    out = capsys.readouterr().out
    assert code == 0 and "recommended: n=" in out and "not written" in out
    assert (folder / MANIFEST_NAME).read_bytes() == before  # --dry-run leaves the manifest alone
    written = json.loads((tmp_path / "calibration.json").read_text())
    assert written["evidence"]["prompts"] == 2 and written["steps"] == 25
    # The default export runs every candidate; the walk probes them cheapest first and stops at the first
    # over the bound, so every cheaper probe fell short.
    evidence = written["evidence"]
    converged = evidence["converged_step"]
    assert converged < 25  # shapes' cross-attention settles (10 % at step 5 in docs/convergence.md)
    assert evidence["candidate_count"] == len(candidates(converged, 25, True, True, (1, 2, 3, 4, 5), True))
    rows = evidence["candidates"]
    costs = [r["gmacs_per_image"] for r in rows]
    assert costs == sorted(costs) and rows
    chosen = min((r for r in rows if r["meets_bound"]), key=lambda r: r["gmacs_per_image"], default=None)
    assert chosen is None or all(not r["meets_bound"] for r in rows if r["gmacs_per_image"] < chosen["gmacs_per_image"])
    assert written["cache_step"] == (25 if chosen is None else chosen["cache_step"])
    for argv, needles in ((["calibrate", str(tmp_path / "missing"), "--prompts", str(prompt_file)], ("does not exist",)),
                          (["calibrate", str(folder), "--prompts", str(tmp_path / "none.txt")], ("cannot read",)),
                          (["calibrate", str(folder), "--prompts", str(prompt_file), "--deep-intervals", "0,2"],
                           ("deep intervals",)),
                          (["calibrate", str(folder), "--prompts", str(prompt_file), "--min-psnr", "-1"], ("--min-psnr",)),
                          (["export", "tiny-sd15", str(tmp_path / "out"), "--calibrate", str(tmp_path / "none.txt")],
                           ("cannot read",))):
        code = main(argv)
        one_line_error(code, capsys.readouterr().err, *needles, prog="cair-export")
    assert (folder / MANIFEST_NAME).read_bytes() == before and not (tmp_path / "out").exists()


def test_calibration_refuses_a_unet_only_folder(exported, prompt_file):
    with pytest.raises(InvalidInputError, match="UNet-only"):
        calibrate(CalibrateConfig(exported("tiny-sd15"), prompt_file, steps=4), progress=lambda message: None)


def test_a_png_replays_to_the_same_image_on_a_calibrated_folder(calibrated, tmp_path, replay, capsys):
    """The PNG records the schedule that ran (the calibrated defaults filled in), not the request: its
    parameters given back to ``cair-run`` give the same pixels, for text to image and image to image."""
    from PIL import Image

    from cair_runtime.cli import main

    folder, section = calibrated
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert main([str(folder), "a red circle", "-o", str(first), "--steps", str(STEPS), "--seed", "7"]) == 0
    recorded = json.loads(Image.open(first).text["parameters"])
    assert (recorded["cache_step"], recorded["guidance_stop"], recorded["deep_interval"]) == (
        section["cache_step"], section["guidance_stop"], section["deep_interval"])
    assert replay(folder, first, again) == (0, "")
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))

    init, edited, edited_again = tmp_path / "init.png", tmp_path / "edited.png", tmp_path / "edited-again.png"
    Image.fromarray(np.asarray(Image.open(first))[:, ::-1]).save(init)
    capsys.readouterr()
    assert main([str(folder), "a blue square", "-o", str(edited), "--steps", "10", "--image", str(init),
                 "--strength", "0.7", "--seed", "3"]) == 0
    recorded = json.loads(Image.open(edited).text["parameters"])
    assert recorded["strength"] == 0.7 and recorded["steps"] == 10
    assert replay(folder, edited, edited_again, "--image", str(init)) == (0, "")
    np.testing.assert_array_equal(np.asarray(Image.open(edited_again)), np.asarray(Image.open(edited)))
