"""Lower an exported fp32 graph to fp16 or bf16, keeping fp32 islands where low precision breaks.

TensorRT builds strongly typed (the precision builder flags were deprecated in 10.12 and removed
in 11), so precision must already be in the ONNX. This pass rewrites the fp32 graph the exporter
validated; it does not re-trace. What stays fp32, each for the reason given:

- attention scores ``QK^T`` and their softmax (SD-2.x overflows in fp16 otherwise: black images);
- normalisations (LayerNormalization; GroupNorm, which the TorchScript exporter emits as
  Reshape -> InstanceNormalization -> Reshape -> Mul -> Add);
- sinusoidal embeddings (timestep, SDXL ``time_ids``): ``sin(999 * f)`` is meaningless in fp16,
  and diffusers computes ``get_timestep_embedding`` in fp32 for its fp16 pipelines too;
- shape arithmetic (floats computed from ``Shape``) and ops without a low-precision rule here.

Everything else that computes on activations (convolutions, matmuls, elementwise, data movement)
runs in the low type, with one ``Cast`` per tensor and precision boundary. Graph inputs and
outputs stay float32 (a ``Cast`` at each edge), so the manifest's IO dtypes are unchanged and the
runtime's host math stays fp32. The same rules as onnxconverter-common's
``convert_float_to_float16(keep_io_types=True, node_block_list=...)``, decided per node from the
op schema (which inputs share the data type) rather than from a list of names.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from cair_export.core.onnx_io import TensorWriter, read_tensor, subgraphs
from cair_runtime.errors import InvalidInputError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

NORMALIZATIONS = frozenset({"LayerNormalization", "InstanceNormalization", "GroupNormalization",
                            "BatchNormalization"})
# Ops that may compute on activations in low precision: the heavy ones, elementwise ops whose
# range the surrounding fp32 islands bound, and pure data movement.
LOWERABLE = frozenset({
    "Conv", "ConvTranspose", "MatMul", "Gemm",
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sigmoid", "Tanh", "Relu", "LeakyRelu", "Erf", "Gelu",
    "Softplus", "Mish", "HardSigmoid", "Where", "Clip",
    "Reshape", "Transpose", "Concat", "Split", "Slice", "Gather", "Squeeze", "Unsqueeze", "Expand",
    "Flatten", "Identity", "Resize", "Pad", "Tile", "Shape", "Size", "Cast",
})
# Between QK^T and its Softmax: scaling, masking, casts.
_SCORE_PATH = frozenset({"Mul", "Div", "Add", "Sub", "Where", "Cast", "Identity"})
_SINUSOIDS = frozenset({"Sin", "Cos"})


def _onnx():
    import onnx

    return onnx


def _low_type(dtype: str) -> int:
    onnx = _onnx()
    if dtype not in ("fp16", "bf16"):
        raise InvalidInputError(f"precision {dtype!r} cannot be lowered to; expected fp16 or bf16")
    return onnx.TensorProto.FLOAT16 if dtype == "fp16" else onnx.TensorProto.BFLOAT16


def _elem_types(model) -> dict[str, int]:
    """Tensor name -> ONNX element type, from shape inference, inputs, outputs and initializers."""
    onnx = _onnx()
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {init.name: init.data_type for init in model.graph.initializer}
    for value in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    return types


def _data_tensors(model, types: Mapping[str, int]) -> set[str]:
    """Float tensors computed from the graph's float inputs: activations, not shape arithmetic."""
    float32 = _onnx().TensorProto.FLOAT
    data = {value.name for value in model.graph.input if types.get(value.name) == float32}
    for node in model.graph.node:  # ONNX nodes are topologically sorted
        if any(name in data for name in node.input):
            data.update(name for name in node.output if types.get(name) == float32)
    return data


def _sinusoid_ancestors(model, candidates: set[int]) -> set[int]:
    """Indices of Sin/Cos nodes and every candidate node upstream of them (the embedding math)."""
    producer = {out: index for index, node in enumerate(model.graph.node) for out in node.output}
    nodes = model.graph.node
    found: set[int] = set()
    stack = [i for i in candidates if nodes[i].op_type in _SINUSOIDS]
    while stack:
        index = stack.pop()
        if index in found:
            continue
        found.add(index)
        stack.extend(producer[name] for name in nodes[index].input if producer.get(name) in candidates)
    return found


