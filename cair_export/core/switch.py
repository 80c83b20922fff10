"""The switch graph: planning and fidelity as one ONNX graph, one copy of the weights in one session.

The fidelity graph is the planning graph with every cross-attention module's computation replaced
by an input. ``unet.onnx`` says exactly that: it is ``planning.onnx`` with each ``attn2`` module's
nodes moved into the ``else`` branch of an ONNX ``If`` whose ``then`` branch returns the module's
cached output, an input of the graph. One boolean input, ``use_cache``, picks the branch for every
module at once: ``False`` runs a planning step (batch 2B, text input, caches out), ``True`` a fidelity
step (batch B or 2B, caches in; the text input is not read). Every other node is the planning
graph's own, once, so a runtime holds one session and each weight once, and an optimiser that
re-lays weights out or prepacks them (onnxruntime's NCHWc layout, MLAS prepacking) does so once.
TensorRT builds ``If`` as conditional layers (``IIfConditional``), which is the same one-engine idea.

Nodes are assigned to modules by the TorchScript exporter's scope names
(``/unet/down_blocks.0/attentions.0/transformer_blocks.0/attn2/...``). A node whose non-float output
is used outside its module (the exporter shares shape arithmetic across modules) stays outside the
branch, as does anything such a node needs. What is left in a module's branch must produce exactly
its float outputs: the cache and the tensor the residual add reads. Then what a fidelity step no
longer reads moves into branches too (``_move_planning_only``): the norm in front of each ``attn2``
into its module's, and a transformer's caption projection and text-mask bias, which every module
reads, into one more ``If``. Graphs that do not fit (other exporters' node names) get no switch
graph; the export says so and runtimes use the two graphs.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from cair_runtime.manifest import CacheSpec

SWITCH_FILE = "unet.onnx"
CONDITION = "use_cache"
_FLOATS = (1, 10, 16)  # onnx.TensorProto FLOAT, FLOAT16, BFLOAT16


class SwitchGraphError(Exception):
    """The planning graph's structure does not allow a switch graph (the reason is the message)."""


def cache_input(name: str) -> str:
    """The switch graph's input for cache ``name`` (the output of that name is planning's)."""
    return f"{name}_in"


