"""LoRA adapters: swapped at run time (numpy, no torch) == fused at export == diffusers fused.

Adapters are made here with peft at random init (both factors non-zero) on the UNet's attention,
feed-forward and resnet convolutions and on every text encoder, saved with diffusers'
``save_lora_weights`` (peft layout with ``lora_alpha`` in the metadata). The oracle is diffusers'
own loader and ``fuse_lora`` (``cair_export.core.lora.fuse_loras``) run in torch.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from cair_export.cli import main as cair_export_main
from cair_export.core.lora import fuse_loras
from cair_export.core.models import load_model
from cair_runtime.cli import main as cair_run
from cair_runtime.errors import InvalidInputError
from cair_runtime.lora import parse_lora_arg
from cair_runtime.pipeline import CairEngine
from cair_runtime.text2image import CairText2Image

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]  # conv1: 3x3 convolutions
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
PROMPT = "a small red circle on a white background"
SCALE = 0.7
TOLERANCE = 1e-4  # relative (max abs error / max abs reference) on latents, fp32


def make_lora(preset: str, path: Path, seed: int = 0, rank: int = 4, alpha: float = 8.0) -> Path:
    """A random-init LoRA for ``preset``'s UNet and text encoder(s), saved as diffusers saves one."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = load_model(preset, with_pipeline=True).diffusers_pipeline()
    torch.manual_seed(seed)

    def adapt(module, targets):
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=targets)
        inject_adapter_in_model(config, module)
        state = {k: (v * 0.1 if "lora_B" in k else v).contiguous() for k, v in get_peft_model_state_dict(module).items()}
        return state, {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}

    layers = {"unet": adapt(pipe.unet, UNET_TARGETS), "text_encoder": adapt(pipe.text_encoder, TEXT_TARGETS)}
    if hasattr(pipe, "text_encoder_2"):
        layers["text_encoder_2"] = adapt(pipe.text_encoder_2, TEXT_TARGETS)
    kwargs = {f"{name}_lora_layers": state for name, (state, _) in layers.items()}
    kwargs.update({f"{name}_lora_adapter_metadata": meta for name, (_, meta) in layers.items()})
    type(pipe).save_lora_weights(str(path.parent), weight_name=path.name, safe_serialization=True, **kwargs)
    return path


@pytest.fixture(scope="session")
def lora_file(tmp_path_factory):
    files: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in files:
            files[preset] = make_lora(preset, tmp_path_factory.mktemp("lora") / f"{preset}-lora.safetensors")
        return files[preset]

    return get


def _relative(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _initial_latents(runtime: CairText2Image, seed: int) -> np.ndarray:
    shape = (runtime.engine.in_channels, *runtime.engine.latent_size(None, None))
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)[None]


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sd21", "tiny-sdxl", "shapes"])
def test_runtime_lora_equals_fused_export_and_diffusers(exported, lora_file, preset):
    path = lora_file(preset)
    runtime = CairText2Image(exported(preset, with_pipeline=True))
    steps, call = 4, dict(num_inference_steps=4, guidance_scale=5.0, seed=3)
    base = runtime(PROMPT, cache_step=2, **call)
    swapped = {n: runtime(PROMPT, cache_step=n, loras=[(path, SCALE)], **call) for n in (2, steps)}
    unloaded = runtime(PROMPT, cache_step=2, loras=[], **call)
    assert np.array_equal(unloaded.latents, base.latents) and np.array_equal(unloaded.images, base.images)
    assert _relative(swapped[2].latents, base.latents) > 1e-2  # the adapter changes the image
    assert swapped[2].parameters[0]["loras"] == [{"file": path.name, "scale": SCALE}]

    fused_folder = exported(preset, with_pipeline=True, validate=False, loras=((str(path), SCALE),))
    fused_manifest = json.loads((fused_folder / "manifest.json").read_text())
    assert [(a["file"], a["scale"]) for a in fused_manifest["lora"]["fused"]] == [(path.name, SCALE)]
    fused = CairText2Image(fused_folder)
    for n in (2, steps):
        assert _relative(swapped[n].latents, fused(PROMPT, cache_step=n, **call).latents) <= TOLERANCE

    model = load_model(preset, with_pipeline=True)
    fuse_loras(model, [(path, SCALE)])
    pipe = model.diffusers_pipeline()
    latents = torch.from_numpy(_initial_latents(runtime, 3))
    expected = pipe(PROMPT, latents=latents, num_inference_steps=steps, guidance_scale=5.0,
                    output_type="latent").images.numpy()
    assert _relative(swapped[steps].latents, expected) <= TOLERANCE


