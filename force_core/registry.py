"""The method registry: one function and one decorator per pruning method, no central if/elif.

Imports only the standard library (and, for type hints, the engine's context).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from force_core.engine import PruningContext

MethodFn = Callable[["PruningContext"], None]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: `fn(ctx)` leaves the kept connections in `ctx.mask`.

    `default_steps` is used when the caller passes `steps=None`; `single_shot` methods always run
    one step whatever `steps` says (SNIP, GraSP, magnitude, random).
    """

    name: str
    fn: MethodFn
    default_steps: int = 1
    single_shot: bool = False
    needs_data: bool = True


_METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str, *, default_steps: int = 1, single_shot: bool = False, needs_data: bool = True
) -> Callable[[MethodFn], MethodFn]:
    """Register `fn(ctx) -> None` under `name` (a user method replaces nothing silently: names are unique).

    Example::

        @force_core.register_method("my_snip", single_shot=True)
        def my_snip(ctx):
            ctx.connection_sensitivity()   # fills ctx.scores (flat, one entry per prunable weight)
            ctx.keep_top(ctx.k)            # exactly k kept, deterministic ties
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty string, got {name!r}")
    if default_steps < 1:
        raise ValueError(f"default_steps must be >= 1, got {default_steps}")

    def decorate(fn: MethodFn) -> MethodFn:
        if name in _METHODS and _METHODS[name].fn is not fn:
            raise ValueError(f"a pruning method named {name!r} is already registered")
        _METHODS[name] = MethodSpec(name, fn, default_steps, single_shot, needs_data)
        return fn

    return decorate


def available_methods() -> list[str]:
    """Names of the registered methods, in registration order (built-ins first)."""
    return list(_METHODS)


def get_method(name: str) -> MethodSpec:
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(_METHODS)}") from None
