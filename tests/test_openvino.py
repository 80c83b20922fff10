"""The openvino backend: the engine folder on OpenVINO, against the onnxruntime backend as the oracle.

fp32 is tested everywhere (latents and images within a tight tolerance of onnxruntime's); bf16
only on CPUs with bf16 matrix units (skipped elsewhere, with the reason).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("openvino", reason="the openvino backend needs OpenVINO: pip install './runtime[openvino]'")

from cair_runtime import cli  # noqa: E402
from cair_runtime.backends import openvino as ov_backend  # noqa: E402
from cair_runtime.backends.openvino import choose_precision, cache_key  # noqa: E402
from cair_runtime.errors import InvalidInputError, MissingDependencyError  # noqa: E402
from cair_runtime.manifest import load_manifest  # noqa: E402
from cair_runtime.pipeline import CairEngine  # noqa: E402
from cair_runtime.text2image import CairText2Image  # noqa: E402

CASES = {  # export options, and a schedule that reaches every step kind the folder has
    "tiny-sd15": ({}, {"cache_step": 2}),
    "tiny-sd21-deep": ({"fidelity_guidance": "cfg", "deep_branch": 1},
                       {"cache_step": 2, "guidance_stop": 3, "deep_interval": 2, "skip_mode": "non-uniform"}),
}


def _has_bf16() -> bool:
    import openvino

    return "BF16" in ov_backend.cpu_capabilities(openvino.Core())


def _embeddings(engine, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    text_len = engine.manifest.dim("text_len").opt
    return {name: rng.standard_normal((batch, text_len, engine.context_dim), dtype=np.float32)
            for name in ("prompt_embeds", "negative_prompt_embeds")}


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("case", CASES)
def test_fp32_latents_match_onnxruntime(exported, case, tmp_path):
    config, schedule = CASES[case]
    folder = exported(case.removesuffix("-deep"), **config)
    with CairEngine(folder) as reference, CairEngine(folder, "openvino", precision="fp32", cache_dir=tmp_path) as engine:
        assert engine.backend.precision == "fp32"
        # two graphs by default: OpenVINO 2026.4.1 computes the switch graph's first inference wrongly
        # (and not the guided shallow graph, whose deep feature its contexts do not wire)
        assert engine.backend.files == {kind: graph.file for kind, graph in engine.manifest.schedule_graphs.items()
                                        if kind != "shallow_planning"}
        for scheduler in ("ddim", "euler-ancestral"):
            kwargs = dict(**_embeddings(engine), num_inference_steps=7, scheduler=scheduler, seed=3, **schedule)
            expected, got = reference.denoise(**kwargs).latents, engine.denoise(**kwargs).latents
            assert _relative(got, expected) < 1e-3, scheduler  # fp32 in other kernels (measured: 2e-4)


def test_caches_are_the_requests_own_tensors_across_the_switch(exported, tmp_path):
    folder = exported("tiny-sd21", fidelity_guidance="cfg", deep_branch=1)
    with CairEngine(folder, "openvino", precision="fp32", cache_dir=tmp_path) as engine:
        # guided to T: the per-half caches are read as written (a guidance stop would merge them)
        engine.denoise(**_embeddings(engine, batch=1), num_inference_steps=5, cache_step=2, guidance_stop=5,
                       deep_interval=2)
        (context,) = engine.pool.contexts
        for cache in engine.manifest.caches:
            # what planning wrote at step n is the very memory fidelity reads: no copy per step
            written = context.requests["planning"].get_tensor(cache.name).data
            read = context.requests["fidelity"].get_tensor(cache.name).data
            assert np.shares_memory(written, read)
        deep = engine.manifest.deep_branch["name"]
        assert np.shares_memory(context.requests["fidelity"].get_tensor(deep).data,
                                context.requests["shallow"].get_tensor(deep).data)


def test_text_to_image_matches_onnxruntime_and_records_the_precision(exported, tmp_path):
    folder = exported("tiny-sd21", with_pipeline=True)
    kwargs = dict(num_inference_steps=6, cache_step=2, seed=1)
    with CairText2Image(folder) as reference, \
            CairText2Image(folder, "openvino", precision="fp32", cache_dir=tmp_path) as pipeline:
        assert isinstance(pipeline.vae, ov_backend.OpenVinoSession)  # every graph on OpenVINO
        expected, got = reference(["a red circle", "a blue square"], **kwargs), \
            pipeline(["a red circle", "a blue square"], **kwargs)
    assert _relative(got.latents, expected.latents) < 1e-3
    assert np.abs(got.images.astype(int) - expected.images).max() <= 1  # uint8 rounding at most
    assert [p["precision"] for p in got.parameters] == ["fp32", "fp32"]
    assert "precision" not in expected.parameters[0]


def test_threads_share_one_engine(exported, tmp_path):
    folder = exported("tiny-sd15")
    with CairEngine(folder, "openvino", precision="fp32", max_concurrency=3, cache_dir=tmp_path) as engine:
        inputs = [dict(**_embeddings(engine, batch=1, seed=k), num_inference_steps=4, cache_step=2, seed=k)
                  for k in range(6)]
        serial = [engine.denoise(**kwargs).latents for kwargs in inputs]
        results: list = [None] * len(inputs)

        def work(k):
            results[k] = engine.denoise(**inputs[k]).latents

        threads = [threading.Thread(target=work, args=(k,)) for k in range(len(inputs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(np.array_equal(a, b) for a, b in zip(results, serial))
        assert len(engine.pool.contexts) <= 3


def test_compiled_models_are_cached_by_version_and_sha256(exported, tmp_path):
    folder = exported("tiny-sd15")
    manifest = load_manifest(folder)
    with CairEngine(folder, "openvino", precision="fp32", cache_dir=tmp_path / "cache") as engine:
        config = engine.backend.config
    blobs = sorted(path.relative_to(tmp_path) for path in (tmp_path / "cache").rglob("*.blob"))
    assert blobs, "nothing was cached"
    import openvino

    version = openvino.get_version().split("-")[0]
    key = cache_key(manifest, "fidelity.onnx", openvino.get_version(), config)
    assert key.startswith(version + "/") and (tmp_path / "cache" / key).is_dir()
    assert cache_key(manifest, "fidelity.onnx", "2099.1.0") != cache_key(manifest, "fidelity.onnx", "2026.4.1")
    assert cache_key(manifest, "fidelity.onnx", "2026.4.1", {"INFERENCE_PRECISION_HINT": "bf16"}) != \
        cache_key(manifest, "fidelity.onnx", "2026.4.1", {"INFERENCE_PRECISION_HINT": "f32"})
    with CairEngine(folder, "openvino", precision="fp32", cache_dir=tmp_path / "cache"):  # a second start reads it
        pass
    assert sorted(path.relative_to(tmp_path) for path in (tmp_path / "cache").rglob("*.blob")) == blobs


def test_a_read_only_folder_compiles_without_the_cache(exported, tmp_path):
    folder = exported("tiny-sd15")
    blocked = tmp_path / "file"
    blocked.write_text("")  # a cache root under a file cannot be created
    with CairEngine(folder, "openvino", precision="fp32", cache_dir=blocked / "cache") as engine:
        assert engine.backend.cache_root is None


def test_precision_choice():
    assert choose_precision("auto", ("BF16", "FP32", "INT8"))[0] == "bf16"
    precision, note = choose_precision("auto", ("FP32", "INT8"))
    assert precision == "fp32" and "no bf16" in note  # auto falls back and says so
    assert choose_precision("fp32", ("BF16", "FP32"))[0] == "fp32"
    with pytest.raises(InvalidInputError, match="bf16 matrix units"):
        choose_precision("bf16", ("FP32",))
    with pytest.raises(InvalidInputError, match="expected one of"):
        choose_precision("fp16", ("FP32",))


def test_auto_without_bf16_units_runs_fp32(exported, monkeypatch, tmp_path):
    monkeypatch.setattr(ov_backend, "cpu_capabilities", lambda core: ("FP32", "INT8"))
    with CairEngine(exported("tiny-sd15"), "openvino", cache_dir=tmp_path) as engine:
        assert engine.backend.precision == "fp32" and "no bf16" in engine.backend.precision_note


@pytest.mark.skipif(not _has_bf16(), reason="this CPU has no bf16 matrix units (AMX or AVX512-BF16)")
def test_bf16_runs_close_to_fp32(exported, tmp_path):
    folder = exported("tiny-sd15")
    with CairEngine(folder, "openvino", precision="fp32", cache_dir=tmp_path) as fp32, \
            CairEngine(folder, "openvino", cache_dir=tmp_path) as auto:
        assert auto.backend.precision == "bf16"
        kwargs = dict(**_embeddings(auto), num_inference_steps=6, cache_step=2, seed=1)
        expected, got = fp32.denoise(**kwargs).latents, auto.denoise(**kwargs).latents
        error = _relative(got, expected)
        assert 0 < error < 0.1  # computed in bf16 (not bit-equal), yet close; quality: docs/openvino.md


def test_missing_openvino_is_one_line(monkeypatch, exported):
    def missing(name):
        raise ImportError(name)

    monkeypatch.setattr(ov_backend, "ov", None)
    monkeypatch.setattr(ov_backend.importlib, "import_module", missing)
    with pytest.raises(MissingDependencyError, match="pip install"):
        CairEngine(exported("tiny-sd15"), "openvino")


def test_cli_runs_openvino_and_refuses_misplaced_flags(exported, tmp_path, capsys, one_line_error):
    folder = exported("tiny-sd21", with_pipeline=True)
    out = tmp_path / "a.png"
    assert cli.main([str(folder), "a red circle", "-o", str(out), "--backend", "openvino", "--precision", "fp32",
                     "--steps", "4", "--cache-step", "2"]) == 0
    from PIL import Image

    assert Image.open(out).text["precision"] == "fp32"
    capsys.readouterr()
    code = cli.main([str(folder), "x", "-o", str(out), "--precision", "bf16"])
    one_line_error(code, capsys.readouterr().err, "--precision", "openvino")
    code = cli.main([str(folder), "x", "-o", str(out), "--backend", "openvino", "--share-weights"])
    one_line_error(code, capsys.readouterr().err, "--share-weights")


@pytest.mark.parametrize("mode", ["weights", "hybrid"])
def test_quantized_graphs_run_close_to_fp32_with_provenance(exported, tmp_path, mode):
    pytest.importorskip("nncf", reason="cair-export quantize needs NNCF: pip install '.[quantize]'")
    import shutil

    from cair_export.deploy.quantize import QuantizeConfig, quantize_folder

    folder = tmp_path / "engine"
    shutil.copytree(exported("tiny-sd15"), folder)
    quantize_folder(folder, QuantizeConfig(mode=mode, generations=2, steps=6, subset_size=8), progress=lambda _: None)
    manifest = load_manifest(folder)  # sha256 of the new files checked
    records = {record.graph: record for record in manifest.engines if record.backend == "openvino"}
    assert set(records) == {"planning", "fidelity"}
    for record in records.values():
        assert record.properties["precision"] == "int8" and record.properties["mode"] == mode
        assert record.properties["nncf"] and record.properties["openvino"]
        assert (record.properties["calibration"] is None) == (mode == "weights")
        assert (folder / record.file).is_file() and (folder / record.file).with_suffix(".bin").is_file()
    with CairEngine(folder) as reference, CairEngine(folder, "openvino", precision="int8", cache_dir=tmp_path) as int8:
        assert int8.backend.files["planning"] == "planning.int8.xml"
        kwargs = dict(**_embeddings(int8, batch=1, seed=9), num_inference_steps=6, cache_step=2, seed=4)
        expected, got = reference.denoise(**kwargs).latents, int8.denoise(**kwargs).latents
        assert 0 < _relative(got, expected) < 0.1  # int8 (not bit-equal), yet close; quality: docs/openvino.md


def test_int8_without_quantized_graphs_is_refused(exported, tmp_path):
    from cair_runtime.errors import EngineMismatchError

    with pytest.raises(EngineMismatchError, match="cair-export quantize"):
        CairEngine(exported("tiny-sd15"), "openvino", precision="int8", cache_dir=tmp_path)
