"""The schedule grid of ``cair-export evaluate``: parsing, Pareto arithmetic, DeepCache's MACs, one tiny run."""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cair_export.cli import main
from cair_export.core.export import ExportConfig, export_model
from cair_export.core.macs import (count_deepcache_macs, count_graph_macs, deepcache_generation_macs,
                                   generation_macs)
from cair_export.core.models import load_model
from cair_export.lab.evaluate import EvaluateConfig, engine_folder, evaluate, lean_export
from cair_export.lab.schedules import (CAIR, DEEPCACHE, SCHEDULE, GridPoint, cheaper_and_as_good, cheapest_within,
                                       dominates, format_schedules_markdown, pareto_analysis, pareto_front,
                                       parse_schedules)
from cair_runtime.errors import InvalidInputError
from cair_runtime.schedule import Schedule


def test_schedules_parse_sets_shorthands_and_drop_only_implied_m_below_n():
    assert parse_schedules("{3,10}:{n,5,T}:2") == (GridPoint(3, 3, 2), GridPoint(3, 5, 2), GridPoint(3, None, 2),
                                                    GridPoint(10, 10, 2), GridPoint(10, None, 2))
    assert parse_schedules("5:T:3:non-uniform, 5:n:1,5:5:1") == (GridPoint(5, None, 3, "non-uniform"),
                                                                 GridPoint(5, 5, 1))
    # T resolves to the steps; k = 1 or n = T runs no shallow step, so its mode is moot.
    assert GridPoint(5, None, 1, "non-uniform").schedule(25) == Schedule(25, 5, 25, 1, "uniform")
    assert GridPoint(25, None, 4).schedule(25) == Schedule(25, 25, 25, 1)
    for text, needle in (("5:3:1", "before cache step 5"), ("5:x:1", "'x' is not a whole number"), ("5:n", "2 fields"),
                         ("{3,5:n:1", "not closed"), ("5:n:0", "at least 1"), ("5:n:1:sideways", "'sideways'"),
                         ("{}:n:1", "empty or malformed"), ("", "no schedule"), ("{10,12}:{5,8}:1", "leave nothing")):
        with pytest.raises(InvalidInputError, match=needle):
            parse_schedules(text)


def _row(method, gmacs, shape, colour, fid, n=5, m=5, k=1):
    return {"method": method, "cache_step": n, "guidance_stop": m, "deep_interval": k, "skip_mode": "uniform",
            "images": 1000, "gmacs_per_image": gmacs, "fid": fid,
            "accuracy": {"shape": shape, "colour": colour, "all": shape * colour}}


def test_pareto_front_and_peer_dominance_on_constructed_rows():
    base = _row(CAIR, 2.7, 0.96, 0.99, 25.0, n=25, m=25)
    cair5 = _row(CAIR, 1.6, 0.85, 0.96, 34.0)
    dc3 = _row(DEEPCACHE, 1.1, 0.94, 0.99, 26.0, n=0, m=25, k=3)
    better = _row(SCHEDULE, 1.2, 0.86, 0.97, 33.0, n=7, m=7, k=2)  # beats CAIR n=5: as good, cheaper
    tie_cost = _row(SCHEDULE, 1.6, 0.90, 0.97, 30.0, n=5, m=25, k=2)  # better than CAIR n=5 at its cost
    worse_fid = _row(SCHEDULE, 1.0, 0.95, 0.995, 26.5, n=3, m=25, k=3)  # cheaper than DC k=3, FID worse
    rows = [base, cair5, dc3, better, tie_cost, worse_fid]
    assert dominates(better, cair5) and not dominates(cair5, better)
    assert dominates(tie_cost, cair5) and not dominates(better, tie_cost)  # shape 0.86 < 0.90
    assert not dominates(base, base)  # nothing dominates itself
    assert not dominates(worse_fid, dc3) and not dominates(dc3, worse_fid)  # each better in something
    assert pareto_front(rows) == [worse_fid, dc3, base]  # DeepCache k = 3 dominates the two 1.2 / 1.6 schedules
    # Beating a peer needs fewer MACs: tie_cost is better than CAIR n = 5 but costs the same.
    assert cheaper_and_as_good(cair5, [better, tie_cost, worse_fid]) == [worse_fid, better]
    assert cheaper_and_as_good(dc3, [better, tie_cost, worse_fid]) == []  # FID 26.5 > 26.0
    # Within 1 point of 96 %: 95 % qualifies (worse_fid), 94 % (DeepCache) is not a runtime schedule anyway.
    assert cheapest_within(rows, base, 1.0) is worse_fid
    analysis = pareto_analysis(rows, steps=25)
    assert analysis["cheapest_within"]["label"] == "n=3 m=25 k=3"
    assert analysis["cheapest_within"]["mac_reduction"] == pytest.approx(2.7) and analysis["target_met"]
    peers = {p["label"]: p for p in analysis["peers"]}
    assert peers["CAIR n=5"]["cheapest_better"]["label"] == "n=3 m=25 k=3"
    assert peers["DeepCache k=3"]["cheapest_better"] is None
    assert analysis["cheapest_within_by_method"][DEEPCACHE] is None  # 94 % is 2 points below
    with pytest.raises(InvalidInputError, match="n = T"):
        pareto_analysis([cair5, dc3], steps=25)


