"""Convert a normalised ModelProto with onnx2torch, then make it trainable and build its ParamMap.

After onnx2torch: every float initializer that is the weight of a Conv, ConvTranspose, Gemm or MatMul
is one trainable nn.Parameter (onnx2torch leaves MatMul weights and unusual Gemms as buffers), other
float tensors that enter the computation as operands (biases of MatMul+Add, LayerNorm, class tokens…)
are trainable too, BatchNorm running statistics stay buffers, and an initializer used by several nodes
is one tensor (a real tie), addressed by a readable name instead of `onnx_initializer_<k>`.
"""

from __future__ import annotations

import inspect
import os
import re

import onnx
import torch
from onnx import defs, numpy_helper
from onnx2torch import convert
from onnx2torch.converter import InitializersContainer
from onnx2torch.node_converters import get_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.utils.safe_shape_inference import safe_shape_inference
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

import stages.onnx_convert.ops  # noqa: F401  (registers the converters for newer opsets)
from pipeline.errors import UnsupportedOperatorError
from stages.onnx_convert.param_map import ParamEntry, ParamMap
from stages.onnx_convert.passes._graph import FLOAT_TYPES, fresh_name, weight_index

# container operands that are trained (op type -> input indices; None = all). A Gemm's or MatMul's left operand
# trains when it is the weight (weight_index); beside a constant right operand it is a constant of the model.
_TRAINABLE_OPERANDS: dict[str, tuple[int, ...] | None] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,),
    "Add": None, "Sub": None, "Mul": None, "Div": (0,), "Concat": None, "Where": (1, 2),
    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2), "PRelu": (1,),
    "Einsum": None,
}


def schema_version(op_type: str, domain: str, opset: int) -> int:
    try:
        return defs.get_schema(op_type, max_inclusive_version=opset, domain=domain).since_version
    except (RuntimeError, defs.SchemaError):
        return opset


def check_operators(model: onnx.ModelProto) -> None:
    """Raise UnsupportedOperatorError for the first node no converter exists for."""
    opsets = {o.domain if o.domain != "ai.onnx" else "": o.version for o in model.opset_import}
    stored = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        domain = node.domain if node.domain != "ai.onnx" else ""
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1 and node.input[1] not in stored:
            # one computed from stored tensors alone was folded (passes.computed_weights): this one reads the input
            raise UnsupportedOperatorError(
                f"{node.op_type} at node '{node.name}' takes its weight from the computed tensor '{node.input[1]}', "
                "which depends on the model's input (a dynamic filter), not from a stored initializer; "
                "force-compress prunes stored weights: export the model with fixed convolution weights")
        if domain not in opsets:
            raise UnsupportedOperatorError(f"{node.op_type} in domain '{domain}' at node '{node.name}': "
                                           "the model imports no opset for that domain")
        version = schema_version(node.op_type, domain, opsets[domain])
        try:
            get_converter(operation_type=node.op_type, version=opsets[domain], domain=domain)
        except NotImplementedError:
            raise UnsupportedOperatorError(
                f"{node.op_type} v{version} in domain '{domain}' at node '{node.name}' cannot be converted to "
                f"PyTorch (no converter); re-export with another opset or without this operator") from None


def _find_failing_node(model: onnx.ModelProto, error: Exception) -> UnsupportedOperatorError:
    inferred = safe_shape_inference(model)
    graph = OnnxGraph(inferred.graph)
    opsets = {o.domain: o.version for o in model.opset_import}
    for onode in graph.nodes.values():
        version = opsets.get(onode.domain, 0)
        try:
            get_converter(onode.operation_type, version, onode.domain)(onode, graph)
        except Exception as e:  # noqa: BLE001 - any converter failure is this node's
            v = schema_version(onode.operation_type, onode.domain, version)
            return UnsupportedOperatorError(
                f"{onode.operation_type} v{v} in domain '{onode.domain}' at node '{onode.name}': {_short(e)}")
    return UnsupportedOperatorError(f"onnx2torch could not convert the model: {_short(error)}")


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:240]


def to_torch(model: onnx.ModelProto) -> tuple[fx.GraphModule, ParamMap]:
    """Deterministic: the same ModelProto gives the same module, names and values (the caller's RNG
    state is untouched; onnx2torch initialises layers randomly before copying the weights in)."""
    check_operators(model)
    with torch.random.fork_rng(devices=[]):
        try:
            gm = convert(model, attach_onnx_mapping=True)
        except Exception as e:  # noqa: BLE001 - onnx2torch raises anything from KeyError to NotImplementedError
            raise _find_failing_node(model, e) from None
    param_map = _make_trainable(gm, model)
    gm.train()
    return gm, param_map


