"""Channel surgery on the normalised ONNX graph: `cut_channels` removes the pruned channels (a smaller model
with the same nodes), `mask_channels` zeroes them in place (the reference the cut is proven against).

Imports onnx, onnx_ir and numpy; never torch, force_core, flows, prefect or click.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from stages.onnx_convert.channels.analysis import analyze
from stages.onnx_convert.channels.builder import node_name
from stages.onnx_convert.channels.model import ChannelAnalysis, GraphChannelGroup, Plan
from stages.onnx_convert.passes._graph import add_initializer, all_names, fresh_name

__all__ = ["cut_channels", "mask_channels"]


def keep_arrays(sizes: Mapping[str, int], channels: Mapping[str, list[int]]) -> dict[str, np.ndarray]:
    """Group name -> bool array of its `sizes` entries, True at the kept channel indices `channels` lists (masks.json's
    `channels`); a group it does not list is kept whole."""
    keep = {}
    for name, size in sizes.items():
        keep[name] = np.zeros(size, dtype=bool)
        keep[name][list(channels.get(name, range(size)))] = True
    return keep


def _checked_keep(analysis: ChannelAnalysis, keep: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One bool array per group (a group left out keeps every channel); raise ValueError naming what is wrong."""
    groups = {g.name: g for g in analysis.groups}
    unknown = sorted(set(keep) - set(groups))
    if unknown:
        raise ValueError(f"keep names {len(unknown)} channel groups the analysis does not have, e.g. {unknown[0]!r}")
    out = {}
    for name, g in groups.items():
        k = np.asarray(keep.get(name, np.ones(g.size, dtype=bool)))
        if k.dtype != bool or k.shape != (g.size,):
            raise ValueError(f"keep[{name!r}] must be a bool array of shape ({g.size},), got {k.dtype} {k.shape}")
        if not k.any():
            raise ValueError(f"keep[{name!r}] keeps none of its {g.size} channels; every group keeps at least 1")
        out[name] = k
    return out


def _entries(g: GraphChannelGroup, s, channels: np.ndarray) -> np.ndarray:
    """Indices along `s.axis` of the given channels of group `g` under slice `s`."""
    return (s.offset + channels[:, None] * s.block + np.arange(s.block)[None, :]).reshape(-1)


def _dims(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}


def _check_slice(g: GraphChannelGroup, s, dims: Mapping[str, tuple[int, ...]]) -> None:
    shape = dims.get(s.initializer)
    if shape is None or not 0 <= s.axis < len(shape) or s.offset + g.size * s.block > shape[s.axis]:
        raise ValueError(f"channel group {g.name!r}: slice {s} does not fit initializer {s.initializer!r} "
                         f"(shape {shape}); is the analysis of another model?")


