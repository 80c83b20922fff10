"""Exported graphs: IO as specified, no cross-attention in fidelity, parity with torch at new shapes."""

import hashlib
import json

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
import torch

from cair_export.core import export as export_module
from cair_export.core import onnx_io
from cair_export.core.deep_feature import deep_branch
from cair_export.core.export import ExportConfig, export_model
from cair_export.core.graphs import CairGraph, make_inputs
from cair_export.core.models import load_model
from cair_export.core.reference import CrossAttentionCache, cross_attention_sites
from cair_runtime.errors import ValidationError
from cair_runtime.manifest import VERIFIED_NAME, load_manifest
from cair_runtime.pipeline import CairEngine

TINY_PRESETS = ("tiny-sd15", "tiny-sd21", "tiny-sdxl")


def _graph_io(path):
    model = onnx.load(str(path), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    return model, inputs, outputs


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_export_writes_manifest_and_both_graphs(exported, preset):
    folder = exported(preset)
    manifest = load_manifest(folder)
    assert {record.path for record in manifest.files} >= {"planning.onnx", "fidelity.onnx", "shallow.onnx",
                                                          "shallow_planning.onnx", "validation.json"}
    unet = load_model(preset).unet
    sites = cross_attention_sites(unet)
    assert [c.module for c in manifest.caches] == [s.module for s in sites]
    for kind, graph in manifest.graphs.items():
        _, inputs, outputs = _graph_io(folder / graph.file)
        assert inputs == [t.name for t in graph.inputs]
        assert outputs == [t.name for t in graph.outputs]
    planning = manifest.graphs["planning"]
    assert [t.name for t in planning.outputs] == ["noise_pred"] + [c.name for c in manifest.caches] + ["deep_feature"]
    sdxl = preset == "tiny-sdxl"
    expected_extra = ["text_embeds", "time_ids"] if sdxl else []
    assert [t.name for t in planning.inputs] == ["sample", "timestep", "encoder_hidden_states", *expected_extra]
    assert manifest.scheduler_config["_class_name"] == load_model(preset).scheduler_config["_class_name"]
    assert manifest.dim("latent_height").opt == 8


def _initializer_digests(model, folder):
    return {hashlib.sha256(onnx.numpy_helper.to_array(t, base_dir=str(folder)).astype(np.float32).tobytes()).hexdigest()
            for t in model.graph.initializer}


def _weight_digests(weight):
    # The exporter may store a Linear weight transposed (for MatMul): look for both layouts.
    array = weight.detach().numpy()
    return {hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in (array, array.T)}


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_fidelity_graph_has_no_cross_attention_weights_and_no_text_input(exported, preset):
    folder = exported(preset)
    unet = load_model(preset).unet
    planning, _, _ = _graph_io(folder / "planning.onnx")
    fidelity, fidelity_inputs, _ = _graph_io(folder / "fidelity.onnx")
    assert "encoder_hidden_states" not in fidelity_inputs
    context = unet.config.cross_attention_dim
    # The text width appears only in to_k/to_v weights: present in planning, absent in fidelity.
    assert any(context in t.dims for t in planning.graph.initializer)
    assert not any(context in t.dims for t in fidelity.graph.initializer)
    # Every attn2 projection weight (Q, K, V, out) is in planning and none is in fidelity.
    in_planning, in_fidelity = _initializer_digests(planning, folder), _initializer_digests(fidelity, folder)
    weights = [p for name, p in unet.named_parameters() if ".attn2." in name and name.endswith("weight")]
    assert len(weights) == 4 * len(cross_attention_sites(unet))
    for weight in weights:
        assert _weight_digests(weight) & in_planning
        assert not _weight_digests(weight) & in_fidelity
    assert len(fidelity.graph.initializer) < len(planning.graph.initializer)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_graphs_match_torch_at_shapes_unlike_the_trace(exported, preset):
    """Fresh shapes (batch 3, non-square 12x16 and 6x10 latents), not the export's own checks."""
    folder = exported(preset)
    model = load_model(preset)
    manifest = load_manifest(folder)
    branch = deep_branch(model.unet, manifest.deep_branch["branch"])
    with CrossAttentionCache(model.unet, manifest.fidelity_guidance) as cache:
        from cair_export.core.graphs import cache_specs, graph_specs
        ios = graph_specs(model, cache_specs(cache.sites), manifest.fidelity_guidance, branch)
        assert set(ios) == {"planning", "fidelity", "shallow", "shallow_planning"}  # the default export's
        for kind, io in ios.items():
            session = ort.InferenceSession(str(folder / f"{kind}.onnx"), providers=["CPUExecutionProvider"])
            graph = CairGraph(model.unet, cache, io, branch)
            for seed, (batch, h, w) in enumerate([(3, 12, 16), (1, 6, 10)]):
                inputs = make_inputs(io, {"batch": batch, "latent_height": h, "latent_width": w,
                                          "text_len": manifest.dim("text_len").opt}, seed=seed)
                with torch.no_grad():
                    expected = graph(*(torch.from_numpy(inputs[name]) for name in graph.input_names))
                actual = session.run(None, inputs)
                for a, e in zip(actual, expected):
                    e = e.numpy()
                    assert a.shape == e.shape
                    assert np.abs(a - e).max() <= 1e-4 * np.abs(e).max()


def test_validation_report_is_written(exported):
    checks = json.loads((exported("tiny-sd21") / "validation.json").read_text())
    graphs = {c["graph"] for c in checks}
    assert graphs == {"planning", "fidelity", "shallow", "shallow_planning", "chained"}
    shapes = {(c["dims"]["batch"], c["dims"]["latent_height"], c["dims"]["latent_width"]) for c in checks}
    assert len(shapes) >= 2 and any(h != w for _, h, w in shapes)
    assert all(c["relative"] <= 1e-4 for c in checks)


def test_cfg_fidelity_variant_keeps_both_halves(exported):
    manifest = load_manifest(exported("tiny-sd15", fidelity_guidance="cfg"))
    assert manifest.fidelity_guidance == "cfg"
    fidelity = {t.name: t for t in manifest.graphs["fidelity"].inputs}
    assert fidelity["sample"].shape[0] == "2*batch"
    assert fidelity[manifest.caches[0].name].shape[0] == "2*batch"


def test_failed_validation_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(ios, folder, shapes, expected, tolerance, progress, report, weights=None, **kwargs):
        report.failures.append("planning:noise_pred differs")

    monkeypatch.setattr(export_module, "validate_graphs", broken)
    out = tmp_path / "engine"
    with pytest.raises(ValidationError):
        export_model(load_model("tiny-sd15"), out, progress=lambda message: None)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_an_engine_folder_atomically(tmp_path, monkeypatch):
    """The old export goes only once the new one is in place; a failed export leaves it untouched."""
    out = tmp_path / "engine"
    export_model(load_model("tiny-sd15"), out, ExportConfig(validate=False), progress=lambda message: None)
    (out / "stale.txt").write_text("old")
    export_model(load_model("tiny-sd15"), out, ExportConfig(validate=False), overwrite=True,
                 progress=lambda message: None)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]
    load_manifest(out)

    before = {p.name: p.stat().st_ino for p in out.iterdir()}
    monkeypatch.setattr(export_module, "_export_into", lambda *args: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        export_model(load_model("tiny-sd15"), out, overwrite=True, progress=lambda message: None)
    assert {p.name: p.stat().st_ino for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_unet_graphs_store_their_weights_once(tmp_path, monkeypatch):
    """Every UNet graph points into one weights file, about the UNet's size; per-graph side files are gone."""
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 1024)  # as for a large model: side files first
    out = tmp_path / "engine"
    model = load_model("tiny-sd15")
    # Validation reads the shared file too, but its subject is tested elsewhere: not run here, for time.
    export_model(model, out, ExportConfig(validate=False), progress=lambda message: None)
    manifest = load_manifest(out)
    names = sorted(p.name for p in out.iterdir())
    assert names == [VERIFIED_NAME, "fidelity.onnx", "manifest.json", "planning.onnx", "shallow.onnx",
                     "shallow_planning.onnx", "unet.onnx", "unet_weights.bin"]
    assert {r.path for r in manifest.files} == set(names) - {"manifest.json", VERIFIED_NAME}
    unet_bytes = sum(p.numel() * p.element_size() for p in model.unet.parameters())
    assert (out / "unet_weights.bin").stat().st_size <= 1.1 * unet_bytes
    # Fidelity's weights are planning's bytes (names differ where the exporter renamed MatMul weights).
    planning, fidelity = (manifest.weights["graphs"][kind] for kind in ("planning", "fidelity"))
    assert {entry[0] for entry in fidelity.values()} <= {entry[0] for entry in planning.values()}
    assert set(fidelity) - set(planning)  # renamed ones exist, and were matched by content
    for kind in ("planning", "fidelity", "shallow", "shallow_planning", "unet"):  # unet: the switch graph
        proto = onnx.load(str(out / f"{kind}.onnx"), load_external_data=False)
        external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"unet_weights.bin"}
        assert (out / f"{kind}.onnx").stat().st_size < 1 << 20  # the weights are in the shared file



