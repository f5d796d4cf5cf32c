"""What Torch-Pruning's dependency graph mishandles, found before pruning (fused projections, grouped-query
attention, a relative position bias per head), and checks on a pruned model: no layer left without
channels, no layer that computed something silenced.

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


def fused_parts(g, channels: int) -> int | None:
    """How many stacked parts the group's root output is split into (1: not fused; None: not a clean split).

    A fused projection (Phi-3's gate_up_proj, split in two and multiplied) reaches its consumer with
    channels / parts indices; its parts are pruned in step (channel i of every part with channel i of
    the consumer), never a share of one part only."""
    widths = {len(i) for d, i in g if isinstance(d.target.module, nn.Module)}
    least = min(widths)
    if least == channels:
        return 1
    if channels % least or any(w % least for w in widths):
        return None
    return channels // least


def gqa_projections(model: nn.Module) -> dict[nn.Module, str]:
    """Projections inside grouped-query attention blocks (query heads sharing key/value heads)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "num_key_value_groups", None), int) and module.num_key_value_groups > 1:
            out.update({child: name for child in module.children() if isinstance(child, nn.Linear)
                        and child.out_features != getattr(module, "o_proj", child).in_features})
            out.update({child: name for child in module.children() if isinstance(child, nn.Linear)
                        and child.in_features != getattr(module, "o_proj", child).in_features})
            out.update({getattr(module, k): name for k in ("q_proj",) if hasattr(module, k)})
    return out


def relative_bias_projections(model: nn.Module) -> dict[nn.Module, str]:
    """Linear projections of attention blocks that add a learned relative position bias per head."""
    keys = ("relative_attention_bias", "relative_position_bias_table", "relative_position_bias")
    return {child: name for name, module in model.named_modules()
            if any(hasattr(module, k) or any(hasattr(c, k) for c in module.children()) for k in keys)
            for child in module.children() if isinstance(child, nn.Linear)}