def _attention_scores(model, candidates: set[int]) -> set[int]:
    """Indices of the MatMuls whose output reaches a Softmax only through scaling/masking: QK^T."""
    producer = {out: index for index, node in enumerate(model.graph.node) for out in node.output}
    nodes = model.graph.node
    found: set[int] = set()
    for softmax in (i for i in candidates if nodes[i].op_type == "Softmax"):
        stack = [producer.get(name) for name in nodes[softmax].input]
        while stack:
            index = stack.pop()
            if index is None or index not in candidates:
                continue
            if nodes[index].op_type == "MatMul":
                found.add(index)
            elif nodes[index].op_type in _SCORE_PATH:
                stack.extend(producer.get(name) for name in nodes[index].input)
    return found


def _formal_types(node, opset: int) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """Per actual input and output, the schema's type string ('T', 'tensor(float)'); allowed types per param."""
    schema = _onnx().defs.get_schema(node.op_type, opset, node.domain)
    variadic = _onnx().defs.OpSchema.FormalParameterOption.Variadic

    def expand(formals, count):
        if not formals:
            return []
        strings = [formal.type_str for formal in formals]
        if formals[-1].option == variadic and count > len(strings):
            strings += [strings[-1]] * (count - len(strings))
        return strings[:count]

    allowed = {c.type_param_str: list(c.allowed_type_strs) for c in schema.type_constraints}
    return expand(schema.inputs, len(node.input)), expand(schema.outputs, len(node.output)), allowed


def _lowered_params(node, opset: int, types: Mapping[str, int], low_name: str) -> set[str] | None:
    """Type params of ``node`` bound to float32 that the low type may take; None if there are none."""
    float32 = _onnx().TensorProto.FLOAT
    if node.op_type == "Cast":  # a float32 -> float32 cast (`.float()`) becomes a no-op in low precision
        to = next(a.i for a in node.attribute if a.name == "to")
        return {"T1", "T2"} if to == float32 and types.get(node.input[0]) == float32 else None
    inputs, outputs, allowed = _formal_types(node, opset)
    params = set()
    for name, formal in (*zip(node.input, inputs), *zip(node.output, outputs)):
        if name and types.get(name) == float32 and formal in allowed and f"tensor({low_name})" in allowed[formal]:
            params.add(formal)
    return params or None


def _classify(model, types: Mapping[str, int], opset: int, low_name: str) -> tuple[dict[int, set[str]], dict[int, str]]:
    """Which nodes to lower (index -> lowered type params) and which to keep fp32 (index -> why)."""
    data = _data_tensors(model, types)
    nodes = model.graph.node
    candidates = {i for i, node in enumerate(nodes) if any(name in data for name in node.input)}
    scores = _attention_scores(model, candidates)
    sinusoids = _sinusoid_ancestors(model, candidates)
    lowered: dict[int, set[str]] = {}
    kept: dict[int, str] = {}
    for index in sorted(candidates):
        node = nodes[index]
        if node.op_type == "Softmax":
            kept[index] = "softmax"
        elif index in scores:
            kept[index] = "attention scores (QK^T)"
        elif node.op_type in NORMALIZATIONS:
            kept[index] = "normalisation"
        elif index in sinusoids:
            kept[index] = "sinusoidal embedding"
        elif node.op_type not in LOWERABLE:
            kept[index] = f"no low-precision rule for {node.op_type}"
        else:
            params = _lowered_params(node, opset, types, low_name)
            if params is None and node.op_type == "Cast":
                kept[index] = "cast out of float32"
            elif params is None:
                kept[index] = f"ONNX opset {opset} {node.op_type} has no {low_name} form"
            else:
                lowered[index] = params
    return lowered, kept


def _to_low(array: np.ndarray, dtype: str) -> tuple[np.ndarray, int]:
    """fp32 values -> the low type, saturating at its largest finite value; also the count clipped."""
    if dtype == "fp16":
        limit = float(np.finfo(np.float16).max)
        clipped = int(np.count_nonzero(np.abs(array) > limit))
        return np.clip(array, -limit, limit).astype(np.float16), clipped
    import ml_dtypes  # onnx's own dependency, for bfloat16 arrays

    return array.astype(ml_dtypes.bfloat16), 0


def _outer_inputs(graph: Any) -> set[str]:
    """Tensors a (sub)graph's nodes read that it neither takes nor makes: its outer-scope references."""
    local = {value.name for value in graph.input} | {init.name for init in graph.initializer}
    read: set[str] = set()
    for node in graph.node:
        read |= {name for name in node.input if name}
        for subgraph in subgraphs(node):
            read |= _outer_inputs(subgraph)
        local |= set(node.output)
    return read - local


