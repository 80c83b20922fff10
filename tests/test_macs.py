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


def test_shallow_macs_match_flop_counter_and_the_schedule_follows_the_cost_model():
    """S by FlopCounterMode over the shallow evaluation; totals n*P + f*F + s*S, guided steps at 2x (DESIGN 9)."""
    from cair_export.core.deep_feature import deep_branch, shallow_unet
    from cair_export.core.graphs import cache_specs, shallow_caches

    model = load_model("tiny-sd15")
    unet = model.unet
    counted = count_graph_macs(model, 64, 96, deep_branch_id=1)
    branch = deep_branch(unet, 1)
    sites = cross_attention_sites(unet)
    kept = {c.name for c in shallow_caches(cache_specs(sites), branch)}
    replay = [torch.zeros(1, (8 // 2 ** s.level) * (12 // 2 ** s.level), s.channels) if s.name in kept else None
              for s in sites]
    unet.set_attn_processor(AttnProcessor())
    with torch.no_grad(), FlopCounterMode(display=False) as counter, CrossAttentionCache(unet) as cache:
        cache.mode, cache.values = "replay", replay
        shallow_unet(unet, branch, torch.zeros(1, 4, 8, 12), torch.tensor([10.0]),
                     torch.zeros(1, branch.channels, 8, 12), None)
    assert counted["shallow"].with_attention == counter.get_total_flops() // 2
    p, f, s = (counted[kind].conv_linear for kind in ("planning", "fidelity", "shallow"))
    assert s < f / 2
    # n = 5, k = 3 over 25 steps: fidelity steps 6, 9, ..., 24 full (7), 13 shallow.
    row = generation_macs(counted, steps=25, cache_step=5, deep_interval=3)["conv_linear"]
    assert row["cair_total"] == 5 * p + 7 * f + 13 * s
    # Guided up to m = 10 (CFG export: fidelity and shallow counted at 2B): steps 6..10 cost twice.
    cfg = count_graph_macs(model, 64, 96, fidelity_guidance="cfg", deep_branch_id=1)
    row = generation_macs(cfg, steps=25, cache_step=5, fidelity_guidance="cfg", guidance_stop=10,
                          deep_interval=3)["conv_linear"]
    # Full steps 6 and 9 and shallow 7, 8, 10 are guided; full 12..24 (5) and shallow 11, 13, 14, ..., 25 (10) are not.
    assert row["cair_total"] == 5 * p + 2 * (2 * f + 3 * s) + 5 * f + 10 * s


def test_macs_cli_json_counts_a_deep_schedule(capsys):
    assert main(["macs", "tiny-sd21", "--steps", "25", "--cache-step", "5", "--deep-interval", "3",
                 "--deep-branch", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["deep_interval"] == 3 and report["deep_branch"] == 1
    merged = generation_macs(count_graph_macs(load_model("tiny-sd21", device="meta"), 64, 64, fidelity_guidance="none",
                                              deep_branch_id=1), 25, 5, deep_interval=3)
    for convention in ("conv_linear", "with_attention"):
        row = report[convention]  # fidelity and shallow per unguided evaluation (batch B), whatever the layout
        assert row["cair_total"] == 5 * row["planning"] + 7 * row["fidelity"] + 13 * row["shallow"]
        assert {key: row[key] for key in merged[convention]} == merged[convention]


def test_deepcache_macs_match_its_own_helper_under_the_flop_counter():
    """DeepCache's full and shallow steps as its DeepCacheSDHelper runs them (guided, cross-attention computed)."""
    from types import SimpleNamespace

    from diffusers import DDIMScheduler

    DeepCacheSDHelper = pytest.importorskip(
        "DeepCache", reason="the peer's own code: pip install --no-deps DeepCache==0.1.1").DeepCacheSDHelper

    from cair_export.core.macs import count_deepcache_macs, deepcache_generation_macs

    model = load_model("tiny-sd21")
    unet = model.unet
    counted = count_deepcache_macs(model, 64, 96, deep_branch_id=0)
    assert counted["full"] == count_graph_macs(model, 64, 96)["planning"]
    scheduler = DDIMScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(2)
    helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=unet, scheduler=scheduler))
    helper.set_params(cache_interval=2, cache_branch_id=0)
    unet.set_attn_processor(AttnProcessor())
    sample, context = torch.zeros(2, 4, 8, 12), torch.zeros(2, 77, unet.config.cross_attention_dim)
    helper.enable()
    try:
        flops = []
        for t in scheduler.timesteps:  # step 0 full (it fills the cache), step 1 shallow
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                unet(sample, t, context)
            flops.append(counter.get_total_flops() // 2)
    finally:
        helper.disable()
    assert flops == [counted["full"].with_attention, counted["shallow"].with_attention]
    row = deepcache_generation_macs(counted, steps=25, cache_interval=3)["conv_linear"]
    full, shallow = counted["full"].conv_linear, counted["shallow"].conv_linear
    assert row["full_steps"] == 9 and row["deepcache_total"] == 9 * full + 16 * shallow
    assert row["speedup_bound"] == 25 * full / (9 * full + 16 * shallow)


def test_long_prompts_cost_planning_only_their_key_and_value_projections(capsys):
    """C text windows: each attn2's K and V projections read C * 77 tokens, in planning alone (2B rows);
    fidelity never reads the text. The rest of the graph is unchanged (conv+linear)."""
    model = load_model("tiny-sd21", device="meta")
    one, four = (count_graph_macs(model, 64, 64, prompt_chunks=c) for c in (1, 4))
    assert four["fidelity"] == one["fidelity"]
    extra = sum(2 * 2 * (4 - 1) * model.text_len * module.to_k.in_features * module.to_k.out_features
                for path, module in model.unet.named_modules() if path.endswith("attn2"))
    assert four["planning"].conv_linear - one["planning"].conv_linear == extra
    assert four["planning"].attention > one["planning"].attention  # QK^T and AV grow with the text too
    assert main(["macs", "tiny-sd21", "--prompt-chunks", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_chunks"] == 4


def test_controlnet_macs_match_flop_counter():
    """Fused ControlNets: planning counts the nets at 2B with their cross-attention, fidelity without it."""
    import dataclasses

    from cair_export.core.controlnet import load_controlnet

    model = load_model("tiny-sd15")
    net = load_controlnet("tiny", model.unet)
    counted = count_graph_macs(dataclasses.replace(model, controlnets=(net,)), 64, 96)
    plain = count_graph_macs(model, 64, 96)
    for module in (model.unet, net):
        module.set_attn_processor(AttnProcessor())
    sample, context, image = torch.zeros(2, 4, 8, 12), torch.zeros(2, 77, 768), torch.zeros(2, 3, 64, 96)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(sample, torch.tensor([10.0]), context, image)
    assert counted["planning"].with_attention == plain["planning"].with_attention + counter.get_total_flops() // 2
    sites = cross_attention_sites(net)
    replay = [torch.zeros(1, (8 // 2 ** s.level) * (12 // 2 ** s.level), s.channels) for s in sites]
    with torch.no_grad(), FlopCounterMode(display=False) as counter, CrossAttentionCache(net) as cache:
        cache.mode, cache.values = "replay", replay
        net(sample[:1], torch.tensor([10.0]), None, image[:1])
    assert counted["fidelity"].with_attention == plain["fidelity"].with_attention + counter.get_total_flops() // 2


def test_macs_cli_counts_controlnets(capsys, one_line_error):
    assert main(["macs", "sd15", "--height", "256", "--width", "256", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["macs", "sd15", "--height", "256", "--width", "256", "--controlnet", "unet", "--json"]) == 0
    controlled = json.loads(capsys.readouterr().out)
    for kind in ("planning", "fidelity"):  # the net adds to every step, less its cross-attention after n
        assert controlled["conv_linear"][kind] > plain["conv_linear"][kind]
    one_line_error(main(["macs", "tiny-sd15", "--controlnet", "tiny", "--deep-interval", "2"]),
                   capsys.readouterr().err, "do not take ControlNets or IP-Adapters yet")


def test_ip_adapter_macs_match_flop_counter():
    """An IP-Adapter adds its image projection and image-token attention to planning; fidelity is the plain model's."""
    import dataclasses

    from cair_export.core.ip_adapter import image_conditions, load_ip_adapter

    model = load_model("tiny-sd15")
    plain = count_graph_macs(model, 64, 96)
    sample, context = torch.zeros(2, 4, 8, 12), torch.zeros(2, 77, 768)
    with torch.no_grad(), FlopCounterMode(display=False) as before:
        model.unet(sample, torch.tensor([10.0]), context)
    adapter = load_ip_adapter("tiny", model.unet)
    counted = count_graph_macs(dataclasses.replace(model, ip_adapter=adapter), 64, 96)
    with torch.no_grad(), FlopCounterMode(display=False) as after:
        model.unet(sample, torch.tensor([10.0]), context,
                   added_cond_kwargs=image_conditions(torch.zeros(1, adapter.image_embed_dim), guided=True))
    # The counter sees the projection and to_k_ip/to_v_ip (CPU SDPA is not among its counted ops) ...
    added = (after.get_total_flops() - before.get_total_flops()) // 2
    assert added > 0
    assert counted["planning"].conv_linear - plain["planning"].conv_linear == added
    # ... and QK^T, AV over the 4 image tokens, at every cross-attention, at batch 2
    scores = sum(2 * 2 * (8 // 2 ** s.level) * (12 // 2 ** s.level) * 4 * s.channels
                 for s in cross_attention_sites(model.unet))
    assert counted["planning"].attention - plain["planning"].attention == scores
    assert counted["fidelity"] == plain["fidelity"]


@pytest.mark.parametrize("preset", ["tiny-pixart-sigma", "tiny-sana"])
def test_transformer_macs_match_flop_counter(preset):
    """Planning reads the text (caption projection, K/V over 300 tokens); fidelity replays every attn2. Sana's
    ReLU linear self-attention is counted linear in the tokens (its two matmuls, as FlopCounterMode sees them)."""
    from cair_export.core.denoiser import predict_noise

    model = load_model(preset)
    counted = count_graph_macs(model, 8 * model.vae_scale_factor, 12 * model.vae_scale_factor)
    transformer = model.unet
    for block in transformer.transformer_blocks:  # explicit matmuls the counter sees (not SDPA); Sana's attn1 kept
        block.attn2.set_processor(AttnProcessor())
        if preset == "tiny-pixart-sigma":
            block.attn1.set_processor(AttnProcessor())
    channels = transformer.config.in_channels
    sample, t = torch.zeros(2, channels, 8, 12), torch.tensor([10.0])
    with torch.no_grad(), FlopCounterMode(display=False) as planning:
        predict_noise(transformer, sample, t, torch.zeros(2, 300, 32), {"encoder_attention_mask": torch.ones(2, 300)})
    assert counted["planning"].with_attention == planning.get_total_flops() // 2
    tokens = 8 * 12 // transformer.config.patch_size ** 2
    replay = [torch.zeros(1, tokens, site.channels) for site in cross_attention_sites(transformer)]
    with torch.no_grad(), FlopCounterMode(display=False) as fidelity, CrossAttentionCache(transformer) as cache:
        cache.mode, cache.values = "replay", replay
        predict_noise(transformer, sample[:1], t, None, None)
    assert counted["fidelity"].with_attention == fidelity.get_total_flops() // 2
    assert counted["fidelity"].conv_linear < counted["planning"].conv_linear / 2  # no text, no caption projection


def test_macs_cli_counts_pixart_sigma_and_refuses_unet_options(capsys, one_line_error):
    assert main(["macs", "pixart-sigma", "--height", "1024", "--width", "1024", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert 1.8 < table["conv_linear"]["speedup_bound"] < 1.9  # n = 5 of 25 at 1024 px
    code = main(["macs", "pixart-sigma", "--deep-interval", "2", "--deep-branch", "14"])
    one_line_error(code, capsys.readouterr().err, "deep branch 14", "leaving none to replay", "0..12")
    code = main(["macs", "pixart-sigma", "--controlnet", "tiny"])
    one_line_error(code, capsys.readouterr().err, "diffusion transformer")
    code = main(["macs", "pixart-sigma", "--height", "1000"])
    one_line_error(code, capsys.readouterr().err, "patch size 2", "992")


def test_transformer_shallow_macs_match_flop_counter():
    """Sana's shallow graph (branch 0: the outer blocks, the middle ones' residual added) counted as FlopCounterMode
    sees the transformer with its middle blocks replaced, and the guided one reading the text."""
    from cair_export.core.deep_feature import deep_branch, middle_blocks_replayed
    from cair_export.core.denoiser import predict_noise

    model = load_model("tiny-sana")
    counted = count_graph_macs(model, 256, 384, deep_branch_id=0)
    transformer = model.unet
    for block in transformer.transformer_blocks:
        block.attn2.set_processor(AttnProcessor())
    branch = deep_branch(transformer, 0)
    sample, t = torch.zeros(2, 8, 8, 12), torch.tensor([10.0])
    residual = torch.zeros(2, 96, branch.channels)
    with torch.no_grad(), FlopCounterMode(display=False) as guided, middle_blocks_replayed(transformer, branch, residual):
        predict_noise(transformer, sample, t, torch.zeros(2, 300, 32), {"encoder_attention_mask": torch.ones(2, 300)})
    assert counted["shallow_planning"].with_attention == guided.get_total_flops() // 2
    replay = [torch.zeros(1, 96, site.channels) for site in cross_attention_sites(transformer)]
    with torch.no_grad(), FlopCounterMode(display=False) as shallow, CrossAttentionCache(transformer) as cache, \
            middle_blocks_replayed(transformer, branch, residual[:1]):
        cache.mode, cache.values = "replay", replay
        predict_noise(transformer, sample[:1], t, None, None)
    assert counted["shallow"].with_attention == shallow.get_total_flops() // 2
    assert counted["shallow"].conv_linear < counted["fidelity"].conv_linear * 0.6  # 2 of 4 blocks