def test_export_records_its_verification_so_the_first_load_hashes_nothing(tmp_path, monkeypatch):
    import cair_runtime.manifest as manifest_module

    out = tmp_path / "engine"
    export_model(load_model("tiny-sd15"), out, ExportConfig(validate=False), progress=lambda message: None)
    hashed, original = [], manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda path: hashed.append(path.name) or original(path))
    CairEngine(out).close()
    assert hashed == ["manifest.json"]  # the graphs were hashed once, by the export


def test_every_file_an_export_writes_is_listed_with_its_sha256(tmp_path, monkeypatch):
    """Pipeline graphs' external data (SDXL's second text encoder is 2.8 GB) and tokenizers included."""
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 1024)  # every graph with a side file, as large ones
    out = tmp_path / "engine"
    export_model(load_model("tiny-sd15", with_pipeline=True), out, ExportConfig(validate=False),
                 progress=lambda message: None)  # validation.json: test_validation_report_is_written
    manifest = load_manifest(out, verify="full")
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"manifest.json", VERIFIED_NAME}
    # the text encoder's tensors live in its weights file (run-time LoRA reads base values there)
    assert {"text_encoder_weights.bin", "vae_decoder.onnx.data", "tokenizer/tokenizer.json"} <= written
    assert {record.path for record in manifest.files} == written


