"""Diffusion transformers (PixArt-Sigma): the tiny preset is diffusers' pipeline, and the torch reference
caches every ``attn2`` as T-GATE defines it.

Oracles: diffusers' ``PixArtSigmaPipeline`` (n = T) and, below T, T-GATE's definition written here
independently of the reference's processors, with forward hooks on the ``attn2`` modules: steps 1..n
guided, each ``attn2`` output kept at n as the mean of the halves, steps after n at batch B, unguided,
every ``attn2`` returning its kept output; and T-GATE's own PixArt-Sigma loader where it is installed.
"""

import numpy as np
import pytest
import torch

from cair_export.core.models import load_model
from cair_export.core.reference import cair_denoise, cair_text_to_image, cross_attention_sites, encode_prompts

PROMPTS = ["a small red circle on a white background", "a large blue square at the top left"]
STEPS = 6
GUIDANCE = 4.5


@pytest.fixture(scope="module")
def pixart():
    model = load_model("tiny-pixart-sigma", with_pipeline=True)
    return model, model.diffusers_pipeline()


def initial_latents(batch: int = len(PROMPTS), size=(8, 12)) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(4).standard_normal((batch, 4, *size), dtype=np.float32))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_tiny_preset_tokenizes_as_t5():
    """The tiny T5 tokenizer: T5's special ids, one piece per caption word, ``</s>`` last, pads with ``<pad>``."""
    model = load_model("tiny-pixart-sigma", with_pipeline=True)
    tokenizer = model.text_encoders[0].tokenizer
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    encoded = tokenizer(PROMPTS[0], padding="max_length", max_length=12, return_attention_mask=True)
    assert encoded.input_ids[:9] == [*tokenizer.convert_tokens_to_ids(["▁" + w for w in PROMPTS[0].split()]), 1]
    assert encoded.input_ids[9:] == [0] * 3 and encoded.attention_mask == [1] * 9 + [0] * 3
    assert tokenizer.decode(tokenizer("zebra 42!").input_ids, skip_special_tokens=True) == "zebra 42!"
    assert model.text_len == tokenizer.model_max_length == 300  # PixArt-Sigma's max_sequence_length


def test_sites_are_every_block_on_the_patch_grid(pixart):
    model, _ = pixart
    sites = cross_attention_sites(model.unet)
    assert [site.module for site in sites] == [f"transformer_blocks.{i}.attn2" for i in range(2)]
    assert {(site.level, site.channels) for site in sites} == {(1, 32)}  # patch 2: latent pixels / 4 tokens


def test_reference_at_T_is_the_pixart_sigma_pipeline(pixart):
    model, pipe = pixart
    latents = initial_latents()
    with torch.no_grad():
        expected = pipe(PROMPTS, latents=latents, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                        height=64, width=96, clean_caption=False, use_resolution_binning=False,
                        output_type="latent").images
        embeds, negative, added, negative_added = encode_prompts(pipe, PROMPTS, None, latents)
        ours = cair_denoise(model.unet, pipe.scheduler, latents, embeds, negative, num_inference_steps=STEPS,
                            cache_step=STEPS, guidance_scale=GUIDANCE, added_cond=added,
                            negative_added_cond=negative_added)
    assert added["encoder_attention_mask"].shape == (2, 300) and added["encoder_attention_mask"].sum() < 30
    assert relative(ours, expected) <= 1e-5


def tgate_by_hooks(model, scheduler, latents, embeds, negative, mask, negative_mask, cache_step):
    """T-GATE's loop on a PixArt transformer, its attn2 outputs captured and replaced by forward hooks."""
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
        latents = latents * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            guided = i < cache_step
            state["mode"] = "record" if i + 1 == cache_step else ("compute" if guided else "replay")
            sample = torch.cat([latents] * 2) if guided else latents
            text = torch.cat([negative, embeds]) if guided else negative  # read by nothing once replaying
            text_mask = torch.cat([negative_mask, mask]) if guided else negative_mask
            noise = model(scheduler.scale_model_input(sample, t), encoder_hidden_states=text,
                          encoder_attention_mask=text_mask, timestep=t.expand(len(sample)),
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0][:, :4]
            if guided:
                uncond, cond = noise.chunk(2)
                noise = uncond + GUIDANCE * (cond - uncond)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
    finally:
        for handle in handles:
            handle.remove()
    return latents