def _rename_inputs(graph: Any, old: str, new: str) -> None:
    """Every read of ``old`` in ``graph`` and its nested subgraphs becomes a read of ``new``."""
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name == old:
                node.input[position] = new
        for subgraph in subgraphs(node):
            _rename_inputs(subgraph, old, new)


def convert_graph_precision(src: str | Path, dst: str | Path, dtype: str) -> dict[str, Any]:
    """Rewrite the fp32 ONNX graph ``src`` as ``dst`` computing in ``dtype`` ("fp16" | "bf16").

    Returns a report: nodes lowered, nodes kept fp32 by reason and by op, casts inserted,
    initializers converted. Graph IO stays float32. Large graphs keep their tensors in one side
    file ``<dst name>.data`` (listed in the report's ``files``).
    """
    onnx = _onnx()
    from onnx import helper

    low = _low_type(dtype)
    low_name = DTYPES[dtype]
    float32 = onnx.TensorProto.FLOAT
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)  # tensors stay in their files until copied
    types = _elem_types(model)  # shape inference needs no tensor data
    dst.parent.mkdir(parents=True, exist_ok=True)
    maps: dict[Path, Any] = {}  # the source's side files, memory-mapped
    writer = TensorWriter(dst.with_name(f"{dst.name}.data"))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    lowered, kept = _classify(model, types, opset, low_name)

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    old_nodes = list(graph.node)
    produced_low: set[str] = set()  # float32 tensors that the rewritten graph holds in the low type
    outputs = {value.name for value in graph.output}
    renamed = {}  # graph outputs produced in low precision get an internal name and a final Cast
    for index, params in lowered.items():
        node = old_nodes[index]
        formals = ["T2"] if node.op_type == "Cast" else _formal_types(node, opset)[1]
        for name, formal in zip(node.output, formals):
            if name in outputs and formal in params and types.get(name) == float32:
                renamed[name] = f"{name}__{dtype}"

    new_nodes = []
    casts: dict[tuple[str, int], str] = {}
    converted: dict[str, str] = {}
    clipped = 0

    def version(name: str, want_low: bool) -> str:
        nonlocal clipped
        name = renamed.get(name, name)
        if name in initializers and initializers[name].data_type == float32:
            if not want_low:
                return name
            if name not in converted:
                array, count = _to_low(read_tensor(src.parent, initializers[name], maps), dtype)
                clipped += count
                converted[name] = f"{name}__{dtype}"
                graph.initializer.append(writer.tensor(converted[name], array))
            return converted[name]
        if (name in produced_low) == want_low:
            return name
        target = low if want_low else float32
        key = (name, target)
        if key not in casts:
            casts[key] = f"{name}__to_{'low' if want_low else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [casts[key]], to=target,
                                              name=f"{name}/precision_cast_{'low' if want_low else 'fp32'}"))
        return casts[key]

    for index, node in enumerate(old_nodes):
        params = lowered.get(index)
        for subgraph in subgraphs(node):  # If/Loop bodies read outer tensors by name: give them the fp32 ones
            for outer in _outer_inputs(subgraph):
                if types.get(outer) == float32 and renamed.get(outer, outer) in produced_low:
                    _rename_inputs(subgraph, outer, version(outer, want_low=False))
        if params is None:
            formals_in = [None] * len(node.input)
            formals_out = [None] * len(node.output)
        elif node.op_type == "Cast":
            formals_in, formals_out = ["T1"], ["T2"]
        else:
            formals_in, formals_out, _ = _formal_types(node, opset)
        new_inputs = []
        for name, formal in zip(node.input, formals_in):
            if not name or types.get(name) != float32:
                new_inputs.append(renamed.get(name, name))
                continue
            new_inputs.append(version(name, want_low=params is not None and formal in params))
        del node.input[:]
        node.input.extend(new_inputs)
        for position, (name, formal) in enumerate(zip(list(node.output), formals_out)):
            internal = renamed.get(name, name)
            node.output[position] = internal
            if params is not None and formal in params and types.get(name) == float32:
                produced_low.add(internal)
        if node.op_type == "Cast" and params is not None:
            for attribute in node.attribute:
                if attribute.name == "to":
                    attribute.i = low
        new_nodes.append(node)
    for name, internal in renamed.items():  # graph outputs stay float32
        new_nodes.append(helper.make_node("Cast", [internal], [name], to=float32, name=f"{name}/precision_cast_output"))

    used = {name for node in new_nodes for name in node.input}
    keep_inits, written = [], set(converted.values())
    for init in graph.initializer:  # the ones still used, copied one at a time (the new ones are written)
        if init.name not in used:
            continue
        if init.data_location == onnx.TensorProto.EXTERNAL and init.name not in written:
            init = writer.tensor(init.name, read_tensor(src.parent, init, maps))
        keep_inits.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]  # stale element types; inference recomputes them
    files = [dst.name, *writer.close()]
    for mapping in maps.values():
        mapping.close()
    onnx.save_model(model, str(dst))
    # Strict type checking: every node's inputs agree on their type params after the rewrite.
    onnx.checker.check_model(str(dst), full_check=True)
    return {
        "dtype": low_name,
        "source": src.name,
        "files": files,
        "nodes": len(old_nodes),
        "lowered": len(lowered),
        "kept_fp32": dict(Counter(kept.values())),
        "kept_fp32_ops": dict(Counter(old_nodes[i].op_type for i in kept)),
        "casts_inserted": len(casts) + len(renamed),
        "initializers_converted": len(converted),
        "values_clipped": clipped,
    }


