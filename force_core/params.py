"""Which parameters are prunable: conv/linear weights by default, an explicit list, or a selector.

Imports torch only.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping

from torch import nn

# As in the paper: the weights of convolution and fully connected layers; biases and normalisation
# layers are kept.
PRUNABLE_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)

# A selector is a callable (name, module, param) -> bool, or a mapping with optional "include" and
# "exclude" lists of fnmatch patterns on the parameter name (e.g. {"exclude": ["fc.*", "conv1.*"]}).
Selector = Callable[[str, nn.Module, nn.Parameter], bool] | Mapping[str, Iterable[str]]


def prunable_parameters(
    model: nn.Module, params: Iterable[str] | None = None, selector: Selector | None = None
) -> dict[str, nn.Parameter]:
    """Name -> parameter (names as in `model.named_parameters()`), in the model's parameter order.

    `params` names the candidates explicitly (e.g. MatMul weights held by onnx2torch modules);
    otherwise the candidates are the `weight` of every Conv*/ConvTranspose*/Linear module. The
    `selector` then keeps or drops candidates by name.
    """
    owner = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            owner[f"{mod_name}.{p_name}" if mod_name else p_name] = (module, p_name, p)
    all_params = dict(model.named_parameters())

    if params is not None:
        wanted = list(params)
        unknown = [n for n in wanted if n not in all_params]
        if unknown:
            raise ValueError(f"params names not in model.named_parameters(): {unknown[:5]}")
        candidates = [n for n in all_params if n in set(wanted)]
    else:
        candidates = [
            n
            for n in all_params
            if n in owner and owner[n][1] == "weight" and isinstance(owner[n][0], PRUNABLE_LAYER_TYPES)
        ]

    keep = _selector_fn(selector)
    return {n: all_params[n] for n in candidates if keep(n, owner[n][0] if n in owner else model, all_params[n])}


def _selector_fn(selector: Selector | None) -> Callable[[str, nn.Module, nn.Parameter], bool]:
    if selector is None:
        return lambda name, module, param: True
    if callable(selector):
        return selector
    if isinstance(selector, Mapping):
        bad = set(selector) - {"include", "exclude"}
        if bad:
            raise ValueError(f"selector keys must be 'include' and/or 'exclude', got {sorted(bad)}")
        include = list(selector.get("include", ["*"]))
        exclude = list(selector.get("exclude", []))
        return lambda name, module, param: (
            any(fnmatch.fnmatchcase(name, p) for p in include)
            and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
        )
    raise ValueError(f"selector must be a callable or a mapping with include/exclude patterns, got {selector!r}")
