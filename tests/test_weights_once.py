"""The UNet's weights once: on disk (one file both graphs point into) and, on request, in memory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cair_runtime.errors import ManifestError
from cair_runtime.manifest import load_manifest
from cair_runtime.pipeline import CairEngine


def _inputs(engine, batch=2):
    rng = np.random.default_rng(0)
    text_len = engine.manifest.dim("text_len").opt
    return {"prompt_embeds": rng.standard_normal((batch, text_len, engine.context_dim), dtype=np.float32),
            "negative_prompt_embeds": rng.standard_normal((batch, text_len, engine.context_dim), dtype=np.float32)}


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
def test_both_sessions_use_one_buffer_per_weight(exported, preset):
    with CairEngine(exported(preset), share_weights=True) as engine:
        planning, fidelity = engine.backend.weights["planning"], engine.backend.weights["fidelity"]
        buffers = {id(value): value for value in planning.values()}
        # Every weight fidelity takes is one of planning's buffers (same object, same memory), also
        # where the exporter gave it another name.
        assert fidelity and all(id(value) in buffers for value in fidelity.values())
        renamed = [name for name in fidelity if name not in planning]
        assert renamed
        record = engine.manifest.weights["graphs"]
        for name in renamed:
            twin = next(n for n, entry in record["planning"].items() if entry[0] == record["fidelity"][name][0])
            assert fidelity[name].data_ptr() == planning[twin].data_ptr()


def test_shared_weights_compute_what_private_ones_do(exported):
    # Sharing turns onnxruntime's prepacking off, whose GEMM rounds differently: equal to ~1e-6.
    folder = exported("tiny-sd21")
    with CairEngine(folder, share_weights=True) as shared, CairEngine(folder) as private:
        assert private.backend.weights == {}
        for scheduler in ("ddim", "euler-ancestral"):
            a = shared.denoise(**_inputs(shared), num_inference_steps=5, cache_step=2, scheduler=scheduler, seed=4)
            b = private.denoise(**_inputs(private), num_inference_steps=5, cache_step=2, scheduler=scheduler, seed=4)
            assert np.abs(a.latents - b.latents).max() <= 1e-4 * np.abs(b.latents).max()


def test_weights_record_pointing_outside_the_file_is_refused(exported, tmp_path):
    import shutil

    folder = tmp_path / "engine"
    shutil.copytree(exported("tiny-sd15"), folder)
    data = json.loads((folder / "manifest.json").read_text())
    name, entry = next(iter(data["weights"]["graphs"]["fidelity"].items()))
    entry[0] = 10**12
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=f"fidelity weight '{name}'.*does not describe a tensor inside"):
        load_manifest(folder)


def test_shared_weights_take_the_constants_the_exporter_stored_aside(tmp_path):
    """Over 2 GB torch's exporter stores Constant values in side files too; sharing the weights removes those
    files, so the values come back into the graph (a PixArt-Sigma export failed to load without this)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from cair_export.core.onnx_io import share_weights

    weight = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    ones = helper.make_node("Constant", [], ["ones"], value=numpy_helper.from_array(np.ones(64, np.float32), "c"))
    nodes = [ones, helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "ones"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(weight, "w")])
    raw = tmp_path / ".planning-raw"
    raw.mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(raw / "planning.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0, convert_attribute=True)
    assert len(list(raw.iterdir())) == 3  # the graph, the weight and the constant, each in its own file
    files, _ = share_weights(tmp_path, {"planning": [".planning-raw/planning.onnx"]})
    assert not raw.exists()
    session = ort.InferenceSession(str(tmp_path / "planning.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 64), dtype=np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weight + 1, rtol=1e-6)
