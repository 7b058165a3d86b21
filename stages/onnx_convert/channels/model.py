"""The records of the channel analysis: what it hands out (`TensorSlice`, `GraphChannelGroup`, `Blocked`,
`ChannelAnalysis`, and the `Plan` the surgery follows, with its `ReshapeFix` and `GroupFix` entries) and the
`ChannelLayout` of an activation tensor it tracks while walking the graph. Frozen dataclasses, so an analysis
pickles and can be handed on instead of computed again.

Imports nothing but the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TensorSlice:
    initializer: str
    axis: int
    offset: int = 0  # entries along axis before channel 0 of the group (Concat offsets)
    block: int = 1  # entries per channel along axis (Flatten/Reshape into Gemm/MatMul: H*W)
    kind: str = "weight"  # "weight": a prunable weight (see passes._graph.weight_index); "param": other trained values
    # (bias, norm scale/shift, ...), zeroed when masking; "stat": running mean/var and other values that are
    # sliced by the cut but never zeroed
    # channel c covers entries [offset + c*block, offset + (c+1)*block) along axis


@dataclass(frozen=True)
class GraphChannelGroup:
    """Output channels of the ONNX graph that are pruned together, and the initializer slices they own
    (force_core.ChannelGroup is its counterpart over PyTorch parameters)."""

    name: str  # the output tensor name of its first producer (graph order)
    size: int
    slices: tuple[TensorSlice, ...]
    producers: tuple[str, ...]  # names of the nodes (Conv/ConvTranspose/Gemm/MatMul) that create these channels


@dataclass(frozen=True)
class Blocked:
    node: str
    op_type: str
    reason: str  # a node whose channels are never pruned, and why


@dataclass(frozen=True)
class ChannelNorm:
    """A LayerNormalization over the channel axis alone (ConvNeXt's, MetaFormer's channels-last norms): cut, it
    normalises over the kept channels, which zeroing cannot reproduce; the masked reference gathers the kept
    channels around it instead (`cut.mask_channels`)."""

    node: str
    axis: int
    segs: tuple[tuple[str | None, int, int], ...]  # (group name or None when never cut, channels, block)


@dataclass(frozen=True)
class ChannelAnalysis:
    groups: tuple[GraphChannelGroup, ...]
    blocked: tuple[Blocked, ...]
    norms: tuple[ChannelNorm, ...] = ()

    def describe(self) -> str:
        """The groups and blocked nodes, one line each, for a person to read what moves together."""
        lines = [f"{len(self.groups)} channel groups, {sum(g.size for g in self.groups)} channels"]
        for g in self.groups:
            parts = ", ".join(f"{s.initializer}[{s.axis}]" + (f"@{s.offset}" if s.offset else "")
                              + (f"x{s.block}" if s.block != 1 else "") + ("" if s.kind == "weight" else f" ({s.kind})")
                              for s in g.slices)
            lines.append(f"  {g.name}: {g.size} channels; {parts}")
        lines += [f"  blocked {b.node} ({b.op_type}): {b.reason}" for b in self.blocked]
        return "\n".join(lines)


@dataclass(frozen=True)
class ReshapeFix:
    """A Reshape whose constant target spells out the channel axis: entry `position` becomes the kept count."""

    node_index: int
    position: int
    segs: tuple[tuple[str | None, int, int], ...]  # (group name or None when never cut, channels, block)


@dataclass(frozen=True)
class GroupFix:
    """A depthwise Conv/ConvTranspose whose `group` attribute follows the kept channels."""

    node_index: int
    weight: str
    multiplier: int  # output channels per input channel
    transposed: bool


@dataclass(frozen=True)
class Plan:
    """Everything the surgery needs beyond the groups; `analyze` computes it from the same graph, in the same
    pass as the `analysis` it carries."""

    analysis: ChannelAnalysis
    tensor_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # tensor -> groups in its layout
    reshapes: tuple[ReshapeFix, ...] = ()
    group_fixes: tuple[GroupFix, ...] = ()


# --- the layout of an activation tensor, while the graph is walked -----------------------------------------------
@dataclass(frozen=True)
class ChannelSegment:
    set: int  # channel-set id (union-find)
    size: int  # channels
    block: int = 1  # entries per channel along the axis


@dataclass(frozen=True)
class ChannelLayout:
    """Where an activation tensor's channels lie: the axis, and the channel sets laid end to end along it."""

    axis: int  # non-negative axis of the tensor that indexes the channels
    segs: tuple[ChannelSegment, ...]

    @property
    def width(self) -> int:
        return sum(s.size * s.block for s in self.segs)

    def scaled(self, factor: int) -> ChannelLayout:
        return ChannelLayout(self.axis, tuple(ChannelSegment(s.set, s.size, s.block * factor) for s in self.segs))

    def moved(self, axis: int) -> ChannelLayout:
        return ChannelLayout(axis, self.segs)
