"""cair-export build: profiles from the manifest's dims, the atomic manifest update, missing TensorRT."""

import json
import shutil
import sys

import onnxruntime as ort
import pytest

from cair_export.deploy.build import BuildConfig, build_engines, profile_dims, tensor_profiles
from cair_export.deploy.folder import install_engines
from cair_runtime.errors import InvalidInputError, MissingDependencyError
from cair_runtime.manifest import MANIFEST_NAME, EngineRecord, load_manifest


def _has_gpu_tensorrt() -> str | None:
    try:
        import tensorrt  # noqa: F401

        from cair_runtime.backends.tensorrt import device_info
        device_info()
    except Exception as error:  # noqa: BLE001 - any reason is a reason to skip
        return f"needs TensorRT, cuda-python and an NVIDIA GPU ({type(error).__name__}: {error})"
    return None


def test_profiles_evaluate_the_manifest_dims(exported):
    manifest = load_manifest(exported("tiny-sd21"))
    dims = profile_dims(manifest, BuildConfig())
    assert [(d.min, d.opt, d.max) for d in dims.values()] == [(1, 1, 4), (4, 8, 16), (4, 8, 16), (77, 77, 308)]
    planning = tensor_profiles(manifest.graphs["planning"], dims)
    assert planning["sample"] == ((2, 4, 4, 4), (2, 4, 8, 8), (8, 4, 16, 16))  # planning batch = 2*batch
    # Long prompts: one text-encoder window to the export's --max-prompt-chunks (4) of them.
    assert planning["encoder_hidden_states"] == ((2, 77, 1024), (2, 77, 1024), (8, 308, 1024))
    fidelity = tensor_profiles(manifest.graphs["fidelity"], dims)
    # cache_000 is level 0 (latent_height*latent_width tokens); the mid block's is level 2. One cache
    # per CFG half (the default export): batch 2*batch, as planning's.
    assert fidelity["cache_000"] == ((2, 16, 32), (2, 64, 32), (8, 256, 32))
    mid = next(cache for cache in manifest.caches if cache.module.startswith("mid_block"))
    assert mid.tokens == "cdiv(latent_height,4)*cdiv(latent_width,4)"
    assert [shape[1] for shape in fidelity[mid.name]] == [1, 4, 16]  # cdiv(4,4)**2, cdiv(8,4)**2, cdiv(16,4)**2


def test_profile_flags_narrow_the_range_and_problems_are_reported_together(exported):
    manifest = load_manifest(exported("tiny-sd21"))
    dims = profile_dims(manifest, BuildConfig(min_batch=2, opt_batch=2, max_batch=3, min_size=64, opt_size=96,
                                              max_size=96))
    assert (dims["batch"].min, dims["batch"].max) == (2, 3)
    assert (dims["latent_height"].min, dims["latent_height"].opt, dims["latent_width"].max) == (8, 12, 12)
    with pytest.raises(InvalidInputError) as error:
        profile_dims(manifest, BuildConfig(max_batch=9, min_size=20))
    assert "batch profile 1/1/9" in str(error.value) and "--min-size 20" in str(error.value)