def test_release_unet_frees_the_torch_weights_and_still_validates_every_graph(tmp_path):
    """What `cair-export export` does to fit SDXL at 1024 px in 24 GB: the torch outputs are computed
    before the UNet goes, so every graph is still checked against it."""
    model = load_model("tiny-sd15")
    reference = load_model("tiny-sd15")  # the same seeded UNet, kept
    messages = []
    export_model(model, tmp_path / "engine", progress=messages.append, release_unet=True)
    assert all(parameter.is_meta for parameter in model.unet.parameters())
    assert any(message.startswith("released the torch UNet") for message in messages)
    checks = json.loads((tmp_path / "engine" / "validation.json").read_text())
    assert {"planning", "fidelity", "chained"} <= {check["graph"] for check in checks}
    assert all(check["relative"] <= check["tolerance"] for check in checks)
    # The graphs are the kept model's: planning's noise prediction matches it at a fresh input.
    with CrossAttentionCache(reference.unet) as cache:
        from cair_export.core.graphs import cache_specs, graph_specs

        io = graph_specs(reference, cache_specs(cache.sites), "none")["planning"]
        inputs = make_inputs(io, {"batch": 1, "latent_height": 8, "latent_width": 8, "text_len": reference.text_len},
                             seed=5)
        with torch.no_grad():
            expected = CairGraph(reference.unet, cache, io)(*(torch.from_numpy(inputs[s.name]) for s in io.inputs))
    session = ort.InferenceSession(str(tmp_path / "engine" / "planning.onnx"))
    actual = session.run(["noise_pred"], inputs)[0]
    np.testing.assert_allclose(actual, expected[0].numpy(), rtol=0, atol=1e-4 * float(np.abs(expected[0]).max()))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_low_precision_export_checks_the_lowered_graphs_and_stores_them_once(exported, dtype):
    """`--dtype fp16|bf16`: the shipped graphs are the lowered ones; they are what validation checked
    (against the fp32 torch model, at the dtype's tolerance), and their weights are stored once."""
    from onnx import helper

    from cair_export.core.verify import TOLERANCES

    folder = exported("tiny-sd21", dtype=dtype)
    manifest = load_manifest(folder, verify="full")
    assert manifest.model["dtype"] == {"fp16": "float16", "bf16": "bfloat16"}[dtype]
    precision = json.loads((folder / "precision.json").read_text())
    checks = precision["validation"]["checks"]
    assert {check["graph"] for check in checks} == {"planning", "fidelity", "shallow", "shallow_planning", "chained"}
    tolerance = TOLERANCES[dtype]
    assert precision["validation"]["failures"] == [] and all(check["tolerance"] == tolerance for check in checks)
    rows = json.loads((folder / "validation.json").read_text())
    assert [row for row in rows if row["graph"] == "planning"] == [c for c in checks if c["graph"] == "planning"]
    # One weights file, in the low type, that both graphs point into: about half the fp32 one.
    low = np.dtype(helper.tensor_dtype_to_np_dtype({"fp16": onnx.TensorProto.FLOAT16,
                                                     "bf16": onnx.TensorProto.BFLOAT16}[dtype])).name
    record = manifest.weights["graphs"]
    assert {entry[2] for entry in record["planning"].values()} >= {low}
    fp32 = (exported("tiny-sd21") / "unet_weights.bin").stat().st_size
    bound = 0.6 if dtype == "fp16" else 0.8  # bf16 keeps convolution weights fp32 under opset 17
    assert (folder / "unet_weights.bin").stat().st_size < bound * fp32
    assert not any(name.endswith(".onnx.data") for name in (f.path for f in manifest.files))


def test_fp16_engine_runs_close_to_the_fp32_one(exported):
    folders = {dtype: exported("tiny-sd21", dtype=dtype) for dtype in ("fp32", "fp16")}
    latents = {}
    for dtype, folder in folders.items():
        with CairEngine(folder) as engine:
            # On the CPU a low-precision engine's sessions share one mapped copy (they would each fold
            # the fp16 weights into an fp32 copy otherwise); fp32 engines keep private ones by default.
            assert bool(engine.backend.weights) == (dtype == "fp16")
            text_len = engine.manifest.dim("text_len").opt
            embeds = np.random.default_rng(1).standard_normal((1, text_len, engine.context_dim), dtype=np.float32)
            latents[dtype] = engine.denoise(prompt_embeds=embeds, negative_prompt_embeds=-embeds,
                                            num_inference_steps=4, cache_step=2, seed=3).latents
    assert np.isfinite(latents["fp16"]).all()
    error = np.abs(latents["fp16"] - latents["fp32"]).max() / np.abs(latents["fp32"]).max()
    assert error < 2e-2, error