@pytest.mark.parametrize("cache_step", [1, 2])
def test_reference_below_T_is_tgates_definition(pixart, cache_step):
    model, pipe = pixart
    latents = initial_latents()
    with torch.no_grad():
        embeds, negative, added, negative_added = encode_prompts(pipe, PROMPTS, None, latents)
        ours = cair_denoise(model.unet, pipe.scheduler, latents, embeds, negative, num_inference_steps=STEPS,
                            cache_step=cache_step, guidance_scale=GUIDANCE, added_cond=added,
                            negative_added_cond=negative_added)
        theirs = tgate_by_hooks(model.unet, pipe.scheduler, latents, embeds, negative, added["encoder_attention_mask"],
                                negative_added["encoder_attention_mask"], cache_step)
        full = cair_denoise(model.unet, pipe.scheduler, latents, embeds, negative, num_inference_steps=STEPS,
                            cache_step=STEPS, guidance_scale=GUIDANCE, added_cond=added,
                            negative_added_cond=negative_added)
    assert relative(ours, theirs) <= 1e-5
    assert relative(ours, full) > 1e-3  # the cache changes the result: the comparison is not vacuous


def test_exported_graphs_are_the_transformer_with_its_caches(exported):
    """Planning at a size other than the trace's, with the runtime's position embedding, equals the torch
    transformer (its own embedding) and emits each attn2 output (per CFG half: the default export); fidelity replaying them
    equals the transformer with those outputs, and holds no cross-attention or caption-projection weight."""
    import hashlib

    import onnx

    from cair_export.core.denoiser import predict_noise
    from cair_export.core.reference import CrossAttentionCache
    from cair_runtime.backends.onnxruntime import make_session
    from cair_runtime.manifest import load_manifest
    from cair_runtime.positions import position_embedding

    folder = exported("tiny-pixart-sigma")
    manifest = load_manifest(folder)
    assert [spec.name for spec in manifest.graphs["planning"].inputs] == [
        "sample", "timestep", "pos_embed", "encoder_hidden_states", "encoder_attention_mask"]
    assert [spec.name for spec in manifest.graphs["fidelity"].inputs] == ["sample", "timestep", "pos_embed",
                                                                           "cache_000", "cache_001"]
    transformer = load_model("tiny-pixart-sigma").unet
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((4, 4, 8, 12), dtype=np.float32)  # batch 2, guided
    text = rng.standard_normal((4, 300, 32), dtype=np.float32)
    mask = (np.arange(300)[None] < np.array([[3], [9], [5], [300]])).astype(np.float32)
    timestep = np.array([700.0], np.float32)
    embed = transformer.pos_embed
    position = position_embedding(32, 4, 6, embed.base_size, embed.interpolation_scale)
    planning = make_session(folder / "planning.onnx")
    noise, *caches = planning.run(None, {"sample": sample, "timestep": timestep, "pos_embed": position,
                                         "encoder_hidden_states": text, "encoder_attention_mask": mask})
    with torch.no_grad(), CrossAttentionCache(transformer, manifest.fidelity_guidance) as cache:  # "cfg": per half
        cache.mode = "record"
        expected = predict_noise(transformer, torch.from_numpy(sample), torch.from_numpy(timestep),
                                 torch.from_numpy(text), {"encoder_attention_mask": torch.from_numpy(mask)})
        kept = [value.numpy() for value in cache.values]
        assert relative(torch.from_numpy(noise), expected) <= 1e-4
        assert all(np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max() for ours, theirs in zip(caches, kept))
        cache.mode = "replay"
        fidelity_expected = predict_noise(transformer, torch.from_numpy(sample), torch.from_numpy(timestep), None, None)
    fidelity = make_session(folder / "fidelity.onnx")
    (fidelity_noise,) = fidelity.run(None, {"sample": sample, "timestep": timestep, "pos_embed": position,
                                            **{f"cache_{i:03d}": value for i, value in enumerate(caches)}})
    assert relative(torch.from_numpy(fidelity_noise), fidelity_expected) <= 1e-4

    graph = onnx.load(str(folder / "fidelity.onnx"), load_external_data=False)
    stored = {hashlib.sha256(onnx.numpy_helper.to_array(t, base_dir=str(folder)).astype(np.float32).tobytes()).hexdigest()
              for t in graph.graph.initializer}
    text_only = [(name, w) for name, w in transformer.named_parameters()
                 if ".attn2." in name or name.startswith("caption_projection.")]
    assert len(text_only) >= 10
    for name, weight in text_only:
        array = weight.detach().numpy()
        digests = {hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in (array, array.T)}
        assert not digests & stored, name
    assert not {"encoder_hidden_states", "encoder_attention_mask"} & {i.name for i in graph.graph.input}


