"""Grouped-query attention pruned by key/value group: a kept key/value head keeps the query heads that read it.

In LLaMA-style attention (Qwen2, Gemma, Mistral, ...) `num_key_value_groups` query heads share one key/value
head. Torch-Pruning's graph does not resolve that sharing, so these blocks are cut here: key/value head j
goes with query heads j*g .. j*g+g-1 and the matching input columns of o_proj, so `num_key_value_groups`
is unchanged and the head counts follow from the weight shapes. Scores: the L2 norm of every weight the
group owns (q/k/v rows, o_proj columns), as the magnitude criterion does for channels.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from edgeslim.core.errors import ConfigError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def gqa_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Attention blocks with separate q/k/v/o Linear projections whose query heads share key/value heads."""
    out = {}
    for name, module in model.named_modules():
        groups, head_dim = getattr(module, "num_key_value_groups", None), getattr(module, "head_dim", None)
        if isinstance(groups, int) and groups > 1 and isinstance(head_dim, int) and all(
                isinstance(getattr(module, p, None), nn.Linear) for p in PROJECTIONS):
            out[name] = module
    return out


def _kv_heads(block: nn.Module) -> int:
    return block.k_proj.out_features // block.head_dim


def _rows(block: nn.Module, kv: int) -> dict[str, list[int]]:
    """The q/k/v output rows (and o_proj input columns) that key/value head `kv` owns."""
    hd, g = block.head_dim, block.num_key_value_groups
    q = list(range(kv * g * hd, (kv + 1) * g * hd))
    return {"q_proj": q, "k_proj": list(range(kv * hd, (kv + 1) * hd)), "v_proj": list(range(kv * hd, (kv + 1) * hd)),
            "o_proj": q}


def kv_scores(block: nn.Module) -> torch.Tensor:
    """Importance of each key/value group: the L2 norm of all the weights it owns."""
    scores = []
    for kv in range(_kv_heads(block)):
        rows = _rows(block, kv)
        total = sum(getattr(block, p).weight.detach().double()[rows[p]].square().sum() for p in PROJECTIONS[:3])
        total = total + block.o_proj.weight.detach().double()[:, rows["o_proj"]].square().sum()
        scores.append(total.sqrt())
    return torch.stack(scores)


def plan(model: nn.Module, ratio: float) -> dict[str, list[int]]:
    """Kept key/value heads per block at `ratio` (at least one; blocks where nothing would go are left out)."""
    out = {}
    for name, block in gqa_blocks(model).items():
        heads = _kv_heads(block)
        keep = max(1, math.floor(heads * ratio + 1e-9))
        if keep < heads:
            order = torch.argsort(kv_scores(block), descending=True, stable=True).tolist()
            out[name] = sorted(order[:keep])
    return out


def _slice(linear: nn.Linear, rows: Sequence[int] | None, cols: Sequence[int] | None) -> None:
    w = linear.weight.data
    w = w[list(rows)] if rows is not None else w
    w = w[:, list(cols)] if cols is not None else w
    linear.weight = nn.Parameter(w.clone())
    if rows is not None and linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[list(rows)].clone())
    linear.out_features, linear.in_features = linear.weight.shape


def prune_block(block: nn.Module, kept: Sequence[int]) -> None:
    """Keep key/value heads `kept` of `block` with their query heads.

    Raises:
        ConfigError: `kept` is not a non-empty list of distinct head indices of this block (a replayed record).
    """
    heads = _kv_heads(block)
    if not kept or not all(isinstance(k, int) and 0 <= k < heads for k in kept) or len(set(kept)) != len(kept):
        raise ConfigError(f"kept key/value heads {list(kept)!r} do not fit a block of {heads} key/value heads")
    rows = {p: [r for kv in sorted(kept) for r in _rows(block, kv)[p]] for p in PROJECTIONS}
    for p in PROJECTIONS[:3]:
        _slice(getattr(block, p), rows[p], None)
    _slice(block.o_proj, None, rows["o_proj"])


def apply(model: nn.Module, kept: Mapping[str, Sequence[int]]) -> None:
    """Replay recorded cuts (`plan`'s result) on the source model's structure."""
    blocks = gqa_blocks(model)
    for name, heads in kept.items():
        if name not in blocks:
            raise ConfigError(f"'{name}' is not a grouped-query attention block of this model")
        prune_block(blocks[name], heads)