@pytest.fixture(scope="module")
def shapes():
    return load_model("shapes", device="meta")  # shapes only: counting needs no weights


@pytest.mark.parametrize("branch", [0, 3])  # 3: DeepCache's shallow step recomputes a cross-attention block
def test_deepcache_macs_match_its_own_helper_under_flop_counter(shapes, branch):
    """DeepCache's full and shallow evaluations, counted by FlopCounterMode over DeepCacheSDHelper itself."""
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    DeepCacheSDHelper = pytest.importorskip(
        "DeepCache", reason="the peer's own code: pip install --no-deps DeepCache==0.1.1").DeepCacheSDHelper

    counted = count_deepcache_macs(shapes, 64, 64, branch)
    unet = shapes.unet
    unet.set_attn_processor(AttnProcessor())  # explicit bmm: FlopCounterMode sees the score matmuls
    pipe = SimpleNamespace(unet=unet, scheduler=SimpleNamespace(timesteps=[981, 941]))
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=2, cache_branch_id=branch)
    helper.enable()
    sample = torch.zeros(2, 4, 16, 16, device="meta")
    text = torch.zeros(2, shapes.text_len, unet.config.cross_attention_dim, device="meta")
    try:  # the helper reads the step off the timestep's item(): a numpy scalar, the UNet's tensors on meta
        with torch.no_grad(), FlopCounterMode(display=False) as full:
            unet(sample, np.int64(981), text)  # step 0: full, keeps the deep feature
        with torch.no_grad(), FlopCounterMode(display=False) as shallow:
            unet(sample, np.int64(941), text)  # step 1 of interval 2: shallow
    finally:
        helper.disable()
    assert counted["full"].with_attention == full.get_total_flops() // 2
    assert counted["shallow"].with_attention == shallow.get_total_flops() // 2
    cfg = count_graph_macs(shapes, 64, 64, fidelity_guidance="cfg", deep_branch_id=branch)
    assert counted["full"] == cfg["planning"]  # DeepCache's full step is the planning graph
    # CAIR's shallow graph replays the cross-attention DeepCache recomputes: equal only where none is cut off.
    assert (counted["shallow"] == cfg["shallow"]) == (branch == 0)
    # T = 25, interval 3: full at steps 0, 3, ..., 24 (9), shallow at the 16 others, every one guided.
    row = deepcache_generation_macs(counted, 25, 3)["conv_linear"]
    assert row["deepcache_total"] == 9 * cfg["planning"].conv_linear + 16 * counted["shallow"].conv_linear
    every = deepcache_generation_macs(counted, 25, 1)["conv_linear"]
    assert every["deepcache_total"] == generation_macs(cfg, 25, 25, fidelity_guidance="cfg")["conv_linear"]["baseline_total"]