def test_what_is_not_built_yet_is_refused_in_one_line(exported, tmp_path, capsys, one_line_error):
    """ControlNets, IP-Adapters, LoRA and TensorRT builds take UNets for now: one-line errors, no folder."""
    from cair_export.cli import main

    code = main(["export", "tiny-pixart-sigma", str(tmp_path / "out"), "--controlnet", "tiny"])
    one_line_error(code, capsys.readouterr().err, "diffusion transformer", "ControlNets")
    assert not (tmp_path / "out").exists()
    code = main(["export", "tiny-pixart-sigma", str(tmp_path / "out"), "--max-prompt-chunks", "4"])
    one_line_error(code, capsys.readouterr().err, "diffusion transformer", "--max-prompt-chunks")
    assert not (tmp_path / "out").exists()
    from cair_runtime.cli import main as run

    code = run([str(exported("tiny-pixart-sigma", with_pipeline=True)), "a red circle", "--backend", "tensorrt",
                "-o", str(tmp_path / "x.png")])
    one_line_error(code, capsys.readouterr().err, "diffusion transformer", "tensorrt")


@pytest.mark.parametrize("cache_step", [STEPS, 2])
def test_engine_equals_the_reference(exported, pixart, cache_step):
    """CairEngine.denoise on the exported graphs (numpy DPM-Solver++, position embedding, text masks) against
    the torch reference loop over diffusers' scheduler, at a size other than the export's."""
    from cair_runtime.pipeline import CairEngine

    model, pipe = pixart
    engine = CairEngine(exported("tiny-pixart-sigma"))
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


def test_runtime_text_to_image_is_the_pixart_sigma_pipeline(exported, pixart):
    """From prompts: the T5 tokenizer (ids and mask), text encoder graph, DPM-Solver++ port and graphs equal
    diffusers' PixArtSigmaPipeline at n = T (its tokenizer and encoder, no caption cleaning, no resolution
    binning); below T the torch reference on diffusers' own prompt encoding; decoded images as the VAE's."""
    from cair_runtime.text2image import CairText2Image

    model, pipe = pixart
    runtime = CairText2Image(exported("tiny-pixart-sigma", with_pipeline=True))
    prompts = [PROMPTS[0], " A Zebra at 42 km/h!"]  # lower-cased and stripped first; unknown words: pieces, <unk>
    latents = initial_latents()
    run = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents.numpy(), height=64, width=96)
    with torch.no_grad():
        expected = pipe(prompts, latents=latents, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64,
                        width=96, clean_caption=False, use_resolution_binning=False, output_type="latent").images
    ours = runtime(prompts, cache_step=STEPS, **run)
    assert relative(torch.from_numpy(ours.latents), expected) <= 1e-4
    with torch.no_grad():
        embeds, negative, added, negative_added = encode_prompts(pipe, prompts, None, latents)
        reference = cair_denoise(model.unet, pipe.scheduler, latents, embeds, negative, num_inference_steps=STEPS,
                                 cache_step=2, guidance_scale=GUIDANCE, added_cond=added,
                                 negative_added_cond=negative_added, fidelity_guidance="cfg")
        decoded = cair_text_to_image(pipe, prompts, None, latents, num_inference_steps=STEPS, cache_step=2,
                                     guidance_scale=GUIDANCE)  # m = n: the same loop with merged caches
    cached = runtime(prompts, cache_step=2, **run)
    assert relative(torch.from_numpy(cached.latents), reference) <= 1e-4
    assert np.abs(cached.decoded - decoded.numpy()).max() <= 1e-3
    assert cached.parameters[0]["cache_step"] == 2 and cached.images.shape == (2, 64, 96, 3)


