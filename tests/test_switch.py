"""The switch graph (``unet.onnx``): planning and fidelity as one graph, run by one onnxruntime session.

Oracle: the two graphs it is made from, in onnxruntime with the same settings, bit for bit; and
what each phase may not read (fidelity the text, planning the cached outputs), fed NaNs.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cair_export.core import export as export_module
from cair_export.core.switch import SwitchGraphError, module_scope, write_switch_graph
from cair_runtime.backends.onnxruntime import switch_feeds
from cair_runtime.manifest import load_manifest
from cair_runtime.pipeline import CairEngine

CASES = {  # the exports other tests share, and schedules that reach every step kind
    "tiny-sd15": ({}, {}),
    "tiny-sdxl": ({"with_pipeline": True}, {}),
    "tiny-sd15-deep": ({"fidelity_guidance": "cfg", "deep_branch": 1}, {"guidance_stop": 4, "deep_interval": 2}),
    "tiny-sd21-deep": ({"fidelity_guidance": "cfg", "deep_branch": 1},
                       {"guidance_stop": 2, "deep_interval": 3, "skip_mode": "non-uniform"}),
    # transformers: the text mask too; Sana's block-range cut (shallow steps read the switch graph's deep feature)
    "tiny-pixart-sigma": ({}, {}),
    "tiny-sana-deep": ({}, {"guidance_stop": 4, "deep_interval": 2}),
}


def _embeddings(engine, batch=2):
    rng = np.random.default_rng(0)
    text_len = engine.manifest.dim("text_len").opt
    inputs = {"prompt_embeds": rng.standard_normal((batch, text_len, engine.context_dim), dtype=np.float32),
              "negative_prompt_embeds": rng.standard_normal((batch, text_len, engine.context_dim), dtype=np.float32)}
    if engine.manifest.transformer:  # a prompt's tokens, then padding
        inputs |= {"attention_mask": (np.arange(text_len) < np.array([[3], [text_len]])).astype(np.float32),
                   "negative_attention_mask": (np.arange(text_len) < np.array([[1], [5]])).astype(np.float32)}
    if engine.pooled_dim:
        inputs |= {"text_embeds": rng.standard_normal((batch, engine.pooled_dim), dtype=np.float32),
                   "negative_text_embeds": rng.standard_normal((batch, engine.pooled_dim), dtype=np.float32)}
    return inputs


@pytest.mark.parametrize("case", CASES)
def test_one_session_generates_what_the_two_graphs_do_bit_for_bit(exported, case):
    config, schedule = CASES[case]
    folder = exported(case.removesuffix("-deep"), **config)
    assert load_manifest(folder).switch is not None
    with CairEngine(folder) as one, CairEngine(folder, one_graph=False) as two:
        sessions = one.backend.sessions
        assert sessions["planning"] is sessions["fidelity"]  # one session: each weight once
        assert two.backend.sessions["planning"] is not two.backend.sessions["fidelity"]
        for scheduler in ("ddim", "euler-ancestral") if not one.manifest.transformer else (None,):
            kwargs = dict(**_embeddings(one), num_inference_steps=7, cache_step=2, scheduler=scheduler, seed=5,
                          **schedule)
            assert np.array_equal(one.denoise(**kwargs).latents, two.denoise(**kwargs).latents)


def test_switch_graph_structure_holds_each_weight_once(exported):
    folder = exported("tiny-sd21")
    manifest = load_manifest(folder)
    switch = onnx.load(str(folder / manifest.switch["file"]), load_external_data=False).graph
    planning = onnx.load(str(folder / "planning.onnx"), load_external_data=False).graph
    # Planning's initializers, the same entries into the one weights file: nothing added or copied.
    assert {(t.name, tuple((e.key, e.value) for e in t.external_data)) for t in switch.initializer} == \
           {(t.name, tuple((e.key, e.value) for e in t.external_data)) for t in planning.initializer}
    branches = [node for node in switch.node if node.op_type == "If"]
    assert len(branches) == len(manifest.caches)
    for cache in manifest.caches:  # no cross-attention projection outside its branch
        scope = module_scope(cache.module)
        assert not [node.name for node in switch.node if node.name.startswith(scope) and node.op_type == "MatMul"]
    # what only a module reads (a UNet block's norm2, in front of its attn2) runs in that module's branch
    computed = [inner.name for node in branches for attribute in node.attribute if attribute.name == "else_branch"
                for inner in attribute.g.node]
    assert not [node.name for node in switch.node if "transformer_blocks.0/norm2/" in node.name]
    assert [name for name in computed if "transformer_blocks.0/norm2/" in name]
    inputs = {value.name: value for value in switch.input}
    assert inputs[manifest.switch["condition"]].type.tensor_type.elem_type == onnx.TensorProto.BOOL
    assert set(manifest.switch["cache_inputs"].values()) <= set(inputs)
    assert len(switch.node) < len(planning.node)


def test_a_transformers_text_only_work_runs_only_on_planning_steps(exported):
    """The caption projection (Sana's caption norm too) and the text mask's bias read only the text: they sit
    in the else branch of one more If on the condition."""
    for preset in ("tiny-pixart-sigma", "tiny-sana"):
        folder = exported(preset)
        manifest = load_manifest(folder)
        switch = onnx.load(str(folder / manifest.switch["file"]), load_external_data=False).graph
        outside = [node for node in switch.node if node.op_type != "If"]
        assert not [node.name for node in outside if "caption_" in node.name]
        text_inputs = {"encoder_hidden_states", "encoder_attention_mask"}
        assert not [node.name for node in outside if text_inputs & set(node.input)]
        assert len([node for node in switch.node if node.op_type == "If"]) == len(manifest.caches) + 1
        planning = onnx.load(str(folder / "planning.onnx"), load_external_data=False).graph
        assert {"MatMul", "Gemm"} & {node.op_type for node in planning.node if "caption_projection" in node.name}


@pytest.mark.parametrize("preset", ["tiny-sd21", "tiny-pixart-sigma"])
@pytest.mark.parametrize("kind", ["planning", "fidelity"])
def test_each_phase_ignores_what_it_must_not_read(exported, kind, preset):
    # Fidelity must not read the text (nor a transformer's text mask); planning must not read the cached
    # outputs: NaNs there change nothing.
    folder = exported(preset)
    manifest = load_manifest(folder)
    rng = np.random.default_rng(1)
    side = 8 if preset == "tiny-sd21" else 4
    dims = {"batch": 1, "latent_height": side, "latent_width": side, "text_len": manifest.dim("text_len").opt}

    def inputs(graph: str) -> dict[str, np.ndarray]:
        return {spec.name: (np.array([500.0], np.float32) if spec.name == "timestep" else
                            np.ones(spec.resolve(dims), np.float32) if spec.name == "encoder_attention_mask" else
                            rng.standard_normal(spec.resolve(dims), dtype=np.float32))
                for spec in manifest.graphs[graph].inputs}

    own = inputs(kind)
    names = [spec.name for spec in manifest.graphs[kind].outputs]
    expected = ort.InferenceSession(str(folder / f"{kind}.onnx")).run(names, own)
    feeds = {manifest.switch["cache_inputs"].get(name, name): value for name, value in own.items()}
    feeds |= {name: np.full_like(value, np.nan) if value.dtype == np.float32 else value
              for name, value in switch_feeds(manifest, kind).items()}
    actual = ort.InferenceSession(str(folder / manifest.switch["file"])).run(names, feeds)
    for name, a, b in zip(names, actual, expected):
        assert np.array_equal(a, b), name


def test_export_drops_a_switch_graph_that_differs(exported, monkeypatch, tmp_path):
    # A switch graph whose cached branch negates the cache: the export's check finds it and ships the two graphs.
    def wrong(folder, caches, deep_feature=None):
        record = write_switch_graph(folder, caches, deep_feature)
        model = onnx.load(str(folder / record["file"]), load_external_data=False)
        branch = next(node for node in model.graph.node if node.op_type == "If").attribute
        then = next(attribute.g for attribute in branch if attribute.name == "then_branch")
        then.node[0].op_type = "Neg"
        onnx.save_model(model, str(folder / record["file"]))
        return record

    monkeypatch.setattr(export_module, "write_switch_graph", wrong)
    messages = []
    from cair_export.core.export import ExportConfig, export_model
    from cair_export.core.models import load_model

    # unvalidated against torch: the switch check runs either way, and is what this test is about
    export_model(load_model("tiny-sd15"), tmp_path / "e", ExportConfig(validate=False), progress=messages.append)
    manifest = load_manifest(tmp_path / "e", verify="full")
    assert manifest.switch is None and not (tmp_path / "e" / "unet.onnx").exists()
    assert any(m.startswith("no switch graph: it differs from the two graphs in fidelity noise_pred") for m in messages)
    with CairEngine(tmp_path / "e") as engine:  # the two graphs, as before
        assert engine.backend.sessions["planning"] is not engine.backend.sessions["fidelity"]
        engine.denoise(**_embeddings(engine, 1), num_inference_steps=3, cache_step=1)


def test_graphs_without_exporter_scopes_get_no_switch_graph(exported, tmp_path):
    folder = tmp_path / "e"
    shutil.copytree(exported("tiny-sd15"), folder)
    caches = load_manifest(folder).caches
    renamed = [type(cache)(cache.name, cache.module.replace("attn2", "attn9"), cache.tokens, cache.channels)
               for cache in caches]
    with pytest.raises(SwitchGraphError, match="no nodes named under /unet/.*/attn9/"):
        write_switch_graph(folder, renamed)


def test_folders_without_a_switch_graph_still_run_two_sessions(exported, tmp_path):
    folder = tmp_path / "e"
    shutil.copytree(exported("tiny-sd15"), folder)
    data = json.loads((folder / "manifest.json").read_text())
    data.pop("switch")  # a folder exported before the switch graph existed
    data["files"] = [record for record in data["files"] if record["path"] != "unet.onnx"]
    (folder / "manifest.json").write_text(json.dumps(data))
    (folder / "unet.onnx").unlink()
    with CairEngine(folder) as old, CairEngine(exported("tiny-sd15")) as new:
        assert old.backend.switch is None and new.backend.switch is not None
        kwargs = dict(**_embeddings(old, 1), num_inference_steps=4, cache_step=2, seed=2)
        assert np.array_equal(old.denoise(**kwargs).latents, new.denoise(**kwargs).latents)


def test_low_precision_exports_keep_the_two_graphs(exported):
    # onnxruntime's CPU provider inserts fp32 casts around fp16 nodes and prunes them in pairs; a branch
    # boundary would keep an fp16 rounding, so the export cannot prove the bits and leaves the switch out.
    folder = exported("tiny-sd21", dtype="fp16")
    manifest = load_manifest(folder)
    assert manifest.switch is None and not (folder / "unet.onnx").exists()
    with CairEngine(folder) as engine:  # shares the mapped fp16 weights between the two sessions instead
        assert engine.backend.sessions["planning"] is not engine.backend.sessions["fidelity"]
        assert engine.backend.weights["planning"]


@pytest.mark.parametrize("change, message", [
    ("switch file is planning's", "planning.onnx lacks use_cache,"),
    ("graphs swapped", "fidelity.onnx lacks encoder_hidden_states,"),
])
def test_graphs_that_do_not_match_the_manifest_are_one_line(exported, tmp_path, capsys, one_line_error, change,
                                                            message):
    from cair_runtime.cli import main as cair_run

    folder = tmp_path / "e"
    shutil.copytree(exported("tiny-sd15", with_pipeline=True), folder)
    data = json.loads((folder / "manifest.json").read_text())
    if change == "switch file is planning's":
        data["switch"]["file"] = "planning.onnx"
        argv = []
    else:  # the two graphs' files exchanged in the manifest (both still listed with their own sha256)
        data["graphs"]["planning"]["file"], data["graphs"]["fidelity"]["file"] = "fidelity.onnx", "planning.onnx"
        argv = ["--two-graphs"]
    (folder / "manifest.json").write_text(json.dumps(data))
    out = tmp_path / "out.png"
    code = cair_run([str(folder), "a red circle", "-o", str(out), "--steps", "2", *argv])
    one_line_error(code, capsys.readouterr().err, message, "which the manifest's planning graph needs",
                   "re-export the folder", prog="cair-run")
    assert not out.exists()


def test_an_invalid_switch_graph_leaves_nothing_behind(exported, tmp_path, monkeypatch):
    folder = tmp_path / "e"
    shutil.copytree(exported("tiny-sd15"), folder)
    caches = load_manifest(folder).caches
    (folder / "unet.onnx").unlink()

    def refuse(path, *args, **kwargs):
        raise onnx.checker.ValidationError("Field 'shape' of 'type' is required but missing.")

    monkeypatch.setattr(onnx.checker, "check_model", refuse)
    with pytest.raises(SwitchGraphError, match="not valid ONNX .Field 'shape'"):
        write_switch_graph(folder, caches)
    assert not [path.name for path in folder.iterdir() if "unet.onnx" in path.name]
