"""Checks on a pruned model: no layer left without channels, no layer that computed something silenced.

A coupling Torch-Pruning resolves wrongly (a fused projection cut in one part only, Phi-3's gate_up_proj
before it was pruned in step) can leave a layer of width 0 or a block whose output is all zeros while
the model still runs and exports; such a result is refused, never saved.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from edgeslim.core.errors import ConfigError


def nonzero_outputs(model: nn.Module, inputs: Mapping[str, torch.Tensor], names: Sequence[str]) -> set[str]:
    """The modules among `names` whose output on `inputs` is not identically zero."""
    seen: set[str] = set()

    def hook(_m, _a, out, name):
        if isinstance(out, torch.Tensor) and out.numel() and bool(out.detach().ne(0).any()):
            seen.add(name)
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n in names]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def check_pruned(model: nn.Module, inputs: Mapping[str, torch.Tensor], alive: set[str]) -> None:
    """ConfigError when pruning left a layer with no channel or silenced a layer that computed something."""
    for name, module in model.named_modules():
        widths = [getattr(module, k, None) for k in ("in_features", "out_features", "in_channels", "out_channels")]
        if any(w == 0 for w in widths):
            raise ConfigError(f"pruning would leave '{name}' with 0 channels (a structure edgeslim cannot prune "
                              "safely); raise the ratio or exclude it")
    try:
        dead = sorted(alive - nonzero_outputs(model, inputs, sorted(alive)))
    except Exception as exc:  # noqa: BLE001  (any failure of the pruned model is the pruning's)
        raise ConfigError(f"the pruned model no longer runs: {type(exc).__name__}: {exc}"[:400]) from exc
    if dead:
        raise ConfigError(f"pruning would make {dead[0]} output zeros only (a structure edgeslim cannot prune "
                          "safely); exclude it")