def test_install_engines_updates_the_manifest_in_one_step(exported, tmp_path, monkeypatch):
    folder = tmp_path / "engine"
    shutil.copytree(exported("tiny-sd21"), folder)
    manifest = load_manifest(folder)

    def stage(name, content):
        staged = tmp_path / "staged" / name
        staged.parent.mkdir(exist_ok=True)
        staged.write_bytes(content)
        return staged

    records = [EngineRecord(kind, "aoti", f"{kind}.pt2", {"device": "cpu"}) for kind in ("planning", "fidelity")]
    updated = install_engines(folder, manifest, {k: stage(f"{k}.pt2", b"v1" + k.encode()) for k in ("planning", "fidelity")},
                              records)
    reloaded = load_manifest(folder)  # checks every sha256, the new files included
    assert reloaded == updated and [r.backend for r in reloaded.engines] == ["aoti", "aoti"]
    assert {"planning.pt2", "fidelity.pt2"} <= {f.path for f in reloaded.files}
    assert not list(folder.glob(".*.tmp"))

    # A second build of the same backend replaces its records; another backend's are kept.
    trt = [EngineRecord(k, "tensorrt", f"{k}.plan", {"tensorrt": "10.0"}) for k in ("planning", "fidelity")]
    install_engines(folder, reloaded, {k: stage(f"{k}.plan", b"plan") for k in ("planning", "fidelity")}, trt)
    again = install_engines(folder, load_manifest(folder),
                            {k: stage(f"{k}.pt2", b"v2") for k in ("planning", "fidelity")}, records)
    assert sorted(r.backend for r in again.engines) == ["aoti", "aoti", "tensorrt", "tensorrt"]
    assert len([f for f in again.files if f.path == "planning.pt2"]) == 1
    load_manifest(folder)

    # Interrupted while writing the new manifest: the old one is still whole and still loads.
    before = (folder / MANIFEST_NAME).read_text()
    monkeypatch.setattr("cair_export.deploy.folder.os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        install_engines(folder, again, {"planning": stage("planning.pt2", b"v3")}, records[:1])
    assert (folder / MANIFEST_NAME).read_text() == before
    json.loads(before)


def test_build_tensorrt_without_tensorrt_exits_2_with_one_line(exported, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without it
    with pytest.raises(MissingDependencyError, match=r"pip install 'cair-runtime\[tensorrt\]'"):
        build_engines(exported("tiny-sd21"), BuildConfig(backend="tensorrt"), progress=lambda m: None)

    from cair_export import cli

    code = cli.main(["build", str(exported("tiny-sd21")), "--backend", "tensorrt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install" in err[0] and "tensorrt" in err[0]


@pytest.mark.skipif(_has_gpu_tensorrt() is not None, reason=str(_has_gpu_tensorrt()))
def test_tensorrt_engines_match_onnxruntime(exported, tmp_path):  # pragma: no cover - GPU machines only
    import numpy as np

    from cair_runtime.pipeline import CairEngine

    folder = tmp_path / "engine"
    shutil.copytree(exported("tiny-sd21"), folder)
    build_engines(folder, BuildConfig(backend="tensorrt", timing_cache=str(tmp_path / "timing.cache")),
                  progress=lambda m: None)
    record = load_manifest(folder).engines[0]
    assert record.properties["compute_capability"] and record.properties["profile"]["sample"]["max"][0] == 8
    rng = np.random.default_rng(0)
    x = {"prompt_embeds": rng.standard_normal((1, 77, 1024), dtype=np.float32),
         "latents": rng.standard_normal((1, 4, 8, 12), dtype=np.float32)}
    reference = CairEngine(folder).denoise(**x, num_inference_steps=6, cache_step=3, guidance_scale=2.0).latents
    for cuda_graphs in (False, True):
        latents = CairEngine(folder, backend="tensorrt", cuda_graphs=cuda_graphs).denoise(
            **x, num_inference_steps=6, cache_step=3, guidance_scale=2.0).latents
        assert np.abs(latents - reference).max() / np.abs(reference).max() < 1e-3


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu with the CUDA execution provider (this build has "
                           f"{', '.join(ort.get_available_providers())})")
@pytest.mark.parametrize("provider", ["CUDAExecutionProvider", "TensorrtExecutionProvider"])
def test_onnxruntime_gpu_keeps_caches_on_cuda(exported, provider):  # pragma: no cover - GPU machines only
    import numpy as np

    from cair_runtime.pipeline import CairEngine

    if provider not in ort.get_available_providers():
        pytest.skip(f"{provider} is not in this onnxruntime build")
    folder = exported("tiny-sd21")
    rng = np.random.default_rng(0)
    x = {"prompt_embeds": rng.standard_normal((1, 77, 1024), dtype=np.float32),
         "latents": rng.standard_normal((1, 4, 8, 12), dtype=np.float32)}
    engine = CairEngine(folder, providers=[provider, "CPUExecutionProvider"])
    latents = engine.denoise(**x, num_inference_steps=6, cache_step=3, guidance_scale=2.0).latents
    assert {value.device_name() for value in engine.pool.contexts[0].caches.values()} == {"cuda"}
    reference = CairEngine(folder).denoise(**x, num_inference_steps=6, cache_step=3, guidance_scale=2.0).latents
    assert np.abs(latents - reference).max() / np.abs(reference).max() < 1e-3


def test_onnxruntime_gpu_provider_missing_is_a_one_line_error(exported):
    from cair_runtime.pipeline import CairEngine

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider; the error path cannot be shown here")
    with pytest.raises(MissingDependencyError, match="onnxruntime-gpu"):
        CairEngine(exported("tiny-sd21"), providers=["CUDAExecutionProvider"])
