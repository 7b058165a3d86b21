"""The method registry: one function and one decorator per pruning method, no central if/elif.

Methods are keyed by (structure, name): "unstructured" methods choose single weights through a
`PruningContext` (engine.py), "channel" methods choose whole channels through a `ChannelContext`
(channels.py); the same name may exist for both. Imports only the standard library (and, for type
hints, the contexts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from force_core.channels import ChannelContext
    from force_core.engine import PruningContext

MethodFn = Callable[["PruningContext | ChannelContext"], None]
STRUCTURES = ("unstructured", "channel")


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: `fn(ctx)` leaves the kept connections in `ctx.mask` (unstructured) or the
    kept channels in `ctx.keep` (channel).

    `default_steps` is used when the caller passes `steps=None`; `single_shot` methods always run
    one step whatever `steps` says (SNIP, GraSP, magnitude, random).
    """

    name: str
    fn: MethodFn
    default_steps: int = 1
    single_shot: bool = False
    needs_data: bool = True
    structure: str = "unstructured"


_METHODS: dict[str, dict[str, MethodSpec]] = {s: {} for s in STRUCTURES}


def _methods_of(structure: str) -> dict[str, MethodSpec]:
    try:
        return _METHODS[structure]
    except (KeyError, TypeError):
        raise ValueError(f"structure must be one of {', '.join(STRUCTURES)}, got {structure!r}") from None


def register_method(
    name: str,
    *,
    structure: str = "unstructured",
    default_steps: int = 1,
    single_shot: bool = False,
    needs_data: bool = True,
) -> Callable[[MethodFn], MethodFn]:
    """Register `fn(ctx) -> None` under (`structure`, `name`) (a user method replaces nothing silently:
    names are unique within a structure).

    Example::

        @force_core.register_method("my_snip", single_shot=True)
        def my_snip(ctx):
            ctx.connection_sensitivity()   # fills ctx.scores (flat, one entry per prunable weight)
            ctx.keep_top(ctx.k)            # exactly k kept, deterministic ties

        @force_core.register_method("my_channel_snip", structure="channel", single_shot=True)
        def my_channel_snip(ctx):
            ctx.saliency()                 # fills ctx.scores (one entry per channel)
            ctx.keep_top(ctx.k)            # fewest channels keeping >= k prunable weights
    """
    methods = _methods_of(structure)
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty string, got {name!r}")
    if default_steps < 1:
        raise ValueError(f"default_steps must be >= 1, got {default_steps}")

    def decorate(fn: MethodFn) -> MethodFn:
        if name in methods and methods[name].fn is not fn:
            what = "pruning method" if structure == "unstructured" else f"{structure} pruning method"
            raise ValueError(f"a {what} named {name!r} is already registered")
        methods[name] = MethodSpec(name, fn, default_steps, single_shot, needs_data, structure)
        return fn

    return decorate


def available_methods(structure: str = "unstructured") -> list[str]:
    """Names of the registered methods of `structure`, in registration order (built-ins first)."""
    return list(_methods_of(structure))


def get_method(name: str, structure: str = "unstructured") -> MethodSpec:
    methods = _methods_of(structure)
    try:
        return methods[name]
    except (KeyError, TypeError):
        what = "" if structure == "unstructured" else f"{structure} "
        raise ValueError(f"unknown {what}method {name!r}; valid {what}methods: {', '.join(methods)}") from None