def test_targets_cover_both_graphs_and_attn2_only_in_planning(exported):
    manifest = json.loads((exported("tiny-sd21", with_pipeline=True) / "manifest.json").read_text())
    targets = manifest["lora"]["targets"]
    planning, fidelity = targets["planning"]["weights"], targets["fidelity"]["weights"]
    attn2 = {w for w in planning if ".attn2." in w}
    assert attn2 and not attn2 & set(fidelity)  # cross-attention deltas act through planning's caches
    assert set(fidelity) == set(planning) - attn2
    assert not targets["planning"]["unmapped"] and not targets["fidelity"]["unmapped"]
    layouts = {entry[1] for entries in planning.values() for entry in entries}
    assert layouts == {"same", "transposed"}  # Conv/Gemm weights as they are, MatMul weights transposed
    assert targets["text_encoder"]["weights"]


def _kohya(path: Path, out: Path) -> Path:
    """The same adapter in kohya's layout: lora_unet_/lora_te_ names, lora_down/lora_up and alpha tensors."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as handle:
        meta = json.loads(handle.metadata()["lora_adapter_metadata"])
    tensors, alphas = {}, {}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    for key, value in load_file(str(path)).items():
        model, _, rest = key.partition(".")
        module, part = rest.rsplit(".lora_", 1)
        name = prefixes[model] + ("text_model." + module if model != "unet" else module).replace(".", "_")
        tensors[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
        alphas[f"{name}.alpha"] = np.array(meta[f"{model}.lora_alpha"], dtype=np.float32)
    save_file({**tensors, **alphas}, str(out))
    return out


def test_kohya_layout_matches_diffusers_conversion(exported, lora_file, tmp_path):
    path = _kohya(lora_file("tiny-sd15"), tmp_path / "kohya.safetensors")
    engine = CairEngine(exported("tiny-sd15", with_pipeline=True))
    kohya = engine.resolve_loras([(path, SCALE)])
    peft = engine.resolve_loras([(lora_file("tiny-sd15"), SCALE)])
    assert kohya.overrides.keys() == peft.overrides.keys() == {"planning", "fidelity", "shallow", "shallow_planning",
                                                                "text_encoder"}
    for kind, values in peft.overrides.items():
        assert values.keys() == kohya.overrides[kind].keys()
        for name, value in values.items():
            np.testing.assert_allclose(kohya.overrides[kind][name], value, rtol=0, atol=1e-6)
    # diffusers' own kohya conversion fuses the same weights
    model = load_model("tiny-sd15", with_pipeline=True)
    fuse_loras(model, [(path, SCALE)])
    targets = engine.manifest.lora["targets"]["planning"]["weights"]
    params = dict(model.unet.named_parameters())
    for weight, entries in targets.items():
        name, layout = entries[0][0], entries[0][1]
        if name in kohya.overrides["planning"]:
            ours = kohya.overrides["planning"][name]
            np.testing.assert_allclose(ours if layout == "same" else ours.T, params[weight].detach().numpy(),
                                       rtol=0, atol=1e-5)
    engine.close()


def _refused(call, *needles):
    with pytest.raises(InvalidInputError) as error:
        call()
    assert error.value.field == "loras" and len(str(error.value).splitlines()) == 1
    for needle in needles:
        assert needle in str(error.value), str(error.value)


def test_bad_adapters_are_refused_and_change_nothing(exported, lora_file, tmp_path):
    runtime = CairText2Image(exported("tiny-sd15", with_pipeline=True))
    call = dict(num_inference_steps=2, cache_step=1, seed=0)
    base = runtime(PROMPT, **call)
    good = load_file(str(lora_file("tiny-sd15")))
    bad_key = {**good, "unet.down_blocks.0.attentions.0.no_such_layer.lora_A.weight": np.ones((4, 32), np.float32),
               "unet.down_blocks.0.attentions.0.no_such_layer.lora_B.weight": np.ones((32, 4), np.float32)}
    up = next(k for k in good if k.startswith("unet.") and "lora_B" in k)
    wrong_rank = {**good, up: np.ones((good[up].shape[0], 3), np.float32)}
    other_model = lora_file("tiny-sd21")  # 1024-wide cross-attention: shapes do not fit tiny-sd15
    for name, tensors in (("bad_key", bad_key), ("wrong_rank", wrong_rank)):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    for suffix in (".bin", ".pt", ".ckpt"):
        torch.save({"x": torch.zeros(1)}, tmp_path / f"pickle{suffix}")
    torch.save({"x": torch.zeros(1)}, tmp_path / "disguised.safetensors")  # a pickle under the right name
    cases = [([(tmp_path / "bad_key.safetensors", 1.0)], "no_such_layer", "not a weight"),
             ([(tmp_path / "wrong_rank.safetensors", 1.0)], "ranks must agree"),
             ([(other_model, 1.0)], "does not make the weight's shape"),
             ([(tmp_path / "pickle.bin", 1.0)], "pickle"), ([(tmp_path / "pickle.pt", 1.0)], "pickle"),
             ([(tmp_path / "pickle.ckpt", 1.0)], "pickle"), ([(tmp_path / "disguised.safetensors", 1.0)], "header"),
             ([(lora_file("tiny-sd15"), float("nan"))], "finite"), ([(lora_file("tiny-sd15"), float("inf"))], "finite"),
             ([(tmp_path / "missing.safetensors", 1.0)], "does not exist")]
    runtime(PROMPT, loras=[(lora_file("tiny-sd15"), 1.0)], **call)  # a good adapter in place, then bad ones
    for loras, *needles in cases:
        _refused(lambda: runtime(PROMPT, loras=loras, **call), *needles)
    assert runtime.engine.adapters.active == runtime.engine.resolve_loras([(lora_file("tiny-sd15"), 1.0)]).key
    assert np.array_equal(runtime(PROMPT, loras=[], **call).latents, base.latents)


def test_cli_lora_and_one_line_errors(exported, lora_file, tmp_path, capsys, one_line_error):
    folder = str(exported("tiny-sd15", with_pipeline=True))
    path = lora_file("tiny-sd15")
    assert parse_lora_arg(f"{path}:0.5") == (str(path), 0.5) and parse_lora_arg(str(path)) == (str(path), 1.0)
    out = tmp_path / "out.png"
    assert cair_run([folder, PROMPT, "-o", str(out), "--steps", "2", "--cache-step", "1", "--lora", f"{path}:{SCALE}"]) == 0
    from PIL import Image
    assert json.loads(Image.open(out).text["parameters"])["loras"] == [{"file": path.name, "scale": SCALE}]
    capsys.readouterr()
    (tmp_path / "a.pt").write_bytes(b"\x80\x04")
    for argv, needle in (([folder, PROMPT, "-o", str(tmp_path / "b.png"), "--lora", f"{tmp_path / 'a.pt'}"], "pickle"),
                         ([folder, PROMPT, "-o", str(tmp_path / "b.png"), "--lora", f"{path}:nan"], "finite")):
        one_line_error(cair_run(argv), capsys.readouterr().err, needle)
    code = cair_export_main(["export", "tiny-sd15", str(tmp_path / "engine"), "--lora", f"{path}:inf"])
    one_line_error(code, capsys.readouterr().err, "finite")
    assert not (tmp_path / "engine").exists() and not (tmp_path / "b.png").exists()


def test_threads_on_different_adapters_match_serial_calls(exported, lora_file):
    runtime = CairText2Image(exported("tiny-sd21", with_pipeline=True), max_concurrency=2)
    call = dict(num_inference_steps=3, cache_step=1)
    choices = [[], [(lora_file("tiny-sd21"), SCALE)], [(lora_file("tiny-sd21"), -0.5)]]
    serial = {(k, seed): runtime(PROMPT, seed=seed, loras=choices[k], **call).latents
              for k in range(3) for seed in (0, 1)}
    results, errors = {}, []

    def work(index):
        try:
            for round_ in range(3):
                k, seed = (index + round_) % 3, index % 2
                results[index, round_] = ((k, seed), runtime(PROMPT, seed=seed, loras=choices[k], **call).latents)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 12
    for key, latents in results.values():
        assert np.array_equal(latents, serial[key]), key


def test_runtime_lora_on_a_deep_schedule_equals_the_fused_export(exported, lora_file):
    """The shallow graph gets the adapter's weights too: a schedule with guidance stop and deep interval
    gives, swapped at run time, what the adapter fused before tracing gives."""
    path, deep = lora_file("tiny-sd15"), {"fidelity_guidance": "cfg", "deep_branch": 1}
    runtime = CairText2Image(exported("tiny-sd15", with_pipeline=True, **deep))
    fused = CairText2Image(exported("tiny-sd15", with_pipeline=True, validate=False, loras=((str(path), SCALE),),
                                    **deep))
    call = dict(num_inference_steps=8, guidance_scale=5.0, seed=3, cache_step=2, guidance_stop=4, deep_interval=3)
    base = runtime(PROMPT, **call)
    swapped = runtime(PROMPT, loras=[(path, SCALE)], **call)
    assert swapped.timings.shallow_steps == 4  # 6 steps after n: full, shallow, shallow, full, shallow, shallow
    assert _relative(swapped.latents, base.latents) > 1e-2
    assert _relative(swapped.latents, fused(PROMPT, **call).latents) <= TOLERANCE