def module_scope(module: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn2`` -> the exporter's node-name prefix."""
    return "/unet/" + re.sub(r"\.(?!\d)", "/", module) + "/"


def write_switch_graph(folder: Path, caches: Sequence[CacheSpec], deep_feature: str | None = None) -> dict[str, Any]:
    """Write ``folder/unet.onnx`` from ``planning.onnx`` (and, for ``deep_feature``, ``fidelity.onnx``).

    Returns the manifest's ``switch`` record. The graph's initializers are planning's own entries,
    external data into the same weights file, so the folder grows by the graph structure only.
    Raises ``SwitchGraphError`` when the graph does not have the structure described above.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(folder / "planning.onnx"), load_external_data=False)
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph
    infos = {info.name: info for info in [*inferred.value_info, *graph.input, *graph.output]}
    graph_outputs = {output.name for output in graph.output}
    consumers: dict[str, set[int]] = defaultdict(set)
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers[name].add(index)

    def is_float(name: str) -> bool:
        return name in infos and infos[name].type.tensor_type.elem_type in _FLOATS

    def used_outside(name: str, members: set[int]) -> bool:
        return name in graph_outputs or bool(consumers[name] - members)

    def value_info(name: str, like: str) -> Any:  # ``like``'s element type and rank, dims unnamed
        info = onnx.ValueInfoProto()
        info.CopyFrom(infos[like])
        info.name = name
        for dim in info.type.tensor_type.shape.dim:
            dim.Clear()
        return info

    replaced: dict[int, Any] = {}  # the position of a module's last node -> its If
    moved: set[int] = set()
    new_inputs = []
    for cache in caches:
        scope = module_scope(cache.module)
        members = {index for index, node in enumerate(graph.node) if node.name.startswith(scope)}
        while True:  # shape arithmetic shared with other modules stays outside, with what it needs
            shared = {index for index in members for name in graph.node[index].output
                      if not is_float(name) and used_outside(name, members)}
            if not shared:
                break
            members -= shared
        if not members:
            raise SwitchGraphError(f"no nodes named under {scope} in planning.onnx")
        ordered = sorted(members)
        boundary = [name for index in ordered for name in graph.node[index].output if used_outside(name, members)]
        if cache.name not in boundary or len(boundary) > 2:
            raise SwitchGraphError(f"{cache.module}'s nodes produce {boundary}, not its cache {cache.name} and at "
                                   "most the attention output")
        cached = cache_input(cache.name)
        new_inputs.append(helper.make_tensor_value_info(cached, infos[cache.name].type.tensor_type.elem_type,
                                                        [f"{cached}_batch", f"{cached}_tokens", cache.channels]))
        then_nodes = [helper.make_node("Identity", [cached], [f"{cached}/then_{k}"],
                                       name=f"/cair/{cache.name}/then_{k}") for k in range(len(boundary))]
        then_branch = helper.make_graph(then_nodes, f"{cache.name}_cached", [],
                                        [value_info(f"{cached}/then_{k}", name) for k, name in enumerate(boundary)])
        else_branch = helper.make_graph([graph.node[index] for index in ordered], f"{cache.name}_computed", [],
                                        [value_info(name, name) for name in boundary])
        replaced[ordered[-1]] = helper.make_node("If", [CONDITION], boundary, name=f"/cair/{cache.name}/If",
                                                 then_branch=then_branch, else_branch=else_branch)
        moved |= members
    nodes = [replaced.get(index, node) for index, node in enumerate(graph.node)
             if index in replaced or index not in moved]
    nodes = _move_planning_only(nodes, {output.name for output in graph.output}, infos)
    if deep_feature is not None and deep_feature not in {output.name for output in graph.output}:
        # fidelity steps also hand the deep feature to shallow steps (planning outputs it itself when it
        # also feeds guided shallow steps)
        source = _deep_feature_source(folder, graph, deep_feature)
        nodes.append(helper.make_node("Identity", [source], [deep_feature], name="/cair/deep_feature"))
        graph.output.append(value_info(deep_feature, source))
    del graph.node[:]
    graph.node.extend(_topological(nodes, {i.name for i in graph.input} | {t.name for t in graph.initializer}
                                   | {CONDITION} | {i.name for i in new_inputs}))
    graph.input.extend([*new_inputs, helper.make_tensor_value_info(CONDITION, onnx.TensorProto.BOOL, [])])
    partial = folder / f".{SWITCH_FILE}.partial"
    onnx.save_model(model, str(partial))
    try:
        onnx.checker.check_model(str(partial))
    except onnx.checker.ValidationError as error:
        partial.unlink()
        raise SwitchGraphError(f"the graph built is not valid ONNX ({str(error).splitlines()[0][:200]})") from None
    partial.rename(folder / SWITCH_FILE)
    return {"file": SWITCH_FILE, "condition": CONDITION,
            "cache_inputs": {cache.name: cache_input(cache.name) for cache in caches}, "deep_feature": deep_feature}


def _move_planning_only(nodes: list[Any], outputs: set[str], infos: dict[str, Any]) -> list[Any]:
    """``nodes`` with what only the cross-attention branches read moved into branches.

    A fidelity step takes every ``then`` branch, so what only the ``else`` branches read is dead on
    it: the norm in front of each ``attn2``, a transformer's caption projection and its text mask's
    bias. A dead node that one module alone reads joins that module's ``else`` branch. Dead nodes
    several modules read (the caption projection) go into the ``else`` branch of one more ``If`` on
    the same condition, whose ``then`` branch returns one-element placeholders (what reads them does
    not run), when nothing they read comes out of a module (else no order could hold) and they do
    float work (shape arithmetic shared between modules stays where it is: it costs nothing).
    """
    import sys

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    producer = {name: index for index, node in enumerate(nodes) for name in node.output}
    switched = {index for index, node in enumerate(nodes) if node.op_type == "If" and node.name.startswith("/cair/")}

    def branch(node: Any, which: str) -> Any:
        return next(attribute.g for attribute in node.attribute if attribute.name == which)

    def reads(node: Any, fidelity: bool = False) -> set[str]:  # a fidelity step runs a switch If's then branch
        return _outer_reads(node, [branch(node, "then_branch")] if fidelity else None)

    needed, live = list(outputs), set()
    while needed:  # what a fidelity step runs
        index = producer.get(needed.pop())
        if index is not None and index not in live:
            live.add(index)
            needed += reads(nodes[index], fidelity=index in switched)
    dead = set(range(len(nodes))) - live
    consumers: dict[str, set[int]] = defaultdict(set)
    for index, node in enumerate(nodes):
        for name in reads(node):
            consumers[name].add(index)
    readers: dict[int, frozenset[int]] = {}  # a dead node -> the modules it feeds (through dead nodes)
    downstream: dict[int, bool] = {}  # a node -> whether a module's output feeds it
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(nodes)))

    def modules_fed(index: int) -> frozenset[int]:
        if index not in readers:
            readers[index] = frozenset().union(*(
                {consumer} if consumer in switched else modules_fed(consumer) if consumer in dead else set()
                for name in nodes[index].output for consumer in consumers[name]))
        return readers[index]

    def after_a_module(index: int) -> bool:
        if index not in downstream:
            sources = [producer[name] for name in reads(nodes[index]) if name in producer]
            downstream[index] = any(source in switched or after_a_module(source) for source in sources)
        return downstream[index]

    owned: dict[int, list[int]] = defaultdict(list)  # a module -> the dead nodes it alone reads
    for index in sorted(dead):
        if len(modules_fed(index)) == 1:
            owned[next(iter(modules_fed(index)))].append(index)
    absorbed = {index for extra in owned.values() for index in extra}
    for module, extra in owned.items():
        else_branch = branch(nodes[module], "else_branch")
        body = [nodes[index] for index in extra] + list(else_branch.node)
        del else_branch.node[:]
        else_branch.node.extend(body)
    shared = {index for index in dead if len(modules_fed(index)) > 1 and not after_a_module(index)}
    if not any(nodes[index].op_type != "Constant" and name in infos and infos[name].type.tensor_type.elem_type
               in _FLOATS for index in shared for name in nodes[index].output):
        shared = set()
    moved = absorbed | shared
    kept = [node for index, node in enumerate(nodes) if index not in moved]
    if not shared:
        return kept
    read_elsewhere = {name for index in range(len(nodes)) if index not in shared for name in reads(nodes[index])}
    boundary = [name for index in sorted(shared) for name in nodes[index].output if name in read_elsewhere]

    def elem_type(name: str) -> int:
        return infos[name].type.tensor_type.elem_type if name in infos else onnx.TensorProto.FLOAT

    def placeholder(name: str) -> Any:  # the tensor's element type and rank, one element
        rank = len(infos[name].type.tensor_type.shape.dim) if name in infos else 1
        value = np.zeros((1,) * rank, helper.tensor_dtype_to_np_dtype(elem_type(name)))
        return helper.make_node("Constant", [], [f"{name}/placeholder"], name=f"/cair/planning_only/{name}",
                                value=numpy_helper.from_array(value))

    then_branch = helper.make_graph([placeholder(name) for name in boundary], "planning_only_skipped", [],
                                    [helper.make_tensor_value_info(f"{name}/placeholder", elem_type(name), None)
                                     for name in boundary])
    else_branch = helper.make_graph([nodes[index] for index in sorted(shared)], "planning_only", [],
                                    [helper.make_tensor_value_info(name, elem_type(name), None) for name in boundary])
    return kept + [helper.make_node("If", [CONDITION], boundary, name="/cair/planning_only/If",
                                    then_branch=then_branch, else_branch=else_branch)]


def _deep_feature_source(folder: Path, graph: Any, deep_feature: str) -> str:
    """Planning's tensor that is fidelity's ``deep_feature`` output: the same node (by name) produces it."""
    import onnx

    fidelity = onnx.load(str(folder / "fidelity.onnx"), load_external_data=False).graph
    for node in fidelity.node:
        if deep_feature in node.output:
            position = list(node.output).index(deep_feature)
            for candidate in graph.node:
                if candidate.name == node.name and candidate.op_type == node.op_type:
                    return candidate.output[position]
            raise SwitchGraphError(f"planning.onnx has no node {node.name!r}, which makes fidelity's {deep_feature}")
    raise SwitchGraphError(f"fidelity.onnx does not output {deep_feature}")


def _topological(nodes: list[Any], available: set[str]) -> list[Any]:
    """``nodes`` in an order where each comes after what it reads (its branches' outer-scope names too),
    otherwise as given."""
    needs = [_outer_reads(node) for node in nodes]
    ordered, pending = [], list(range(len(nodes)))
    while pending:
        waiting = []
        for index in pending:
            if needs[index] <= available:
                ordered.append(nodes[index])
                available |= set(nodes[index].output)
            else:
                waiting.append(index)
        if len(waiting) == len(pending):
            missing = sorted(needs[waiting[0]] - available)[:3]
            raise SwitchGraphError(f"node {nodes[waiting[0]].name} reads {missing}, which nothing makes")
        pending = waiting
    return ordered


def _outer_reads(node: Any, branches: Sequence[Any] | None = None) -> set[str]:
    """What ``node`` reads from its graph: its inputs and what its branches (all, or ``branches``) read and
    do not make."""
    names = set(node.input)
    for graph in [attribute.g for attribute in node.attribute] if branches is None else branches:
        made = {name for inner in graph.node for name in inner.output}
        names |= {name for inner in graph.node for name in inner.input if name not in made}
    return names - {""}
