"""Sana (linear diffusion transformer, Gemma-2 text encoder, DC-AE): the tiny preset is diffusers' pipeline,
the torch reference caches every ``attn2`` as T-GATE defines it, and the exported folder runs it without torch.

Oracles: diffusers' ``SanaPipeline`` (n = T: its tokenizer call with the "complex human instruction", Gemma-2,
Flow-DPM-Solver and DC-AE) and, below T, T-GATE's definition written here with forward hooks on the ``attn2``
modules (steps 1..n guided, each output kept at n as the mean of the halves, then batch B, unguided, every
``attn2`` returning its kept output).
"""

import hashlib

import numpy as np
import pytest
import torch

from cair_export.core.models import load_model
from cair_export.core.reference import cair_denoise, cair_text_to_image, cross_attention_sites, encode_prompts

PROMPTS = ["a small red circle on a white background", "A large BLUE square at the top left "]
STEPS = 6
GUIDANCE = 4.5
SIZE = (8, 12)  # latent pixels: 256 x 384 px through DC-AE's 32x


@pytest.fixture(scope="module")
def sana():
    model = load_model("tiny-sana", with_pipeline=True)
    return model, model.diffusers_pipeline()


def initial_latents(batch: int = len(PROMPTS)) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(4).standard_normal((batch, 8, *SIZE), dtype=np.float32))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def pipeline_latents(pipe, prompts, latents):
    with torch.no_grad():
        return pipe(prompts, latents=latents, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    height=SIZE[0] * 32, width=SIZE[1] * 32, clean_caption=False, use_resolution_binning=False,
                    output_type="latent").images


def test_tiny_preset_is_sanas_pipeline_in_small(sana):
    """Gemma's special ids, a BOS first and no end token; the instruction's words in the vocabulary; DC-AE's
    32x; the published Flow-DPM-Solver; attn2 in every block on the patch grid (patch 1: level 0)."""
    model, pipe = sana
    tokenizer = pipe.tokenizer
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    ids = tokenizer("a small red circle").input_ids
    assert ids == [2, *tokenizer.convert_tokens_to_ids(["a", "▁small", "▁red", "▁circle"])]
    assert tokenizer.decode(tokenizer("zebra 42!").input_ids, skip_special_tokens=True) == "zebra 42!"
    assert 100 < len(tokenizer.encode("\n".join(model_instruction()))) < 300
    assert model.vae_scale_factor == pipe.vae_scale_factor == 32 and model.text_len == 300
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler" and pipe.scheduler.config.use_flow_sigmas
    sites = cross_attention_sites(model.unet)
    assert [site.module for site in sites] == [f"transformer_blocks.{i}.attn2" for i in range(4)]
    assert {(site.level, site.channels) for site in sites} == {(0, 32)}


def model_instruction():
    from cair_export.core.models.families import sana_instruction

    return sana_instruction()


def test_reference_at_T_is_the_sana_pipeline(sana):
    model, pipe = sana
    latents = initial_latents()
    expected = pipeline_latents(pipe, PROMPTS, latents)
    with torch.no_grad():
        embeds, negative, added, negative_added = encode_prompts(pipe, PROMPTS, None, latents)
        ours = cair_denoise(model.unet, pipe.scheduler, latents, embeds, negative, num_inference_steps=STEPS,
                            cache_step=STEPS, guidance_scale=GUIDANCE, added_cond=added,
                            negative_added_cond=negative_added)
    assert embeds.shape == negative.shape == (2, 300, 32)
    assert relative(ours, expected) <= 1e-5