def mask_channels(model: onnx.ModelProto, analysis: ChannelAnalysis, keep: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` with the pruned channels' "weight" and "param" slices set to 0 (statistics kept)."""
    keep = _checked_keep(analysis, keep)
    dims = _dims(model)
    zero: dict[str, list[tuple[int, np.ndarray]]] = {}
    for g in analysis.groups:
        pruned = np.flatnonzero(~keep[g.name])
        for s in g.slices:
            _check_slice(g, s, dims)
            if pruned.size and s.kind != "stat":
                zero.setdefault(s.initializer, []).append((s.axis, _entries(g, s, pruned)))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _gather_around_norms(out, analysis, keep)
    for t in out.graph.initializer:
        if t.name not in zero:
            continue
        arr = numpy_helper.to_array(t).copy()
        for axis, idx in zero[t.name]:
            index = [slice(None)] * arr.ndim
            index[axis] = idx
            arr[tuple(index)] = 0
        doc = t.doc_string
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
        t.doc_string = doc
    return out


def _gather_around_norms(model: onnx.ModelProto, analysis: ChannelAnalysis, keep: Mapping[str, np.ndarray]) -> None:
    """Each LayerNormalization over channels that lost some: normalise the kept channels alone (Gather them, with
    the scale and bias sliced), then put them back in place with zeros where the pruned ones were (Pad one zero,
    Gather). What the cut model computes; zeroed channels inside the normalisation would change its statistics."""
    graph = model.graph
    taken = all_names(graph)
    inits = {t.name: t for t in graph.initializer}
    nodes = []
    by_name = {n.node: n for n in analysis.norms}
    for node in graph.node:
        norm = by_name.get(node_name(node)) if node.op_type == "LayerNormalization" else None
        kept = None if norm is None else np.concatenate(
            [np.repeat(keep.get(name, np.ones(size, bool)), block) for name, size, block in norm.segs])
        if kept is None or kept.all():
            nodes.append(node)
            continue
        index = np.flatnonzero(kept)
        back = np.full(kept.size, index.size, dtype=np.int64)  # pruned entries read the padded zero
        back[index] = np.arange(index.size)
        names = {k: fresh_name(taken, f"{node.name}__kept_{k}") for k in ("index", "x", "y", "pads", "padded", "back")}
        for role in (1, 2):
            if len(node.input) > role and node.input[role]:
                sliced = numpy_helper.to_array(inits[node.input[role]])[index]
                name = fresh_name(taken, f"{node.input[role]}__kept")
                add_initializer(model, numpy_helper.from_array(sliced, name))
                node.input[role] = name
        rank = norm.axis + 1  # the channel axis is the last
        pads = np.zeros(2 * rank, dtype=np.int64)
        pads[rank + norm.axis] = 1
        for value, name in ((index.astype(np.int64), "index"), (pads, "pads"), (back, "back")):
            add_initializer(model, numpy_helper.from_array(value, names[name]))
        x, y = node.input[0], node.output[0]
        nodes.append(onnx.helper.make_node("Gather", [x, names["index"]], [names["x"]], axis=norm.axis))
        node.input[0], node.output[0] = names["x"], names["y"]
        nodes.append(node)
        nodes.append(onnx.helper.make_node("Pad", [names["y"], names["pads"]], [names["padded"]]))
        nodes.append(onnx.helper.make_node("Gather", [names["padded"], names["back"]], [y], axis=norm.axis))
    del graph.node[:]
    graph.node.extend(nodes)


def _kept_entries(analysis: ChannelAnalysis, keep: Mapping[str, np.ndarray],
                  dims: Mapping[str, tuple[int, ...]]) -> dict[str, dict[int, np.ndarray]]:
    """initializer -> axis -> bool mask over that axis (False: an entry of a pruned channel)."""
    masks: dict[str, dict[int, np.ndarray]] = {}
    for g in analysis.groups:
        pruned = np.flatnonzero(~keep[g.name])
        for s in g.slices:
            _check_slice(g, s, dims)
            if pruned.size:
                m = masks.setdefault(s.initializer, {}).setdefault(s.axis, np.ones(dims[s.initializer][s.axis], bool))
                m[_entries(g, s, pruned)] = False
    return masks


def cut_channels(model: onnx.ModelProto, analysis: ChannelAnalysis, keep: Mapping[str, np.ndarray], *,
                 plan: Plan | None = None) -> onnx.ModelProto:
    """A new model without the pruned channels: weights, biases, norm parameters and statistics sliced, the
    `group` of depthwise convolutions and the Reshape targets that spell out a channel count follow; every
    other node, the inputs, outputs, opset and metadata are as they were. `analysis` may hold a subset of the
    model's groups (the others keep all their channels). `plan`: `analyze(model)` when already computed (its
    `.analysis` is what `analyze_channels` returns; the caller vouches it is of this `model`), so that the graph
    is not analysed again; without it the model is analysed here."""
    keep = _checked_keep(analysis, keep)
    given = plan is not None
    if plan is None:
        plan = analyze(model)
    mine = {g.name: g for g in plan.analysis.groups}
    for g in analysis.groups:
        if mine.get(g.name) != g:
            where = "the plan given" if given else "this model as analysed now"
            raise ValueError(f"channel group {g.name!r} is not a group of {where}; "
                             "run analyze_channels on the model you cut")
    dims = _dims(model)
    masks = _kept_entries(analysis, keep, dims)
    kept = {name: int(k.sum()) for name, k in keep.items()}
    touched = {name for name, k in keep.items() if not k.all()}

    irm = ir.serde.deserialize_model(model)
    graph = irm.graph
    for name, axes in masks.items():
        value = graph.initializers[name]
        old = value.const_value
        arr = old.numpy()
        for axis, m in sorted(axes.items()):
            arr = np.compress(m, arr, axis=axis)
        value.const_value = ir.tensor(np.ascontiguousarray(arr), dtype=old.dtype, name=name, doc_string=old.doc_string)
        value.shape = ir.Shape(arr.shape)
    nodes = list(graph)
    _fix_groups(plan, nodes, graph)
    changed = _fix_reshapes(plan, nodes, graph, kept)

    out = ir.serde.serialize_model(irm)
    # onnx_ir writes metadata as a dict and value_info for every value it knows a type of: restore the source's
    # model fields and keep only its own value_info entries whose shapes the cut did not change.
    for fld in ("metadata_props", "opset_import"):
        out.ClearField(fld)
        getattr(out, fld).extend(getattr(model, fld))
    # (an initializer's entry, which some exporters write, is re-written with its new shape).
    stale = {t for t, groups in plan.tensor_groups.items() if touched.intersection(groups)} | changed
    resized = {vi.name: vi for vi in out.graph.value_info if vi.name in masks}
    del out.graph.value_info[:]
    out.graph.value_info.extend(resized.get(vi.name, vi) for vi in model.graph.value_info
                                if vi.name not in stale and (vi.name not in masks or vi.name in resized))
    return out


def _fix_groups(plan: Plan, nodes: list[ir.Node], graph: ir.Graph) -> None:
    for fix in plan.group_fixes:
        node = nodes[fix.node_index]
        rows = graph.initializers[fix.weight].const_value.shape[0]
        group = rows if fix.transposed else rows // fix.multiplier
        if group != node.attributes["group"].as_int():
            node.attributes["group"] = ir.AttrInt64("group", group)


def _fix_reshapes(plan: Plan, nodes: list[ir.Node], graph: ir.Graph, kept: Mapping[str, int]) -> set[str]:
    """Write the kept channel count into Reshape targets that spell it out (the initializer or Constant node in
    place; a target another node also uses gets an initializer of its own). Returns the names of the values
    whose contents changed."""
    changed = set()
    taken = {v.name for v in graph.initializers.values()} | {v.name for n in graph for v in n.outputs}
    for fix in plan.reshapes:
        node = nodes[fix.node_index]
        target = node.inputs[1]
        if target.const_value is not None:
            values = target.const_value.numpy().copy()
        else:  # a Constant node's output
            values = target.producer().attributes["value"].as_tensor().numpy().copy()
        entry = sum((kept.get(name, size) if name is not None else size) * block for name, size, block in fix.segs)
        if int(values[fix.position]) == entry:
            continue
        values[fix.position] = entry
        producer = target.producer()
        alone = not [u for u in target.uses() if u.node is not node] and not target.is_graph_output()
        if alone and target.is_initializer() and not target.is_graph_input():
            target.const_value = ir.tensor(values, name=target.name)
            changed.add(target.name)
            continue
        if alone and producer is not None and producer.op_type == "Constant":
            producer.attributes["value"] = ir.AttrTensor("value", ir.tensor(values, name=target.name))
            changed.add(target.name)
            continue
        name = fresh_name(taken, f"{target.name}__cut")
        new = ir.Value(name=name, shape=ir.Shape(values.shape), type=ir.TensorType(ir.DataType.INT64),
                       const_value=ir.tensor(values, name=name))
        graph.register_initializer(new)
        if target.is_graph_input():  # IR < 4 lists every initializer as a graph input too
            graph.inputs.append(new)
        node.replace_input_with(1, new)
        changed.add(name)
    return changed
