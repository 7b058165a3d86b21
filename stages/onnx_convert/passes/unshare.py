"""Every layer owns its biases and normalisation parameters; real weight ties stay tied.

The PyTorch exporter de-duplicates equal constants (all-zero biases, all-one BatchNorm scales) into
one initializer, fed directly or through `Identity` nodes. Trained separately they must be separate
tensors. That holds for weights too: a zero-initialised residual branch (timm's and torchvision's
`zero_init_residual`) folds into all-zero convolution weights that the exporter stores once for every block. A
prunable weight feeding several nodes whose entries are all one value is such a coincidence of initialization and
is untied; any other is a tie by design (a weight the model itself reuses): those nodes keep sharing it, and so do
their biases when the tied nodes share them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from stages.onnx_convert.passes._graph import (
    FLOAT_TYPES,
    add_initializer,
    all_names,
    copy_tensor,
    initializer_map,
    remove_initializer,
    weight_index,
)


def _weight_slot(inits: dict[str, onnx.TensorProto], alias: dict[str, str], node: onnx.NodeProto, index: int,
                 name: str) -> bool:
    """Whether input `index` of `node`, naming initializer `name` (directly or through an Identity in `alias`), is
    the node's weight."""
    t = inits.get(name)
    return (t is not None and t.data_type in FLOAT_TYPES and len(t.dims) >= 2
            and weight_index(node, _Constants(inits, alias)) == index)


class _Constants:
    """The names that hold an initializer: its own, and those of the Identity nodes that only rename it."""

    def __init__(self, inits: dict[str, onnx.TensorProto], alias: dict[str, str]):
        self.inits, self.alias = inits, alias

    def __contains__(self, name: str) -> bool:
        return name in self.inits or name in self.alias


def run(model: onnx.ModelProto) -> list[str]:
    graph = model.graph
    inits = initializer_map(graph)
    graph_outputs = {o.name for o in graph.output}

    # 1. Identity nodes that only rename a float initializer: resolve them to the initializer.
    alias: dict[str, str] = {}
    identities = []
    for node in graph.node:  # topologically sorted: chains resolve in one pass
        if node.op_type != "Identity":
            continue
        src = alias.get(node.input[0], node.input[0])
        t = inits.get(src)
        if t is not None and t.data_type in FLOAT_TYPES and node.output[0] not in graph_outputs:
            alias[node.output[0]] = src
            identities.append(node)
    for node in identities:
        graph.node.remove(node)

    untied = _untie_constant_weights(model, inits, alias)

    # 2. every use of a float initializer: (node, input index, the name the node used)
    slots: dict[str, list[tuple[onnx.NodeProto, int, str]]] = {}
    for node in graph.node:
        for i, used in enumerate(node.input):
            root = alias.get(used, used)
            if root in inits and inits[root].data_type in FLOAT_TYPES:
                slots.setdefault(root, []).append((node, i, used))

    def weight_of(node: onnx.NodeProto) -> str | None:
        for i, name in enumerate(node.input):
            root = alias.get(name, name)
            if _weight_slot(inits, alias, node, i, root):
                return root
        return None

    taken = all_names(graph) - set(alias)
    claimed: set[str] = set()
    fresh, ties = 0, []
    for root, uses in slots.items():
        if any(_weight_slot(inits, alias, n, i, root) for n, i, _ in uses):
            for n, i, _ in uses:
                n.input[i] = root
            if len({id(n) for n, _, _ in uses}) > 1:
                ties.append(root)
            claimed.add(root)
            continue
        groups: dict[object, list[tuple[onnx.NodeProto, int, str]]] = {}
        for n, i, used in uses:
            w = weight_of(n)
            # Keyed by input slot too: the exporter also merges equal constants *within* one node
            # (a BatchNorm scale of ones and its running variance of ones), and those must separate.
            owner = ("w", w) if w is not None else ("n", id(n))
            groups.setdefault((owner, i), []).append((n, i, used))
        for members in groups.values():
            used_names = {used for _, _, used in members}
            if len(used_names) == 1 and (name := next(iter(used_names))) != root and name not in claimed:
                pass
            elif root not in claimed:
                name = root
            else:
                name = _fresh(taken, root)
                fresh += 1
            if name != root:
                add_initializer(model, copy_tensor(inits[root], name))
            claimed.add(name)
            taken.add(name)
            for n, i, _ in members:
                n.input[i] = name
    for root in slots:
        if root not in claimed and root not in graph_outputs:
            remove_initializer(model, root)

    changes = []
    if identities:
        changes.append(f"replaced {len(identities)} Identity nodes of shared constants by initializers of their own")
    if fresh:
        changes.append(f"un-shared {fresh} uses of bias/normalisation initializers shared between layers")
    if untied:
        changes.append(f"untied {len(untied)} weights shared only because the exporter stored equal constant tensors "
                       f"once (each layer trains its own): {', '.join(untied[:5])}{' …' if len(untied) > 5 else ''}")
    if ties:
        changes.append(f"kept {len(ties)} tied weights tied (the model reuses them): {', '.join(ties[:5])}"
                       f"{' …' if len(ties) > 5 else ''}")
    return changes


def _untie_constant_weights(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto],
                            alias: dict[str, str]) -> list[str]:
    """Give every node but the first its own copy of a prunable weight that several nodes share and whose entries
    are all one value (see the module's doc); returns the weights untied."""
    users: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            root = alias.get(name, name)
            if _weight_slot(inits, alias, node, i, root):
                users.setdefault(root, []).append((node, i))
    taken = all_names(model.graph)
    untied = []
    for root, uses in users.items():
        if len({id(n) for n, _ in uses}) < 2:
            continue
        values = numpy_helper.to_array(inits[root])
        if values.size == 0 or not np.all(values == values.flat[0]):
            continue
        first = id(uses[0][0])
        for node, i in uses:
            if id(node) != first:
                name = _fresh(taken, root)
                new = copy_tensor(inits[root], name)
                add_initializer(model, new)
                inits[name] = new
                node.input[i] = name
        untied.append(root)
    return untied


def _fresh(taken: set[str], base: str) -> str:
    k = 1
    while f"{base}__{k}" in taken:
        k += 1
    taken.add(f"{base}__{k}")
    return f"{base}__{k}"
