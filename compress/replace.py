"""Select modules by regex, exact name, dotted suffix or type, and swap them in place.

Linear maps come in two layouts: `nn.Linear` (weight m x n, y = x W^T + b) and the `Conv1D` of
Hugging Face GPT-2-style models (transformers.pytorch_utils.Conv1D, weight n x m, y = x W + b).
`linear_view` shows both as (weight m x n, bias, kind) so every factorizing family treats them alike;
`select_linear_maps` selects them and leaves out the ones that cannot be swapped (tied weights, the
projections nn.MultiheadAttention reads as raw tensors), each with its reason.
"""
from __future__ import annotations

import difflib
import re
import sys
from typing import NamedTuple, Sequence

import torch
from torch import nn

from edgeslim.compress.base import LayerChange
from edgeslim.core.errors import ConfigError

Targets = str | Sequence[str] | None

# Parents that read a child's tensors instead of calling it: a replacement there would never run.
# (parent type, child attribute, why). Replacement layers that stand in for nn.Linear also expose a
# computed `.weight`/`.bias`, so parents that merely peek at them (T5's dtype check) keep working.
DIRECT_WEIGHT_READERS: tuple[tuple[type[nn.Module], str, str], ...] = (
    (nn.MultiheadAttention, "out_proj", "nn.MultiheadAttention passes out_proj.weight to "
                                        "F.multi_head_attention_forward instead of calling out_proj"),
)


def matches(name: str, targets: Targets) -> bool:
    """PEFT-style matching: a string is re.fullmatch; a list holds exact names or dotted suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets or ())


def select_modules(model: nn.Module, target: Targets = None, exclude: Targets = None,
                   types: tuple[type[nn.Module], ...] = (nn.Linear,)) -> list[tuple[str, nn.Module]]:
    """Modules of `types` whose name matches `target` (all when None) and not `exclude`.

    Raises:
        ConfigError: the pattern is not a valid regex, or nothing matches (nearest names listed).
    """
    for pattern in (target, exclude):
        if isinstance(pattern, str):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"invalid module pattern {pattern!r}: {exc}") from exc
    candidates = [(n, m) for n, m in model.named_modules() if n and isinstance(m, types)]
    chosen = [(n, m) for n, m in candidates
              if (target is None or matches(n, target)) and not (exclude is not None and matches(n, exclude))]
    if not chosen:
        type_names = "/".join(t.__name__ for t in types)
        names = [n for n, _ in candidates]
        if not names:
            raise ConfigError(f"the model has no {type_names} module to compress")
        wanted = target if isinstance(target, str) else (list(target)[0] if target else "")
        raise ConfigError(f"no {type_names} module matches target={target!r} exclude={exclude!r}; "
                          f"nearest names: {nearest_names(wanted, names, 5)}")
    return chosen


def nearest_names(wanted: object, names: Sequence[str], n: int) -> list[str]:
    """The `n` module names closest to what the user wrote (for "nearest names" in errors)."""
    return difflib.get_close_matches(str(wanted), list(names), n=n, cutoff=0.0) or list(names[:n])


class LinearView(NamedTuple):
    """A linear map y = x W^T + b seen in the nn.Linear layout, whatever module holds it."""

    weight: torch.Tensor  # m x n (out x in); for a Conv1D a transposed view of its weight
    bias: torch.Tensor | None  # m, or None
    kind: str  # "linear" | "conv1d"

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


def conv1d_type() -> type[nn.Module] | None:
    """transformers' Conv1D class when transformers is already imported (a model holding one imported it)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None) if utils is not None else None


def linear_types() -> tuple[type[nn.Module], ...]:
    """Module types that hold a plain linear map: nn.Linear and, when loaded, transformers' Conv1D."""
    conv1d = conv1d_type()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def linear_view(module: nn.Module) -> LinearView:
    """(weight m x n, bias, kind) of an nn.Linear or a GPT-2 style Conv1D (weight stored n x m).

    Raises:
        ConfigError: the module is neither.
    """
    if isinstance(module, nn.Linear):
        return LinearView(module.weight, module.bias, "linear")
    conv1d = conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return LinearView(module.weight.T, module.bias, "conv1d")
    raise ConfigError(f"{type(module).__name__} is not a linear map (nn.Linear or transformers Conv1D)")


def tied_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names that share one tensor with others: {name: [every name of that tensor]}."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {n: names for names in groups.values() if len(names) > 1 for n in names}


def select_linear_maps(model: nn.Module, target: Targets = None, exclude: Targets = None
                       ) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """Linear maps (nn.Linear, Conv1D) to factorize, and {name: reason} for the matching ones left alone.

    Left alone: a weight tied to another parameter (the input embedding of an LM head: factoring it
    would untie it and add r(m+n) parameters), and a module whose parent reads its weight directly
    (direct_weight_reader: nn.MultiheadAttention's out_proj, so a replacement would never be called).

    Raises:
        ConfigError: nothing matches, or every match is left alone (the reasons are named).
    """
    chosen = select_modules(model, target, exclude, types=linear_types())
    tied = tied_parameters(model)
    kept, skipped = [], {}
    for name, module in chosen:
        others = [t for t in tied.get(f"{name}.weight", []) if t != f"{name}.weight"]
        reader = direct_weight_reader(model, name)
        if others:
            skipped[name] = f"weight tied to {others[0]}: left dense (factoring it would add parameters)"
        elif reader is not None:
            skipped[name] = reader
        else:
            kept.append((name, module))
    if not kept:
        raise ConfigError(f"no linear map left to compress: {skipped}")
    return kept, skipped


def direct_weight_reader(model: nn.Module, name: str) -> str | None:
    """Why the module at `name` must be left alone (its parent reads its weight directly), or None."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    for kind, attribute, why in DIRECT_WEIGHT_READERS:
        if isinstance(parent, kind) and child == attribute:
            return why
    return None


def skipped_change(name: str, module: nn.Module, reason: str) -> LayerChange:
    """The LayerChange row of a targeted module left as it was because of `reason`."""
    size = count_params(module)
    return LayerChange(name, type(module).__name__, size, size, status="skipped", bytes_before=tensor_bytes(module),
                       bytes_after=tensor_bytes(module), note=f"skipped: {reason}")


def recorded_module(model: nn.Module, name: str, types: tuple[type[nn.Module], ...]) -> nn.Module:
    """The submodule `name` a replay is about to swap, checked to be one of `types`.

    Raises:
        ConfigError: no such module, or one of another type (both named).
    """
    try:
        module = model.get_submodule(name)
    except AttributeError as exc:
        raise ConfigError(f"replay: the model has no module '{name}'") from exc
    if not isinstance(module, types):
        raise ConfigError(f"replay: '{name}' is a {type(module).__name__}, expected "
                          f"{' or '.join(t.__name__ for t in types)}")
    return module


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name` with `module`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared ones counted once)."""
    return sum(p.numel() for p in module.parameters())


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared ones counted once)."""
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
