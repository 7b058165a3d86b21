"""Channel dependency analysis on the normalised ONNX graph (DepGraph's build/group/check on ONNX): which
output channels must be pruned together, and which slices of which initializers they own; and the surgery
that follows it (`cut_channels` removes the pruned channels, `mask_channels` zeroes them in place).

Imports onnx, onnx_ir and numpy only; never torch, force_core, flows, prefect or click.

How it works: every activation tensor that carries channels gets a *layout* (`model.ChannelLayout`), the
channel axis and the run of channel sets laid end to end along it (one set, or several after a Concat; `block`
entries per channel after a Flatten). A Conv/ConvTranspose/Gemm/MatMul with a constant weight starts a new set;
the handler of each operator (one small function per operator type in `HANDLERS`, see `channel_handler`; the
families live in `handlers/`) says how the layout goes from its inputs to its outputs and which initializer
slices it owns. Operators that force channels to be the same (residual Add, SE Mul, tied weights) unite their
sets (`sets.ChannelSets`); an operator no handler understands blocks every set that flows into it. A blocked set
is never pruned; the rest, with at least one prunable weight, are the groups.

Modules: `model` (the records), `sets` (union-find), `builder` (the walk's state and shape inference),
`registry` (op type -> handler), `handlers/` (one module per operator family), `analyze` (the driver),
`cut` (the surgery).

One analysis serves a whole channel run: `analyze(model)` returns the `Plan` the surgery needs, which carries
the `ChannelAnalysis` (`plan.analysis`, what `analyze_channels` returns); pass it on as
`cut_channels(model, plan.analysis, keep, plan=plan)`. Both are frozen dataclasses and pickle.
"""

from stages.onnx_convert.channels.analysis import analyze, analyze_channels
from stages.onnx_convert.channels.cut import cut_channels, keep_arrays, mask_channels
from stages.onnx_convert.channels.model import Blocked, ChannelAnalysis, GraphChannelGroup, Plan, TensorSlice
from stages.onnx_convert.channels.registry import HANDLERS, channel_handler

__all__ = ["Blocked", "ChannelAnalysis", "GraphChannelGroup", "HANDLERS", "Plan", "TensorSlice", "analyze",
           "analyze_channels", "channel_handler", "cut_channels", "keep_arrays", "mask_channels"]