def test_cair_alone_costs_the_same_on_the_schedule_export(shapes):
    plain = count_graph_macs(shapes, 64, 64)
    cfg = count_graph_macs(shapes, 64, 64, fidelity_guidance="cfg", deep_branch_id=0)
    for n in (1, 5, 25):
        assert (generation_macs(cfg, 25, n, fidelity_guidance="cfg", guidance_stop=n)["conv_linear"]["cair_total"]
                == generation_macs(plain, 25, n)["conv_linear"]["cair_total"])


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """Both exports of shapes at batch 4 where evaluate looks for them (unvalidated: the export's tests validate)."""
    folder = tmp_path_factory.mktemp("engines")
    model = load_model("shapes", with_pipeline=True)
    config = EvaluateConfig(engines_dir=folder, max_batch=4)
    log = logging.getLogger("export").info
    export_model(model, engine_folder(config, False), dataclasses.replace(lean_export(config), validate=False),
                 progress=log)
    export_model(model, engine_folder(config, True), ExportConfig(max_batch=4, validate=False), progress=log)
    return folder


COMMON = dict(num_images=4, max_batch=4, steps=4, cache_steps=(2,), threads=1, tgate_images=0)


def test_cair_alone_on_the_schedule_engine_is_plain_cair(engines):
    messages = []
    plain = evaluate(EvaluateConfig(engines_dir=engines, **COMMON), progress=messages.append)
    grid = evaluate(EvaluateConfig(engines_dir=engines, **COMMON, schedules=parse_schedules("2:n:1,2:T:2,1:1:2")),
                    progress=messages.append)
    assert not any("exporting" in m for m in messages)  # both exports reused
    assert grid["plain_check"]["identical"] and grid["plain_check"]["cache_steps"] == [4, 2]
    plain_rows = {r["cache_step"]: r for r in plain["rows"]}
    cair_rows = {r["cache_step"]: r for r in grid["rows"] if r["method"] == CAIR}
    assert sorted(cair_rows) == sorted(plain_rows) == [2, 4]
    for n, row in cair_rows.items():
        assert (row["guidance_stop"], row["deep_interval"]) == (n, 1)
        for key in ("accuracy", "fid", "psnr_db", "ssim"):
            assert row[key] == plain_rows[n][key], (n, key)
        assert row["gmacs_per_image"] == pytest.approx(plain_rows[n]["gmacs_per_image"], rel=1e-12)
    # 2:n:1 is CAIR alone, measured once; the grid's own rows follow, in order.
    assert [(r["cache_step"], r["guidance_stop"], r["deep_interval"]) for r in grid["rows"]
            if r["method"] == SCHEDULE] == [(2, 4, 2), (1, 1, 2)]
    assert grid["pareto"]["baseline"]["label"] == "CAIR n=4"
    report = format_schedules_markdown(grid, "cair-export evaluate ...")
    assert "identical images" in report and "**Pareto front**" in report


def test_deepcache_every_step_is_the_baseline(engines):
    pytest.importorskip("DeepCache", reason="the peer's own code: pip install --no-deps DeepCache==0.1.1")
    grid = evaluate(EvaluateConfig(engines_dir=engines, **COMMON, deepcache_intervals=(1, 2), deepcache_images=4),
                    progress=lambda message: None)
    cair = {r["cache_step"]: r for r in grid["rows"] if r["method"] == CAIR}
    # DeepCache with interval 1 runs the full UNet every step from the same noise: the baseline, to rounding.
    deepcache = {r["deep_interval"]: r for r in grid["rows"] if r["method"] == DEEPCACHE}
    assert deepcache[1]["psnr_db"] > 45 and deepcache[1]["accuracy"] == cair[4]["accuracy"]
    assert deepcache[1]["gmacs_per_image"] == pytest.approx(cair[4]["gmacs_per_image"])
    assert deepcache[2]["gmacs_per_image"] < deepcache[1]["gmacs_per_image"]
    assert "DeepCache k=2" in format_schedules_markdown(grid, "cair-export evaluate ...")


def test_cli_refuses_a_malformed_schedule_in_one_line(capsys, one_line_error):
    with pytest.raises(SystemExit) as exit_:  # argparse refuses the flag's value before any work
        main(["evaluate", "--schedules", "5:x:1", "--num-images", "4"])
    one_line_error(exit_.value.code, capsys.readouterr().err, "--schedules", "'x' is not a whole number",
                   prog="cair-export evaluate")
    # Well formed but outside T: refused by the evaluation's own checks, before any work, also in one line.
    assert main(["evaluate", "--schedules", "30:T:1", "--num-images", "4"]) == 2
    one_line_error(2, capsys.readouterr().err, "cache step 30 is outside 1..25", prog="cair-export")
