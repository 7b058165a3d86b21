"""The method registry: one function and one decorator per pruning method, no central if/elif.

Methods are keyed by (structure, name): "unstructured" methods choose single weights through a
`PruningContext` (engine.py), "channel" methods choose whole channels through a `ChannelContext`
(channels.py); the same name may exist for both, but never twice for one structure. Imports only the
standard library: the engine and channels import the registry, never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# fn(ctx): ctx is a PruningContext (structure "unstructured") or a ChannelContext (structure "channel").
MethodFn = Callable[[Any], None]
STRUCTURES = ("unstructured", "channel")


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: `fn(ctx)` leaves the kept connections in `ctx.mask` (unstructured) or the
    kept channels in `ctx.keep` (channel).

    `default_steps` is used when the caller passes `steps=None`; `single_shot` methods always run
    one step whatever `steps` says (SNIP, GraSP, magnitude, random).

    `needs_data` False: the method is data-free, its masks are the same whatever the batches hold. An
    unstructured one may still read the input's shape from the first batch (SynFlow), so `compute_masks` still
    takes one batch of the input's shape (any values); a channel one gets no batches (`ctx.batches` is None).
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
    """Register `fn(ctx) -> None` under (`structure`, `name`). Names are unique within a structure: registering
    a name again raises ValueError naming it (registering the very same function with the same options again
    changes nothing and is allowed).

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
        spec = MethodSpec(name, fn, default_steps, single_shot, needs_data, structure)
        old = methods.get(name)
        if old is not None and old != spec:
            what = "pruning method" if structure == "unstructured" else f"{structure} pruning method"
            by = f"{getattr(old.fn, '__module__', '?')}.{getattr(old.fn, '__qualname__', repr(old.fn))}"
            raise ValueError(f"a {what} named {name!r} is already registered (by {by}); choose another name")
        methods.setdefault(name, spec)
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


def needs_data(name: str, structure: str = "unstructured") -> bool:
    """Whether method `name` of `structure` scores on data (False: data-free, see `MethodSpec.needs_data`).
    Raises ValueError for an unknown method, as `get_method` does."""
    return get_method(name, structure).needs_data


def data_free_methods(structure: str = "unstructured") -> frozenset[str]:
    """Names of the registered data-free methods of `structure` (built-in: magnitude, random, and synflow
    for "unstructured")."""
    return frozenset(n for n, spec in _methods_of(structure).items() if not spec.needs_data)
