"""Convolution weights computed from stored tensors alone become the initializers they compute. Weight
standardisation (timm's StdConv2d and ScaledStdConv2d: NFNet, BiT and hybrid ViT stems) is exported as a Reshape, a
BatchNormalization in training mode (TorchScript) or ReduceMean/Sub/Div (dynamo), and a Reshape back, run at every
call on fixed weights; its result is one fixed tensor per layer, which is what onnxslim folds it into and what a
pruned zero can be stored in. The layer then trains that weight directly, as a layer with a folded BatchNorm does.
A weight that depends on the graph's input is left alone (the import refuses it, naming the node)."""

from __future__ import annotations

import onnx
import onnx.helper as oh
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from stages.onnx_convert.passes._graph import add_initializer, consumers, initializer_map, remove_initializer

WEIGHTED = ("Conv", "ConvTranspose")


def run(model: onnx.ModelProto) -> list[str]:
    graph = model.graph
    inits = initializer_map(graph)
    producers = {o: n for n in graph.node for o in n.output if o}
    wanted = dict.fromkeys(n.input[1] for n in graph.node
                           if n.op_type in WEIGHTED and len(n.input) > 1 and n.input[1] in producers)
    cones = {name: cone for name in wanted if (cone := _stored_cone(name, producers, inits)) is not None
             and any(n.op_type != "Identity" for n in cone)}  # a renamed stored weight is a tie, not a computation
    if not cones:
        return []
    order = {id(n): i for i, n in enumerate(graph.node)}
    values = {}
    for name, cone in cones.items():
        nodes = sorted(cone, key=lambda n: order[id(n)])
        used = {i for n in nodes for i in n.input if i in inits}
        sub = oh.make_model(oh.make_graph(nodes, "weight", [], [oh.make_value_info(name, onnx.TypeProto())],
                                          [inits[i] for i in sorted(used)]), opset_imports=model.opset_import)
        values[name] = ReferenceEvaluator(sub).run(None, {})[0]
    removed = set()
    for name, value in values.items():
        graph.node.remove(producers[name])
        removed.add(id(producers[name]))
        add_initializer(model, numpy_helper.from_array(value, name))
    # what only the folded weights read is now dead: nodes, then the stored tensors they read
    cone_nodes = {id(n): n for cone in cones.values() for n in cone if id(n) not in removed}
    outputs = {o.name for o in graph.output}
    while True:
        uses = consumers(graph)
        dead = [n for n in cone_nodes.values() if not any(o in uses or o in outputs for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
            del cone_nodes[id(n)]
    uses = consumers(graph)
    read = {i for cone in cones.values() for n in cone for i in n.input}
    for name in sorted(read & set(inits)):
        if name not in uses and name not in outputs and name not in values:
            remove_initializer(model, name)
    return [f"folded {len(values)} convolution weight(s) computed from stored tensors at every call (weight "
            f"standardisation) into the initializers they compute: {', '.join(list(values)[:3])}"
            f"{' …' if len(values) > 3 else ''}"]


def _stored_cone(name: str, producers: dict, inits: dict) -> list[onnx.NodeProto] | None:
    """The nodes that compute `name` from initializers and Constant nodes alone, or None when it reads anything
    else (the graph's input, a node with no inputs that is not a Constant)."""
    cone, seen, stack = [], set(), [name]
    while stack:
        value = stack.pop()
        if not value or value in inits or value in seen:
            continue
        seen.add(value)
        node = producers.get(value)
        if node is None or (not node.input and node.op_type != "Constant"):
            return None
        if all(id(node) != id(n) for n in cone):
            cone.append(node)
        stack.extend(node.input)
    return cone
