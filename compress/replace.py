"""Select modules by regex, exact name, dotted suffix or type, and swap them in place."""
from __future__ import annotations

import difflib
import re
from typing import Sequence

from torch import nn

from edgeslim.compress.base import LayerChange
from edgeslim.errors import ConfigError

Targets = str | Sequence[str] | None

# Parents that read a child's tensors instead of calling it: a replacement there would never run.
# (parent type, child attribute, why). Replacement layers that stand in for nn.Linear also expose a
# computed `.weight`/`.bias`, so parents that merely peek at them (T5's dtype check) keep working.
DIRECT_WEIGHT_READERS: tuple[tuple[type[nn.Module], str, str], ...] = (
    (nn.MultiheadAttention, "out_proj", "nn.MultiheadAttention passes out_proj.weight to "
                                        "F.multi_head_attention_forward instead of calling out_proj"),
)


def _matches(name: str, targets: Targets) -> bool:
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
              if (target is None or _matches(n, target)) and not (exclude is not None and _matches(n, exclude))]
    if not chosen:
        type_names = "/".join(t.__name__ for t in types)
        names = [n for n, _ in candidates]
        if not names:
            raise ConfigError(f"the model has no {type_names} module to compress")
        wanted = target if isinstance(target, str) else (list(target)[0] if target else "")
        near = difflib.get_close_matches(str(wanted), names, n=5, cutoff=0.0) or names[:5]
        raise ConfigError(f"no {type_names} module matches target={target!r} exclude={exclude!r}; "
                          f"nearest names: {near}")
    return chosen


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