def load_module(normalized_path: str | os.PathLike) -> tuple[nn.Module, ParamMap]:
    """Rebuild the trainable module (train mode) and its ParamMap from `normalized.onnx`; the same file
    always gives the same names and values."""
    return to_torch(onnx.load(str(normalized_path), load_external_data=True))


# ------------------------------------------------------------------------------------------------
class _Slot:
    """One place in the module holding a copy of an initializer."""

    __slots__ = ("module", "path", "attr", "transpose", "scale", "op_type", "index", "role")

    def __init__(self, module, path, attr, op_type, index, role="", transpose=False, scale=1.0):
        self.module, self.path, self.attr = module, path, attr
        self.op_type, self.index, self.role = op_type, index, role
        self.transpose, self.scale = transpose, scale

    @property
    def key(self) -> str:
        return f"{self.path}.{self.attr}" if self.path else self.attr


def _std_slots(path: str, module: nn.Module, onode) -> list[tuple[_Slot, str]]:
    """Slots of torch layers onnx2torch built with copies of the node's initializers."""
    inputs = onode.input_values
    op = onode.operation_type
    out = []
    for sub_path, sub in module.named_modules():
        full = f"{path}.{sub_path}" if sub_path else path
        if isinstance(sub, _ConvNd):
            out.append((_Slot(sub, full, "weight", op, 1, "weight"), inputs[1]))
            if sub.bias is not None:
                out.append((_Slot(sub, full, "bias", op, 2, "bias"), inputs[2]))
        elif isinstance(sub, nn.Linear):  # Gemm: torch weight = alpha * (B if transB else B.T)
            attrs = onode.attributes
            out.append((_Slot(sub, full, "weight", op, 1, "weight", transpose=not attrs.get("transB", 0),
                              scale=float(attrs.get("alpha", 1.0))), inputs[1]))
            if sub.bias is not None:
                out.append((_Slot(sub, full, "bias", op, 2, "bias", scale=float(attrs.get("beta", 1.0))), inputs[2]))
        elif isinstance(sub, _BatchNorm):
            for attr, i in (("weight", 1), ("bias", 2), ("running_mean", 3), ("running_var", 4)):
                out.append((_Slot(sub, full, attr, op, i, attr), inputs[i]))
        elif isinstance(sub, (nn.LayerNorm, _InstanceNorm)):
            if getattr(sub, "weight", None) is not None:
                out.append((_Slot(sub, full, "weight", op, 1, "weight"), inputs[1]))
            if getattr(sub, "bias", None) is not None and len(inputs) > 2:
                out.append((_Slot(sub, full, "bias", op, 2, "bias"), inputs[2]))
    return out