def precision_islands(path: str | Path) -> dict[str, int]:
    """Count, from the ONNX itself, where a converted graph computes in fp32 and where in low precision.

    ``softmax_fp32``/``softmax_low``: Softmax nodes by input type; ``attention_scores_fp32``:
    MatMuls feeding a Softmax with fp32 output; ``norm_fp32``/``norm_low``: normalisation nodes;
    ``low_compute``: Conv/ConvTranspose/MatMul/Gemm in fp16/bf16; ``casts``: Cast nodes.
    """
    onnx = _onnx()
    model = onnx.load(str(path), load_external_data=False)
    types = _elem_types(model)
    low = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    float32 = onnx.TensorProto.FLOAT
    candidates = set(range(len(model.graph.node)))
    scores = _attention_scores(model, candidates)
    counts: Counter = Counter()
    for index, node in enumerate(model.graph.node):
        first = types.get(node.input[0]) if node.input else None
        if node.op_type == "Softmax":
            counts["softmax_fp32" if first == float32 else "softmax_low"] += 1
        elif node.op_type in NORMALIZATIONS:
            counts["norm_fp32" if first == float32 else "norm_low"] += 1
        elif node.op_type == "Cast":
            counts["casts"] += 1
        if index in scores and types.get(node.output[0]) == float32:
            counts["attention_scores_fp32"] += 1
        if node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm") and first in low:
            counts["low_compute"] += 1
    for key in ("softmax_fp32", "softmax_low", "attention_scores_fp32", "norm_fp32", "norm_low", "casts", "low_compute"):
        counts.setdefault(key, 0)
    return dict(counts)


def lower_exported_graphs(kinds: Iterable[str], folder: Path, dtype: str, progress: Callable[[str], None] = print
                          ) -> tuple[list[str], dict[str, Any]]:
    """The export's precision step: rewrite ``folder/<kind>.onnx`` in place in ``dtype``, one tensor at a time.

    Returns the files now making up the graphs (``<kind>.onnx`` and its ``.onnx.data``) and the
    conversion report (per graph: nodes lowered and kept, islands counted in the ONNX). Other files
    the old graphs pointed into (the export's shared weights) are left for the caller. Validation
    against the fp32 torch model is the export's (``cair_export.core.validation.validate_graphs``).
    """
    report: dict[str, Any] = {"dtype": DTYPES[dtype], "graphs": {}}
    files: list[str] = []
    for kind in kinds:
        progress(f"lowering {kind} graph to {DTYPES[dtype]} (fp32 islands: attention scores, softmax, norms)")
        source = folder / f"{kind}.onnx"
        staged = folder / f".{kind}-{dtype}" / f"{kind}.onnx"
        conversion = convert_graph_precision(source, staged, dtype)
        for old in (source, folder / f"{kind}.onnx.data"):
            old.unlink(missing_ok=True)
        for name in conversion["files"]:
            (staged.parent / name).rename(folder / name)
        staged.parent.rmdir()
        files += conversion["files"]
        report["graphs"][kind] = {**conversion, "islands": precision_islands(folder / f"{kind}.onnx")}
    return files, report
