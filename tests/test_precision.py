"""fp16/bf16 graphs with fp32 islands: visible in the ONNX, within tolerance of the fp32 torch model."""

import shutil

import numpy as np
import onnx
import pytest

from cair_export.core.deep_feature import deep_branch
from cair_export.core.graphs import CairGraph, cache_specs, graph_specs
from cair_export.core.models import load_model
from cair_export.core.precision import convert_graph_precision, lower_exported_graphs, precision_islands
from cair_export.core.reference import CrossAttentionCache
from cair_export.core.validation import ValidationReport, torch_outputs, validate_graphs
from cair_export.core.verify import TOLERANCES
from cair_runtime.manifest import load_manifest

SHAPES = [{"batch": 1, "latent_height": 8, "latent_width": 12, "text_len": 77}]


def _graphs(preset, source):
    """The torch modules the planning and fidelity graphs of the export ``source`` were traced from (fp32: the oracle)."""
    manifest = load_manifest(source, verify="none")
    model = load_model(preset)
    branch = deep_branch(model.unet, manifest.deep_branch["branch"]) if manifest.deep_branch else None
    cache = CrossAttentionCache(model.unet, manifest.fidelity_guidance).__enter__()
    ios = graph_specs(model, cache_specs(cache.sites), manifest.fidelity_guidance, branch)
    return {kind: CairGraph(model.unet, cache, ios[kind], branch) for kind in ("planning", "fidelity")}


def _validate(preset, source, folder, dtype, executor):
    """The export's validation loop on the lowered ``folder/<kind>.onnx`` against the fp32 torch modules."""
    graphs = _graphs(preset, source)
    expected = torch_outputs(graphs, SHAPES, progress=lambda m: None)
    report = ValidationReport()
    executors = validate_graphs({kind: graph.io for kind, graph in graphs.items()}, folder, SHAPES, expected,
                                TOLERANCES[dtype], lambda m: None, report, executor=executor)
    return report, executors


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sd21", "tiny-sdxl"])
def test_fp16_islands_are_in_the_onnx_and_accuracy_holds(exported, tmp_path, preset):
    folder = exported(preset)
    for kind in ("planning", "fidelity"):
        original = onnx.load(str(folder / f"{kind}.onnx"))
        softmax = sum(node.op_type == "Softmax" for node in original.graph.node)
        norms = sum(node.op_type in ("LayerNormalization", "InstanceNormalization") for node in original.graph.node)
        report = convert_graph_precision(folder / f"{kind}.onnx", tmp_path / f"{kind}.onnx", "fp16")
        islands = precision_islands(tmp_path / f"{kind}.onnx")
        # Every attention score and softmax, every normalisation computes in fp32; the heavy ops in fp16.
        assert islands["softmax_fp32"] == softmax and islands["softmax_low"] == 0
        assert islands["attention_scores_fp32"] == softmax
        assert islands["norm_fp32"] == norms and islands["norm_low"] == 0
        assert islands["low_compute"] > 0 and islands["casts"] > 0
        assert report["kept_fp32"]["softmax"] == softmax and report["lowered"] > 0
        converted = onnx.load(str(tmp_path / f"{kind}.onnx"))
        io = [*converted.graph.input, *converted.graph.output]
        assert {value.type.tensor_type.elem_type for value in io} == {onnx.TensorProto.FLOAT}  # IO stays float32
    # onnxruntime CPU executes it (upcasting fp16 ops it lacks kernels for); the reference
    # evaluator rounds every op in fp16, the stricter check.
    for executor in ("auto", "reference"):
        report, _ = _validate(preset, folder, tmp_path, "fp16", executor)
        assert report.failures == [], report.failures
        assert max(check["relative"] for check in report.checks) < 2e-2


def test_bf16_keeps_convolutions_fp32_under_opset_17_and_runs_in_the_reference_evaluator(exported, tmp_path):
    folder = exported("tiny-sd21")
    for kind in ("planning", "fidelity"):
        report = convert_graph_precision(folder / f"{kind}.onnx", tmp_path / f"{kind}.onnx", "bf16")
        assert report["dtype"] == "bfloat16"
        assert report["kept_fp32_ops"]["Conv"] > 0  # ONNX Conv takes bfloat16 only from opset 22
        assert precision_islands(tmp_path / f"{kind}.onnx")["softmax_low"] == 0
    report, executors = _validate("tiny-sd21", folder, tmp_path, "bf16", "auto")
    assert report.failures == []
    assert "onnx.reference" in executors["planning"]  # onnxruntime CPU has no bf16 Gemm


