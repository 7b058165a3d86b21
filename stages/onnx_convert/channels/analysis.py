"""The driver of the channel analysis: walk the graph once with the registered handlers (an operator without
one blocks every channel that reaches it), block what reaches a graph output, tie sets that slice a shared
initializer alike, and turn the union-find into groups and the surgery's `Plan`.

Imports onnx and numpy only; never torch, force_core, flows, prefect or click.
"""

from __future__ import annotations

import onnx

import stages.onnx_convert.channels.handlers  # noqa: F401 - fills HANDLERS: each family registers on import
from stages.onnx_convert.channels.builder import ChannelBuilder, known, node_name
from stages.onnx_convert.channels.model import (
    Blocked,
    ChannelAnalysis,
    ChannelLayout,
    ChannelNorm,
    ChannelSegment,
    GraphChannelGroup,
    Plan,
    ReshapeFix,
    TensorSlice,
)
from stages.onnx_convert.channels.registry import HANDLERS
from stages.onnx_convert.passes._graph import real_inputs

__all__ = ["analyze", "analyze_channels"]


def _unknown(b: ChannelBuilder, node: onnx.NodeProto) -> None:
    """The fallback for an operator no handler is registered for: every channel that reaches it is blocked."""
    inputs = list(node.input) + _captured(node)
    if any(b.layout(n) is not None for n in inputs):
        domain = f" in domain '{node.domain}'" if node.domain not in ("", "ai.onnx") else ""
        b.block_inputs(node, f"{node.op_type}{domain} is not understood by the channel analysis", inputs)


def _captured(node: onnx.NodeProto) -> list[str]:
    """Outer-scope names a subgraph (If/Loop/Scan body) reads."""
    names = []
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            inner = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                inner.update(n.output)
                names += [i for i in list(n.input) + _captured(n) if i and i not in inner]
    return names


# --- the analysis -----------------------------------------------------------------------------------------------
def analyze_channels(model: onnx.ModelProto) -> ChannelAnalysis:
    """The channel groups of a normalised ONNX classifier and the nodes whose channels are never pruned.
    Deterministic: groups in graph order of their first producer, slices in the order they are found."""
    return analyze(model).analysis


def analyze(model: onnx.ModelProto) -> Plan:
    """`analyze_channels` plus what the surgery needs (Reshape targets, depthwise `group` attributes)."""
    b = ChannelBuilder(model)
    for inp in real_inputs(b.graph):
        d = b.dims(inp.name)
        if d is not None and len(d) >= 2 and known(d[1]):
            s = b.new_set(int(d[1]))
            b.blocked_sets.add(s)
            b.blocked.append(Blocked(inp.name, "graph input", "the network input's channels are fixed"))
            b.layouts[inp.name] = ChannelLayout(1, (ChannelSegment(s, int(d[1])),))
    for k, node in enumerate(b.graph.node):
        b.index = k
        handler = HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        (handler or _unknown)(b, node)
    producer = {o: node for node in b.graph.node for o in node.output}
    for out in b.graph.output:
        lay = b.layout(out.name)
        if lay is None:
            continue
        for s in lay.segs:
            b.blocked_sets.add(s.set)
            creators = b.sets.creators[b.sets.find(s.set)] or []
            nodes = [b.graph.node[i] for i in creators] or ([producer[out.name]] if out.name in producer else [])
            for n in nodes:
                b.note(n, f"its output channels reach graph output '{out.name}'")
    _tie_shared_initializers(b)
    return _finish(b)


def _tie_shared_initializers(b: ChannelBuilder) -> None:
    """A tied weight (or any initializer two sets slice alike) ties the sets; overlapping different slices,
    or a slice plus a use that takes the initializer whole, block them."""
    by_init: dict[str, list[tuple[int, TensorSlice, int]]] = {}
    for entry in b.slices:
        by_init.setdefault(entry[1].initializer, []).append(entry)
    for entries in by_init.values():
        same: dict[tuple[int, int, int, int], int] = {}
        for set_id, s, _ in entries:
            key = (s.axis, s.offset, s.block, b.sets.size[set_id])
            if key in same and b.sets.find(same[key]) != b.sets.find(set_id):
                b.sets.union(same[key], set_id)
            same.setdefault(key, set_id)
    for name, entries in by_init.items():
        slicing_nodes = {k for _, _, k in entries}
        whole = [k for k, _ in b.uses.get(name, []) if k not in slicing_nodes]
        spans: dict[int, list[tuple[int, int, int]]] = {}
        for set_id, s, _ in entries:
            root = b.sets.find(set_id)
            spans.setdefault(s.axis, []).append((s.offset, s.offset + b.sets.size[set_id] * s.block, root))
        clash = None
        for axis_spans in spans.values():
            axis_spans = sorted(set(axis_spans))
            for (_, hi1, r1), (lo2, _, r2) in zip(axis_spans, axis_spans[1:], strict=False):
                if r1 != r2 and lo2 < hi1:
                    clash = f"two channel groups overlap in '{name}'"
        if whole:
            clash = f"uses '{name}' whole, which pruning channels of another node would resize"
        if clash:
            roots = {b.sets.find(set_id) for set_id, _, _ in entries}
            b.blocked_sets.update(roots)
            user = b.graph.node[whole[0]] if whole else b.graph.node[entries[0][2]]
            b.note(user, clash)


def _finish(b: ChannelBuilder) -> Plan:
    find = b.sets.find
    blocked_roots = {find(s) for s in b.blocked_sets}
    slices: dict[int, list[TensorSlice]] = {}
    for set_id, s, _ in b.slices:
        root = find(set_id)
        if root not in blocked_roots:
            lst = slices.setdefault(root, [])
            if s not in lst:
                lst.append(s)
    names: dict[int, str] = {}
    groups = []
    roots = sorted((r for r, lst in slices.items() if b.sets.creators[r] and any(s.kind == "weight" for s in lst)),
                   key=lambda r: min(b.sets.creators[r], default=len(b.graph.node)))
    for root in roots:
        creators = sorted(set(b.sets.creators[root]))
        first = b.graph.node[creators[0]]
        names[root] = first.output[0]
        groups.append(GraphChannelGroup(first.output[0], b.sets.size[root], tuple(slices[root]),
                                   tuple(node_name(b.graph.node[k]) for k in creators)))

    def seg_names(lay: ChannelLayout) -> tuple[tuple[str | None, int, int], ...]:
        return tuple((names.get(find(s.set)), s.size, s.block) for s in lay.segs)

    tensor_groups = {}
    for name in b.layouts:
        g = tuple(dict.fromkeys(n for n, _, _ in seg_names(b.layout(name)) if n is not None))
        if g:
            tensor_groups[name] = g
    reshapes = tuple(ReshapeFix(k, pos, seg_names(b.current(lay))) for k, pos, lay in b.reshapes
                     if any(n is not None for n, _, _ in seg_names(b.current(lay))))
    group_fixes = tuple(f for f in b.group_fixes
                        if any(s.initializer == f.weight and s.axis == 0 for g in groups for s in g.slices))
    norms = tuple(ChannelNorm(node_name(b.graph.node[k]), b.current(lay).axis, seg_names(b.current(lay)))
                  for k, lay in b.norms if any(n is not None for n, _, _ in seg_names(b.current(lay))))
    return Plan(ChannelAnalysis(tuple(groups), tuple(b.blocked), norms), tensor_groups, reshapes, group_fixes)