def test_runtime_tokenizes_as_the_t5_tokenizer(exported, pixart):
    """Ids and mask as PixArtSigmaPipeline's tokenizer call makes them, truncation at 300 with a warning."""
    from cair_runtime.text2image import CairText2Image, PromptTruncatedWarning

    _, pipe = pixart
    runtime = CairText2Image(exported("tiny-pixart-sigma", with_pipeline=True))
    (_, tokenizer, _), = runtime.text_encoders
    texts = ["", "a small red circle", "Über zebra, 42 squares  at the top"]
    ids, mask = tokenizer.encode(texts)
    theirs = pipe.tokenizer(texts, padding="max_length", max_length=300, truncation=True, add_special_tokens=True,
                            return_attention_mask=True, return_tensors="np")
    np.testing.assert_array_equal(ids, theirs.input_ids)
    np.testing.assert_array_equal(mask, theirs.attention_mask)
    long = " ".join(["red circle"] * 200)
    with pytest.warns(PromptTruncatedWarning):
        ids, mask = tokenizer.encode([long])
    theirs = pipe.tokenizer([long], padding="max_length", max_length=300, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(ids, theirs.input_ids)
    assert mask.sum() == 300 and runtime.max_prompt_chunks == 1


def test_cli_runs_a_pixart_folder_and_refuses_what_it_lacks(exported, tmp_path, capsys, one_line_error):
    from cair_runtime.cli import main as run

    folder = exported("tiny-pixart-sigma", with_pipeline=True)
    out = tmp_path / "out.png"
    assert run([str(folder), "a small red circle", "-o", str(out), "--steps", "4", "--cache-step", "2"]) == 0
    assert out.is_file()
    capsys.readouterr()
    code = run([str(folder), "a small red circle", "-o", str(tmp_path / "x.png"), "--height", "72"])
    one_line_error(code, capsys.readouterr().err, "multiple of 16", "patch size 2")
    code = run([str(folder), "a red circle", "--image", str(out), "-o", str(tmp_path / "y.png")])
    one_line_error(code, capsys.readouterr().err, "image to image")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_a_folder_records_its_transformer_for_counting(exported):
    """calibrate and demo count MACs from the manifest alone: the recorded class and config rebuild the model."""
    from cair_export.core.macs import count_graph_macs, manifest_model
    from cair_runtime.manifest import load_manifest

    model = manifest_model(load_manifest(exported("tiny-pixart-sigma")))
    assert model.is_transformer and next(model.unet.parameters()).is_meta
    assert count_graph_macs(model, 64, 96) == count_graph_macs(load_model("tiny-pixart-sigma"), 64, 96)


def test_profile_and_calibrate_see_the_same_convergence(exported, tmp_path):
    """``cair-export profile`` (torch, diffusers' loop, recording processors) and ``calibrate`` (the engine's
    planning caches read after each step) measure the same per-step change of PixArt's attn2 outputs."""
    from cair_export.lab.calibrate import CalibrateConfig, calibrate
    from cair_export.lab.profile import ProfileConfig, profile_model

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    section = calibrate(CalibrateConfig(exported("tiny-pixart-sigma", with_pipeline=True), prompts, steps=STEPS,
                                        write=False), progress=lambda message: None)
    size = {"height": section["evidence"]["height"], "width": section["evidence"]["width"]}
    profile = profile_model(ProfileConfig(model="tiny-pixart-sigma", prompts=prompts, steps=STEPS, batch=2, **size),
                            progress=lambda message: None)
    torch_series = profile["series"]["outputs"]["relative"]
    engine_series = section["evidence"]["convergence"]
    assert engine_series["steps"] == torch_series["steps"] == list(range(2, STEPS + 1))
    np.testing.assert_allclose(engine_series["mean_relative_change"], torch_series["mean"], rtol=2e-3)


def test_the_graphs_have_no_branches_and_run_on_openvino(exported, tmp_path):
    """The unpatchify's squeeze is traced as a plain Squeeze (an If on the token count would stop OpenVINO's CPU
    plug-in); OpenVINO in fp32 then generates what onnxruntime does, before and after n."""
    import onnx

    from cair_runtime.text2image import CairText2Image

    folder = exported("tiny-pixart-sigma", with_pipeline=True)
    for kind in ("planning", "fidelity"):
        graph = onnx.load(str(folder / f"{kind}.onnx"), load_external_data=False)
        assert not {"If", "Loop"} & {node.op_type for node in graph.graph.node}
    openvino = CairText2Image(folder, backend="openvino", precision="fp32", cache_dir=tmp_path)
    onnxruntime = CairText2Image(folder)
    run = dict(latents=initial_latents(1).numpy(), num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64,
               width=96)
    for cache_step in (STEPS, 2):
        ours = openvino(PROMPTS[0], cache_step=cache_step, **run).latents
        theirs = onnxruntime(PROMPTS[0], cache_step=cache_step, **run).latents
        assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max(), cache_step


def test_fp16_graphs_run_close_to_fp32(exported):
    """fp16 transformer graphs validate at export and generate within fp16's precision of the fp32 folder."""
    from cair_runtime.text2image import CairText2Image

    half = CairText2Image(exported("tiny-pixart-sigma", with_pipeline=True, dtype="fp16"))
    full = CairText2Image(exported("tiny-pixart-sigma", with_pipeline=True))
    noise = initial_latents(1).numpy()
    run = dict(latents=noise, num_inference_steps=STEPS, cache_step=2, guidance_scale=GUIDANCE, height=64, width=96)
    ours, reference = half(PROMPTS[0], **run).latents, full(PROMPTS[0], **run).latents
    error = np.abs(ours - reference).max() / np.abs(reference).max()
    assert 0 < error <= 1e-2  # computed in fp16 (not 0), within its precision


@pytest.mark.parametrize("cache_step", [2, 3])
def test_runtime_below_T_is_tgates_own_pixart_loop(exported, cache_step):
    """The outside oracle: T-GATE's own PixArt-Sigma loader (gating cross-attention at ``gate_step`` = n, no
    self-attention caching) against the runtime from prompts."""
    tgate = pytest.importorskip("tgate", reason="the peer's own code: pip install --no-deps tgate==1.0.0")
    from cair_runtime.text2image import CairText2Image

    pipe = load_model("tiny-pixart-sigma", with_pipeline=True).diffusers_pipeline()  # T-GATE patches its modules
    latents = initial_latents()
    with torch.no_grad():
        theirs = tgate.TgatePixArtSigmaLoader(pipe).tgate(
            PROMPTS, latents=latents, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=96,
            gate_step=cache_step, sp_interval=1, fi_interval=1, warm_up=0, clean_caption=False,
            use_resolution_binning=False, output_type="latent").images
    runtime = CairText2Image(exported("tiny-pixart-sigma", with_pipeline=True))
    ours = runtime(PROMPTS, latents=latents.numpy(), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   cache_step=cache_step, height=64, width=96).latents
    assert relative(torch.from_numpy(ours), theirs) <= 1e-4