def tgate_by_hooks(model, scheduler, latents, embeds, negative, mask, negative_mask, cache_step):
    """T-GATE's loop on a Sana transformer, its attn2 outputs captured and replaced by forward hooks."""
    modules = [module for name, module in model.named_modules() if name.endswith(".attn2")]
    kept: dict[int, torch.Tensor] = {}
    state = {"mode": "compute"}

    def hook(index):
        def run(module, args, output):
            if state["mode"] == "record":
                kept[index] = (output[: len(output) // 2] + output[len(output) // 2:]) / 2
            elif state["mode"] == "replay":
                return kept[index]
            return output
        return run

    handles = [module.register_forward_hook(hook(i)) for i, module in enumerate(modules)]
    try:
        scheduler.set_timesteps(STEPS)
        for i, t in enumerate(scheduler.timesteps):
            guided = i < cache_step
            state["mode"] = "record" if i + 1 == cache_step else ("compute" if guided else "replay")
            sample = torch.cat([latents] * 2) if guided else latents
            text = torch.cat([negative, embeds]) if guided else negative  # read by nothing once replaying
            text_mask = torch.cat([negative_mask, mask]) if guided else negative_mask
            noise = model(sample, encoder_hidden_states=text, encoder_attention_mask=text_mask,
                          timestep=t.expand(len(sample)), return_dict=False)[0]
            if guided:
                uncond, cond = noise.chunk(2)
                noise = uncond + GUIDANCE * (cond - uncond)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
    finally:
        for handle in handles:
            handle.remove()
    return latents


@pytest.mark.parametrize("cache_step", [1, 3])
def test_reference_below_T_is_tgates_definition(sana, cache_step):
    model, pipe = sana
    latents = initial_latents()
    with torch.no_grad():
        embeds, negative, added, negative_added = encode_prompts(pipe, PROMPTS, None, latents)
        run = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, added_cond=added,
                   negative_added_cond=negative_added)
        ours = cair_denoise(model.unet, pipe.scheduler, latents, embeds, negative, cache_step=cache_step, **run)
        theirs = tgate_by_hooks(model.unet, pipe.scheduler, latents, embeds, negative, added["encoder_attention_mask"],
                                negative_added["encoder_attention_mask"], cache_step)
        full = cair_denoise(model.unet, pipe.scheduler, latents, embeds, negative, cache_step=STEPS, **run)
    assert relative(ours, theirs) <= 1e-5
    assert relative(ours, full) > 1e-3  # the cache changes the result: the comparison is not vacuous


def test_exported_graphs_are_the_transformer_with_its_caches(exported):
    """No position input (Sana 1.6B has no position embedding); planning equals the torch transformer and emits
    each attn2 output per CFG half; fidelity replaying them equals the transformer with those outputs and holds
    no cross-attention, caption-projection or caption-norm weight, and no text input."""
    import onnx

    from cair_export.core.denoiser import predict_noise
    from cair_export.core.reference import CrossAttentionCache
    from cair_runtime.backends.onnxruntime import make_session
    from cair_runtime.manifest import load_manifest

    folder = exported("tiny-sana")
    manifest = load_manifest(folder)
    assert [spec.name for spec in manifest.graphs["planning"].inputs] == [
        "sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]
    assert [spec.name for spec in manifest.graphs["fidelity"].inputs] == [
        "sample", "timestep", *(f"cache_{i:03d}" for i in range(4))]
    assert manifest.transformer and manifest.patch_size == 1 and manifest.vae_scale_factor == 32
    transformer = load_model("tiny-sana").unet
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((4, 8, 5, 7), dtype=np.float32)  # batch 2, guided, a size besides the trace's
    text = rng.standard_normal((4, 300, 32), dtype=np.float32)
    mask = (np.arange(300)[None] < np.array([[3], [9], [5], [300]])).astype(np.float32)
    timestep = np.array([870.5], np.float32)  # flow matching: sigma * 1000, not an integer
    planning = make_session(folder / "planning.onnx")
    outputs = dict(zip([o.name for o in planning.get_outputs()],
                       planning.run(None, {"sample": sample, "timestep": timestep, "encoder_hidden_states": text,
                                           "encoder_attention_mask": mask})))
    noise, caches = outputs["noise_pred"], [outputs[f"cache_{i:03d}"] for i in range(4)]
    with torch.no_grad(), CrossAttentionCache(transformer, manifest.fidelity_guidance) as cache:
        cache.mode = "record"
        expected = predict_noise(transformer, torch.from_numpy(sample), torch.from_numpy(timestep),
                                 torch.from_numpy(text), {"encoder_attention_mask": torch.from_numpy(mask)})
        kept = [value.numpy() for value in cache.values]
        assert relative(torch.from_numpy(noise), expected) <= 1e-4
        assert all(np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max() for ours, theirs in zip(caches, kept))
        cache.mode = "replay"
        fidelity_expected = predict_noise(transformer, torch.from_numpy(sample), torch.from_numpy(timestep), None, None)
    fidelity = make_session(folder / "fidelity.onnx")
    fidelity_noise = fidelity.run(["noise_pred"], {"sample": sample, "timestep": timestep,
                                                   **{f"cache_{i:03d}": value for i, value in enumerate(caches)}})[0]
    assert relative(torch.from_numpy(fidelity_noise), fidelity_expected) <= 1e-4

    graph = onnx.load(str(folder / "fidelity.onnx"), load_external_data=False)
    stored = {hashlib.sha256(onnx.numpy_helper.to_array(t, base_dir=str(folder)).astype(np.float32).tobytes()).hexdigest()
              for t in graph.graph.initializer}
    text_only = [(name, w) for name, w in transformer.named_parameters()
                 if ".attn2." in name or name.startswith(("caption_projection.", "caption_norm."))]
    assert len(text_only) >= 10
    for name, weight in text_only:
        array = weight.detach().numpy()
        digests = {hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in (array, array.T)}
        assert not digests & stored, name
    assert not {"encoder_hidden_states", "encoder_attention_mask"} & {i.name for i in graph.graph.input}


@pytest.mark.parametrize("cache_step", [STEPS, 2])
def test_engine_equals_the_reference(exported, sana, cache_step):
    """CairEngine.denoise on the exported graphs (numpy Flow-DPM-Solver, text masks) against the torch
    reference loop over diffusers' scheduler."""
    from cair_runtime.pipeline import CairEngine

    model, pipe = sana
    engine = CairEngine(exported("tiny-sana"))
    latents = initial_latents()
    with torch.no_grad():
        embeds, negative, added, negative_added = encode_prompts(pipe, PROMPTS, None, latents)
        expected = cair_denoise(model.unet, pipe.scheduler, latents, embeds, negative, num_inference_steps=STEPS,
                                cache_step=cache_step, guidance_scale=GUIDANCE, added_cond=added,
                                negative_added_cond=negative_added, fidelity_guidance=engine.manifest.fidelity_guidance)
    result = engine.denoise(embeds.numpy(), negative.numpy(), latents=latents.numpy(), num_inference_steps=STEPS,
                            guidance_scale=GUIDANCE, cache_step=cache_step,
                            attention_mask=added["encoder_attention_mask"].numpy(),
                            negative_attention_mask=negative_added["encoder_attention_mask"].numpy())
    assert relative(torch.from_numpy(result.latents), expected) <= 1e-4
    assert result.timings.planning_steps == cache_step


def test_runtime_text_to_image_is_the_sana_pipeline(exported, sana):
    """From prompts: the instruction before each prompt, Gemma's tokenizer (ids and mask, lower-cased, the
    selected rows), the text encoder graph, the Flow-DPM-Solver port and the graphs equal diffusers'
    SanaPipeline at n = T; below T the torch reference on diffusers' own prompt encoding; DC-AE's decoding."""
    from cair_runtime.text2image import CairText2Image

    model, pipe = sana
    runtime = CairText2Image(exported("tiny-sana", with_pipeline=True))
    prompts = [PROMPTS[1], "a zebra at 42 km/h!"]  # upper case; words outside the vocabulary: pieces and bytes
    latents = initial_latents()
    run = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents.numpy(), height=256, width=384)
    expected = pipeline_latents(pipe, prompts, latents)
    ours = runtime(prompts, cache_step=STEPS, **run)
    assert relative(torch.from_numpy(ours.latents), expected) <= 1e-4
    with torch.no_grad():
        decoded = cair_text_to_image(pipe, prompts, None, latents, num_inference_steps=STEPS, cache_step=2,
                                     guidance_scale=GUIDANCE)  # m = n: merged caches
    cached = runtime(prompts, cache_step=2, guidance_stop=2, **run)
    assert np.abs(cached.decoded - decoded.numpy()).max() <= 1e-3
    assert cached.parameters[0]["cache_step"] == 2 and cached.images.shape == (2, 256, 384, 3)


def test_runtime_tokenizes_as_the_sana_pipeline(exported, sana):
    """Ids and mask as SanaPipeline's tokenizer calls make them: the instruction and prompt, truncated to the
    instruction's tokens + 298 (a warning says what was dropped); negative prompts without it, 300 tokens."""
    from cair_runtime.text2image import CairText2Image, PromptTruncatedWarning

    _, pipe = sana
    runtime = CairText2Image(exported("tiny-sana", with_pipeline=True))
    (_, tokenizer, _), = runtime.text_encoders
    instruction = "\n".join(model_instruction())
    length = len(pipe.tokenizer.encode(instruction)) + 298
    texts = ["", "a small red circle", "Über zebra, 42 squares  at the top"]
    lowered = [text.lower().strip() for text in texts]
    ids, mask = tokenizer.encode_instructed(texts)
    theirs = pipe.tokenizer([instruction + text for text in lowered], padding="max_length", max_length=length,
                            truncation=True, add_special_tokens=True, return_tensors="np")
    np.testing.assert_array_equal(ids, theirs.input_ids)
    np.testing.assert_array_equal(mask, theirs.attention_mask)
    ids, mask = tokenizer.encode(texts)
    theirs = pipe.tokenizer(lowered, padding="max_length", max_length=300, truncation=True, add_special_tokens=True,
                            return_tensors="np")
    np.testing.assert_array_equal(ids, theirs.input_ids)
    np.testing.assert_array_equal(mask, theirs.attention_mask)
    long = " ".join(["red circle"] * 200)
    with pytest.warns(PromptTruncatedWarning):
        ids, mask = tokenizer.encode_instructed([long])
    theirs = pipe.tokenizer([instruction + long], padding="max_length", max_length=length, truncation=True,
                            return_tensors="np")
    np.testing.assert_array_equal(ids, theirs.input_ids)


def test_cli_runs_a_sana_folder_and_refuses_what_it_lacks(exported, tmp_path, capsys, one_line_error):
    from cair_runtime.cli import main as run

    folder = exported("tiny-sana", with_pipeline=True)
    out = tmp_path / "out.png"
    assert run([str(folder), "a small red circle", "-o", str(out), "--steps", "4", "--cache-step", "2"]) == 0
    assert out.is_file()
    capsys.readouterr()
    code = run([str(folder), "a small red circle", "-o", str(tmp_path / "x.png"), "--height", "272"])
    one_line_error(code, capsys.readouterr().err, "multiple of 32")
    code = run([str(folder), "a red circle", "--image", str(out), "-o", str(tmp_path / "y.png")])
    one_line_error(code, capsys.readouterr().err, "image to image")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


@pytest.mark.parametrize("preset", ["tiny-sana", "tiny-pixart-sigma"])
def test_pipeline_folders_load_offline_as_their_presets(exported, tmp_path, capsys, one_line_error, preset):
    """A diffusers folder of the pipeline (``save_pretrained``, safetensors) exports to a folder whose images
    are the preset's; prompt chunks and another transformer pipeline are refused in one line, no folder written."""
    import json

    from cair_export.cli import main
    from cair_runtime.text2image import CairText2Image

    folder = tmp_path / "pipeline"
    load_model(preset, with_pipeline=True).diffusers_pipeline().save_pretrained(folder, safe_serialization=True)
    assert main(["export", str(folder), str(tmp_path / "engine")]) == 0
    run = dict(num_inference_steps=4, cache_step=2, seed=5)
    ours = CairText2Image(tmp_path / "engine")(["A red circle"], **run)
    theirs = CairText2Image(exported(preset, with_pipeline=True))(["A red circle"], **run)
    np.testing.assert_array_equal(ours.latents, theirs.latents)
    capsys.readouterr()
    code = main(["export", str(folder), str(tmp_path / "chunked"), "--max-prompt-chunks", "2"])
    one_line_error(code, capsys.readouterr().err, "diffusion transformer", "--max-prompt-chunks")
    assert not (tmp_path / "chunked").exists()
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, _class_name="PixArtAlphaPipeline")))
    capsys.readouterr()
    code = main(["export", str(folder), str(tmp_path / "other")])
    one_line_error(code, capsys.readouterr().err, "PixArtAlphaPipeline", "SanaPipeline")
    assert not (tmp_path / "other").exists()