def _container_uses(gm: fx.GraphModule, onodes) -> dict[str, list[tuple[str, str, int]]]:
    """`initializers.onnx_initializer_<k>` -> [(initializer name, op type, input index)] from the fx graph
    and each module's onnx_mapping (positional args, then keyword args named as in forward())."""
    uses: dict[str, list[tuple[str, str, int]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        mapping = getattr(module, "onnx_mapping", None)
        if mapping is None:
            continue
        op_type = onodes[node.target].operation_type if node.target in onodes else ""
        params = list(inspect.signature(module.forward).parameters)
        indexed = list(enumerate(node.args)) + [(params.index(k), v) for k, v in node.kwargs.items()]
        for i, arg in indexed:
            if isinstance(arg, fx.Node) and arg.op == "get_attr" and arg.target.startswith("initializers."):
                uses.setdefault(arg.target, []).append((mapping.inputs[i], op_type, i))
    return uses


def _attr_name(initializer: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", initializer).strip("_") or "initializer"
    if base[0].isdigit():
        base = f"w_{base}"
    return fresh_name(taken, base, sep="_")


def _make_trainable(gm: fx.GraphModule, model: onnx.ModelProto) -> ParamMap:
    inits = {t.name: t for t in model.graph.initializer}
    weights = {node.input[k] for node in model.graph.node if (k := weight_index(node, inits)) is not None}
    onodes = OnnxGraph(model.graph).nodes
    modules = dict(gm.named_modules())

    # 1. every slot, grouped by initializer
    groups: dict[str, list[_Slot]] = {}
    for path, onode in onodes.items():
        if path in modules and path != "initializers":
            for slot, init in _std_slots(path, modules[path], onode):
                if init in inits:
                    groups.setdefault(init, []).append(slot)
    if not hasattr(gm, "initializers"):  # GraphModule keeps only what the graph uses
        gm.add_module("initializers", InitializersContainer())
    container = gm.get_submodule("initializers")
    uses = _container_uses(gm, onodes)
    old_targets: dict[str, str] = {}  # old get_attr target -> initializer
    for target, target_uses in uses.items():
        init = target_uses[0][0]
        old_targets[target] = init
        for _, op_type, index in target_uses:
            groups.setdefault(init, []).append(
                _Slot(container, "initializers", target.split(".", 1)[1], op_type, index))

    # 2. one tensor per initializer, Parameter where it trains; container attributes renamed
    taken: set[str] = set()
    new_attr: dict[str, str] = {}
    for name in list(container._buffers):
        tensor = container._buffers.pop(name)
        del tensor
    entries_spec: list[tuple[str, _Slot]] = []
    for init, slots in groups.items():
        tp = inits[init]
        is_float = tp.data_type in FLOAT_TYPES
        transforms = {(s.transpose, s.scale) for s in slots}
        if len(transforms) > 1:
            raise UnsupportedOperatorError(
                f"initializer '{init}' is used by {len(slots)} nodes in different layouts (transposed/scaled "
                "Gemm and plain); export the model without sharing it")
        prunable = is_float and len(tp.dims) >= 2 and init in weights
        stats = any(s.role in ("running_mean", "running_var") for s in slots)
        trainable = is_float and not stats and (prunable or any(
            s.role in ("weight", "bias") or (
                s.role == "" and _numel(tp) > 1
                and _operand_trains(s.op_type, s.index))
            for s in slots))
        first = slots[0]
        if first.module is container:
            value = _initializer_tensor(tp)
        else:
            value = getattr(first.module, first.attr).detach()
        tensor = nn.Parameter(value.clone(), requires_grad=True) if trainable else value.clone()
        for s in slots:
            if s.module is container:
                if init not in new_attr:
                    new_attr[init] = _attr_name(init, taken)
                    _register(container, new_attr[init], tensor)
                s.attr = new_attr[init]
            else:
                _register(s.module, s.attr, tensor)
            entries_spec.append((init, s))
        if prunable:
            for s in slots:
                s.role = "prunable"

    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in old_targets:
            node.target = f"initializers.{new_attr[old_targets[node.target]]}"
    gm.recompile()

    # 3. the map: state_dict keys (ties appear under each name) -> initializer + transform
    canonical_ids = {}
    for n, p in gm.named_parameters():
        canonical_ids.setdefault(id(p), n)
    for n, b in gm.named_buffers():
        canonical_ids.setdefault(id(b), n)
    state = gm.state_dict(keep_vars=True)
    pm = ParamMap()
    seen = set()
    for init, s in entries_spec:
        key = s.key
        if key in seen:
            continue
        seen.add(key)
        tensor = state[key]
        pm.entries[key] = ParamEntry(
            name=key, initializer=init, kind="parameter" if isinstance(tensor, nn.Parameter) else "buffer",
            onnx_shape=tuple(int(d) for d in inits[init].dims), transpose=s.transpose, scale=s.scale,
            prunable=s.role == "prunable")
        pm.canonical.setdefault(init, canonical_ids.get(id(tensor), key))
    pm.unmapped = tuple(k for k in state if k not in pm.entries)
    for k in pm.unmapped:
        # A parameter the converter made up (a LayerNormalization without B gets a zero bias): the file has nowhere
        # to write it, so it stays what the graph says, as in the user's network.
        if isinstance(state[k], nn.Parameter):
            state[k].requires_grad_(False)
    return pm


def _operand_trains(op_type: str, index: int) -> bool:
    indices = _TRAINABLE_OPERANDS.get(op_type, ())
    return indices is None or index in indices


def _numel(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def _initializer_tensor(t: onnx.TensorProto) -> torch.Tensor:
    return torch.from_numpy(numpy_helper.to_array(t).copy())


def _register(module: nn.Module, attr: str, tensor: torch.Tensor) -> None:
    module._parameters.pop(attr, None)
    module._buffers.pop(attr, None)
    if isinstance(tensor, nn.Parameter):
        module.register_parameter(attr, tensor)
    else:
        module.register_buffer(attr, tensor)
