"""MAC counting against torch's FlopCounterMode (an independent counter) and the cost model."""

import json

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

from cair_export.cli import main
from cair_export.core.macs import GraphMacs, count_graph_macs, count_pipeline_macs, generation_macs
from cair_export.core.models import load_model
from cair_export.core.reference import CrossAttentionCache, cross_attention_sites


def _flop_counter_macs(unet, sample, context, added=None, replay=None):
    """MACs by FlopCounterMode, with explicit (bmm) attention so its score matmuls are counted."""
    unet.set_attn_processor(AttnProcessor())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if replay is None:
            unet(sample, torch.tensor([10.0]), context, added_cond_kwargs=added)
        else:
            with CrossAttentionCache(unet) as cache:
                cache.mode, cache.values = "replay", replay
                unet(sample, torch.tensor([10.0]), None, added_cond_kwargs=added)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
def test_macs_match_flop_counter(preset):
    model = load_model(preset)
    counted = count_graph_macs(model, 64, 96)
    unet = model.unet
    added = ({"text_embeds": torch.zeros(2, 1280), "time_ids": torch.zeros(2, 6)}
             if model.added_conditions else None)
    planning = _flop_counter_macs(unet, torch.zeros(2, 4, 8, 12), torch.zeros(2, 77, unet.config.cross_attention_dim),
                                  added)
    assert counted["planning"].with_attention == planning
    half = {k: v[:1] for k, v in added.items()} if added else None
    replay = [torch.zeros(1, (8 // 2 ** s.level) * (12 // 2 ** s.level), s.channels)
              for s in cross_attention_sites(unet)]
    fidelity = _flop_counter_macs(unet, torch.zeros(1, 4, 8, 12), None, half, replay)
    assert counted["fidelity"].with_attention == fidelity
    # Conv/linear only is the same count without the attention-score matmuls.
    assert 0 < counted["planning"].attention < counted["planning"].with_attention


def test_generation_totals_follow_the_cost_model():
    model = load_model("tiny-sd21")
    per_graph = count_graph_macs(model, 64, 64)
    table = generation_macs(per_graph, steps=25, cache_step=5)
    for convention, row in table.items():
        p, f = row["planning"], row["fidelity"]
        assert row["baseline_total"] == 25 * p
        assert row["cair_total"] == 5 * p + 20 * f
        assert f < p / 2  # half the batch and no cross-attention
    baseline = generation_macs(per_graph, steps=25, cache_step=25)
    assert baseline["conv_linear"]["cair_total"] == baseline["conv_linear"]["baseline_total"]
    # End to end: what runs once per image (E) adds to both sides, so the bound shrinks towards 1.
    once = GraphMacs(conv_linear=1000, attention=10)
    end_to_end = generation_macs(per_graph, steps=25, cache_step=5, per_image=once)["conv_linear"]
    p, f = table["conv_linear"]["planning"], table["conv_linear"]["fidelity"]
    assert end_to_end["baseline_total"] == 25 * p + 1000 and end_to_end["cair_total"] == 5 * p + 20 * f + 1000
    assert 1 < end_to_end["speedup_bound"] < table["conv_linear"]["speedup_bound"]


def _ops_macs(counter: FlopCounterMode, names: set[str]) -> int:
    return sum(count for op, count in counter.get_flop_counts()["Global"].items()
               if op.__name__.split(".")[0] in names) // 2


def test_pipeline_macs_match_flop_counter():
    """Text encoder over prompt + negative (2 sequences) and VAE decoder: conv/linear against FlopCounterMode."""
    model = load_model("tiny-sd21", with_pipeline=True)
    counted = count_pipeline_macs(model, 64, 96)
    model.vae.set_attn_processor(AttnProcessor())  # explicit bmm, so its score matmuls are counted
    with torch.no_grad(), FlopCounterMode(display=False) as text:
        model.text_encoders[0].model(torch.zeros(2, model.text_len, dtype=torch.long))
    with torch.no_grad(), FlopCounterMode(display=False) as vae:
        model.vae.decode(torch.zeros(1, 4, 8, 12))
    linear_ops = {"convolution", "addmm", "mm"}
    assert counted.conv_linear == _ops_macs(text, linear_ops) + _ops_macs(vae, linear_ops)
    assert counted.attention == _ops_macs(vae, {"bmm", "baddbmm"}) > 0


def test_macs_cli_json_for_sd21_at_768(capsys):
    """The real SD-2.1 architecture, counted on the meta device (no weights allocated)."""
    assert main(["macs", "sd21", "--steps", "25", "--cache-step", "5", "--height", "768", "--width", "768",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for convention in ("conv_linear", "with_attention"):
        row = report[convention]
        assert set(row) >= {"planning", "fidelity", "baseline_total", "cair_total"}
        assert row["cair_total"] < row["baseline_total"]
    # Published figure for the SD-2.x UNet at 768 px: about 760 GMACs per batch-1 evaluation.
    assert 700e9 < report["conv_linear"]["planning"] / 2 < 800e9