def test_runtime_flow_euler_is_the_pipeline_with_diffusers_flow_match_euler(exported, sana):
    """``scheduler="flow-euler"`` on a Sana folder: the numpy FlowMatchEulerDiscreteScheduler from the model's
    config (as diffusers' ``from_config``; its first timestep is 1000, sigma 1) equals the pipeline with
    diffusers' own, at n = T."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cair_runtime.text2image import CairText2Image

    model, _ = sana
    pipe = model.diffusers_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    runtime = CairText2Image(exported("tiny-sana", with_pipeline=True))
    latents = initial_latents()
    expected = pipeline_latents(pipe, PROMPTS, latents)
    ours = runtime(PROMPTS, cache_step=STEPS, scheduler="flow-euler", num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, latents=latents.numpy(), height=256, width=384)
    assert relative(torch.from_numpy(ours.latents), expected) <= 1e-4


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["pipeline"]["text_encoders"][0].update(instruction=42), "instruction (text before every prompt"),
    (lambda m: m["model"]["unet_config"].update(patch_size="2"), "unet_config patch_size '2' must be an integer"),
], ids=["instruction", "patch_size"])
def test_hand_edited_sana_manifests_are_one_line(exported, tmp_path, capsys, one_line_error, edit, message):
    import json
    import shutil

    from cair_runtime.cli import main as run

    folder = tmp_path / "edited"
    shutil.copytree(exported("tiny-sana", with_pipeline=True), folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    code = run([str(folder), "a red circle", "-o", str(tmp_path / "out.png")])
    one_line_error(code, capsys.readouterr().err, message, prog="cair-run")
    assert not (tmp_path / "out.png").exists()


def test_deep_schedules_without_shallow_graphs_are_refused_in_one_line(exported, tmp_path, capsys, one_line_error):
    """A transformer of two blocks has no middle range to replay: its folder has no shallow graphs (said at
    export), and deep and planning intervals are refused in one line."""
    from cair_runtime.cli import main as run
    from cair_runtime.manifest import load_manifest

    folder = exported("tiny-pixart-sigma", with_pipeline=True)
    assert "shallow" not in load_manifest(folder).graphs
    for option in ("--deep-interval", "--planning-interval"):
        code = run([str(folder), "a red circle", "-o", str(tmp_path / "x.png"), option, "2", "--cache-step", "2"])
        one_line_error(code, capsys.readouterr().err, "shallow graph", prog="cair-run")
    assert not (tmp_path / "x.png").exists()


# --- the deep-feature cut: the middle blocks' residual replayed between the outer blocks -----------------


def delta_cache_by_hooks(model, scheduler, latents, embeds, negative, mask, negative_mask, cache_step, interval):
    """T-GATE's attn2 caching and a Delta-DiT residual cache of blocks 1..N-2, written with forward hooks: every
    interval-th step after n runs in full and keeps the middle blocks' residual; the steps between still run the
    middle blocks but the last of them returns the input of the first plus the kept residual."""
    modules = [module for name, module in model.named_modules() if name.endswith(".attn2")]
    blocks = model.transformer_blocks
    kept: dict[int, torch.Tensor] = {}
    state = {"mode": "compute", "shallow": False, "entering": None, "residual": None}

    def attn2(index):
        def run(module, args, output):
            if state["mode"] == "record":
                kept[index] = (output[: len(output) // 2] + output[len(output) // 2:]) / 2
            elif state["mode"] == "replay":
                return kept[index]
            return output
        return run

    def entering(module, args):
        state["entering"] = args[0]

    def leaving(module, args, output):
        if state["shallow"]:
            return state["entering"] + state["residual"]
        state["residual"] = output - state["entering"]
        return output

    handles = [module.register_forward_hook(attn2(i)) for i, module in enumerate(modules)]
    handles += [blocks[1].register_forward_pre_hook(entering), blocks[-2].register_forward_hook(leaving)]
    try:
        scheduler.set_timesteps(STEPS)
        for i, t in enumerate(scheduler.timesteps):
            guided = i < cache_step
            state["mode"] = "record" if i + 1 == cache_step else ("compute" if guided else "replay")
            state["shallow"] = not guided and (i - cache_step) % interval != 0
            sample = torch.cat([latents] * 2) if guided else latents
            text = torch.cat([negative, embeds]) if guided else negative
            text_mask = torch.cat([negative_mask, mask]) if guided else negative_mask
            noise = model(sample, encoder_hidden_states=text, encoder_attention_mask=text_mask,
                          timestep=t.expand(len(sample)), return_dict=False)[0]
            if guided:
                uncond, cond = noise.chunk(2)
                noise = uncond + GUIDANCE * (cond - uncond)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
    finally:
        for handle in handles:
            handle.remove()
    return latents


def test_reference_deep_interval_is_a_residual_cache_of_the_middle_blocks(sana):
    """Branch 0 keeps one block at each end; with k = 2 every other step after n adds the kept residual of
    blocks 1..N-2 instead of running them (the oracle runs them and overrides their result)."""
    model, pipe = sana
    latents = initial_latents()
    with torch.no_grad():
        embeds, negative, added, negative_added = encode_prompts(pipe, PROMPTS, None, latents)
        run = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, added_cond=added,
                   negative_added_cond=negative_added, cache_step=2)
        ours = cair_denoise(model.unet, pipe.scheduler, latents, embeds, negative, deep_interval=2, deep_branch_id=0,
                            **run)
        theirs = delta_cache_by_hooks(model.unet, pipe.scheduler, latents, embeds, negative,
                                      added["encoder_attention_mask"], negative_added["encoder_attention_mask"], 2, 2)
        plain = cair_denoise(model.unet, pipe.scheduler, latents, embeds, negative, **run)
    assert relative(ours, theirs) <= 1e-5
    assert relative(ours, plain) > 1e-4  # the shallow steps change the result: the comparison is not vacuous


@pytest.mark.parametrize("schedule", [dict(cache_step=2, deep_interval=2),
                                      dict(cache_step=4, guidance_stop=5, deep_interval=3, planning_interval=2)],
                         ids=["k=2", "m>n,k_p=2"])
def test_engine_runs_the_deep_schedules_as_the_reference(exported, sana, schedule):
    """The shallow graphs (the residual an input, fidelity and planning emitting it; the guided shallow graph
    reading the text and its mask) on the engine equal the reference loop, guidance stop and planning interval
    included."""
    from cair_runtime.manifest import load_manifest
    from cair_runtime.pipeline import CairEngine

    model, pipe = sana
    folder = exported("tiny-sana")
    manifest = load_manifest(folder)
    assert manifest.deep_branch == {"name": "deep_feature", "kind": "blocks", "branch": 0, "start": 1, "stop": 3,
                                    "channels": 32, "level": 0}
    assert [spec.name for spec in manifest.graphs["shallow"].inputs] == [
        "sample", "timestep", "deep_feature", "cache_000", "cache_003"]  # the outer blocks' caches only
    engine = CairEngine(folder)
    latents = initial_latents()
    with torch.no_grad():
        embeds, negative, added, negative_added = encode_prompts(pipe, PROMPTS, None, latents)
        expected = cair_denoise(model.unet, pipe.scheduler, latents, embeds, negative, num_inference_steps=STEPS,
                                guidance_scale=GUIDANCE, added_cond=added, negative_added_cond=negative_added,
                                fidelity_guidance=manifest.fidelity_guidance, deep_branch_id=0, **schedule)
    result = engine.denoise(embeds.numpy(), negative.numpy(), latents=latents.numpy(), num_inference_steps=STEPS,
                            guidance_scale=GUIDANCE, attention_mask=added["encoder_attention_mask"].numpy(),
                            negative_attention_mask=negative_added["encoder_attention_mask"].numpy(), **schedule)
    assert relative(torch.from_numpy(result.latents), expected) <= 1e-4
    assert result.timings.shallow_steps > 0
