"""GPT-2's Conv1D (a Linear stored transposed: weight (in, out), `nf` outputs) for Torch-Pruning, which has no
handler for it: with this one its projections are coupled and pruned like nn.Linear."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D, recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def conv1d_pruners() -> dict[type, object]:
    """Torch-Pruning's `customized_pruners` for the Conv1D class, when transformers is installed."""
    import torch_pruning as tp
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return {}

    class Conv1DPruner(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            keep = sorted(set(range(layer.nf)) - set(int(i) for i in idxs))
            layer.weight = nn.Parameter(layer.weight.data[:, keep].clone())
            if layer.bias is not None:
                layer.bias = nn.Parameter(layer.bias.data[keep].clone())
            layer.nf = len(keep)
            return layer

        def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            keep = sorted(set(range(layer.weight.shape[0])) - set(int(i) for i in idxs))
            layer.weight = nn.Parameter(layer.weight.data[keep, :].clone())
            return layer

        def get_out_channels(self, layer: nn.Module) -> int:
            return layer.nf

        def get_in_channels(self, layer: nn.Module) -> int:
            return layer.weight.shape[0]

    return {Conv1D: Conv1DPruner()}


def conv1d_scores(items, channels: int, criterion: str) -> torch.Tensor:
    """Per-channel importance of a group Torch-Pruning cannot score (its layers are Conv1D): the mean over the
    coupled layers of each channel's weight norm (l1/l2) or |sum grad * weight| (taylor), as its own
    GroupMagnitudeImportance / GroupTaylorImportance compute for nn.Linear."""
    total, count = torch.zeros(channels, dtype=torch.float64), 0
    for dep, idxs in items:
        layer = dep.target.module
        if not is_conv1d(layer) or len(idxs) != channels:
            continue
        out = dep.handler.__name__ == "prune_out_channels"
        w = layer.weight.detach().double()
        w = w[:, list(idxs)].T if out else w[list(idxs), :]  # one row per channel of the group
        if criterion == "taylor":
            g = layer.weight.grad
            if g is None:
                continue
            g = g.double()[:, list(idxs)].T if out else g.double()[list(idxs), :]
            total += (w * g).sum(1).abs()
        else:
            total += w.abs().sum(1) if criterion == "l1" else w.square().sum(1).sqrt()
        count += 1
    return total / max(count, 1)