def test_lower_exported_graphs_replaces_the_folder_graphs(exported, tmp_path):
    folder = tmp_path / "engine"
    shutil.copytree(exported("tiny-sd21"), folder)
    files, report = lower_exported_graphs(["planning", "fidelity"], folder, "fp16", progress=lambda m: None)
    assert files == ["planning.onnx", "planning.onnx.data", "fidelity.onnx", "fidelity.onnx.data"]
    assert report["graphs"]["planning"]["islands"]["softmax_low"] == 0
    model = onnx.load(str(folder / "planning.onnx"))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)


def test_unknown_precision_is_refused(exported, tmp_path):
    from cair_runtime.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="fp16 or bf16"):
        convert_graph_precision(exported("tiny-sd21") / "planning.onnx", tmp_path / "x.onnx", "int8")


def test_fp16_overflowing_weights_are_clipped_and_counted(tmp_path):
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.array([[1e6, 1.0], [2.0, 3.0]], np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    report = convert_graph_precision(tmp_path / "m.onnx", tmp_path / "m16.onnx", "fp16")
    assert report["values_clipped"] == 1 and report["lowered"] == 1 and report["casts_inserted"] == 2


def test_branch_bodies_read_fp32_versions_of_lowered_tensors(tmp_path):
    """An If whose branches read a tensor from outside (as a traced data-dependent squeeze does): the lowered
    MatMul makes it fp16, so the branches must get an fp32 cast of it; the graph checks and computes the same."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    float32 = onnx.TensorProto.FLOAT
    weight = numpy_helper.from_array(np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), "w")
    branch = {name: helper.make_graph([helper.make_node(op, ["y"], [f"out_{name}"])], name, [],
                                      [helper.make_tensor_value_info(f"out_{name}", float32, [1, 2])])
              for name, op in (("then", "Neg"), ("else", "Identity"))}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("If", ["flag"], ["z"], then_branch=branch["then"], else_branch=branch["else"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", float32, [1, 2]),
                                           helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("z", float32, [1, 2])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    convert_graph_precision(tmp_path / "m.onnx", tmp_path / "m16.onnx", "fp16")  # raised on the body's types
    session = ort.InferenceSession(str(tmp_path / "m16.onnx"), providers=["CPUExecutionProvider"])
    x = np.array([[1.0, -1.0]], np.float32)
    for flag, sign in ((True, -1), (False, 1)):
        (z,) = session.run(None, {"x": x, "flag": np.array(flag)})
        np.testing.assert_array_equal(z, sign * (x @ numpy_helper.to_array(weight)))  # exact in fp16 too


def test_compare_checks_fp16_graphs_against_the_fp32_reference(exported, tmp_path):
    """An fp16 folder (as `cair-export export --dtype fp16` writes it) compared with its fp32 export."""
    import dataclasses

    from cair_export.core.engine_manifest import write_manifest
    from cair_export.deploy.compare import compare_engines, format_table
    from cair_runtime.errors import InvalidInputError
    from cair_runtime.manifest import load_manifest, record_file

    reference = exported("tiny-sd21")
    folder = tmp_path / "fp16"
    shutil.copytree(reference, folder)
    files, _ = lower_exported_graphs(["planning", "fidelity"], folder, "fp16", progress=lambda m: None)
    manifest = load_manifest(folder, verify="none")  # the graphs were just rewritten
    others = [f for f in manifest.files if f.path not in files]
    write_manifest(folder, dataclasses.replace(manifest, model={**manifest.model, "dtype": "float16"},
                                               files=tuple(others) + tuple(record_file(folder, f) for f in files)))
    with pytest.raises(InvalidInputError, match="--reference"):
        compare_engines(folder, progress=lambda m: None)
    rows = compare_engines(folder, reference, progress=lambda m: None)
    assert {row.graph for row in rows} == {"planning", "fidelity"} and all(row.ok for row in rows)
    assert all(row.precision == "fp16" and row.tolerance == 2e-2 for row in rows)
    assert "| onnx fp16 (onnxruntime CPU) | planning | noise_pred | fp16 |" in format_table(rows)
