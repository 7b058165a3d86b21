"""The channel handler registry: one function per ONNX operator type (domain ''), keyed by op type. A second
registration for an op type is refused, so that no handler silently replaces another.

Imports onnx only.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from stages.onnx_convert.channels.builder import ChannelBuilder

__all__ = ["HANDLERS", "Handler", "channel_handler"]

Handler = Callable[[ChannelBuilder, onnx.NodeProto], None]
HANDLERS: dict[str, Handler] = {}


def _qualified(fn: Handler) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def channel_handler(*op_types: str) -> Callable[[Handler], Handler]:
    """Register `fn(builder, node)` as the channel handler of `op_types` (domain ''): it reads the layouts of
    the node's inputs (`builder.layout(name)`), sets those of its outputs (`builder.set_layout`), records the
    initializer slices the channels own (`builder.slice_layout`) and unites or blocks sets. An operator with
    no handler blocks every channel that reaches it. Raises ValueError, registering none of `op_types`, when
    one of them already has a handler (or is named twice)."""

    def register(fn: Handler) -> Handler:
        seen: dict[str, Handler] = {}
        for op in op_types:
            existing = HANDLERS.get(op, seen.get(op))
            if existing is not None:
                raise ValueError(f"channel handler for op type {op!r} already registered: {_qualified(existing)}; "
                                 f"refusing {_qualified(fn)}")
            seen[op] = fn
        HANDLERS.update(seen)
        return fn

    return register
