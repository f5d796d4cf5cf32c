"""Per-layer precision of a weight-only quantization stage under a size budget: which weights stay fp32.

A wq stage quantizes every linear map (and the embeddings) at one mode. When the quantized model is
smaller than a --size-mb budget, the slack buys loss back: the weights whose quantization costs the most
loss per byte it saves stay fp32 (the wq step's `exclude`). Each weight is scored by its loss-measured
sensitivity: the task loss with that weight alone replaced by its dequantized value (the integers the
real stage stored, `weight_quant.dequantized`), less the original's loss (as compress/sensitivity.py
measures layers). The shared allocator (lowrank_budget.allocate, the greedy on each layer's convex hull)
then picks, in bytes, the weights to quantize: each is a `PrecisionLayer` whose one non-dense decision is
"quantized" (its stored integers, scales and zero points) and whose dense state is fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from edgeslim.compress.base import BudgetConfig
from edgeslim.compress.lowrank_budget import allocate
from edgeslim.compress.sensitivity import mean_loss
from edgeslim.core.calib import CalibData
from edgeslim.core.progress import bar

QUANTIZED = 0  # the one non-dense decision of a PrecisionLayer


@dataclass
class PrecisionLayer:
    """One quantized weight as the shared allocator sees it (a BudgetLayer, in bytes)."""

    name: str  # the module that owns the weight (what wq's `exclude` names)
    dense_params: int  # bytes of the fp32 weight
    quantized_bytes: int  # bytes of its integers, scales and zero points
    delta: float  # task-loss change with this weight alone quantized (may be slightly negative)

    def decisions(self, align: int) -> list[int]:
        return [QUANTIZED] if self.quantized_bytes < self.dense_params else []

    def params_at(self, d: int) -> int:
        return self.quantized_bytes

    def error_at(self, d: int) -> float:
        return max(self.delta, 0.0)

    def rank_decision(self, rank: int, align: int) -> int | None:
        return QUANTIZED

    def energy_decision(self, fraction: float, align: int) -> int | None:
        return QUANTIZED


@torch.no_grad()
def precision_layers(original: nn.Module, quantized: nn.Module, data: CalibData, label: str = "wq",
                     progress: bool = True) -> list[PrecisionLayer]:
    """Every weight a wq stage quantized in `quantized` (the stage applied to `original`), with its bytes both
    ways and its loss-measured sensitivity on `data` (which has targets). A weight tied to others (an LM head
    sharing the embedding) is one layer: replacing the shared parameter changes every use of it."""
    from edgeslim.compress.weight_quant import decompressors, integer_weights

    ints = integer_weights(quantized)
    stored = decompressors(quantized)
    was_training = original.training
    original.eval()
    base = mean_loss(original, data)
    out = []
    try:
        with bar(f"loss of each weight of {label} quantized alone", len(ints), progress) as shown:
            for name, iw in sorted(ints.items()):
                param = original.get_parameter(name)
                kept = param.data
                param.data = iw.dense().reshape(kept.shape).to(kept.dtype)
                try:
                    delta = mean_loss(original, data) - base
                finally:
                    param.data = kept
                q = quantized.get_parameter(name)
                qbytes = q.numel() * q.element_size() + sum(b.numel() * b.element_size()
                                                            for b in stored[name].buffers())
                out.append(PrecisionLayer(name.rsplit(".", 1)[0], kept.numel() * kept.element_size(), int(qbytes),
                                          delta))
                shown.advance()
    finally:
        original.train(was_training)
    return out


def allocate_precision(layers: Sequence[PrecisionLayer], budget: float) -> dict[str, bool]:
    """Which weights to quantize (name -> True) so that their bytes stay within `budget`, with the least summed
    sensitivity of the quantized ones: the shared allocator's greedy, fp32 being each layer's dense state.
    A budget below every weight quantized quantizes them all."""
    dense = sum(l.dense_params for l in layers)
    ratio = min(max(budget / max(dense, 1), 0.0), 1.0)
    decided = allocate(layers, BudgetConfig(ratio=ratio, allocation="sensitivity", align=1))
    return {name: d is not None for name, d in decided.items()}


def kept_fp32(layers: Sequence[PrecisionLayer], quantize: Mapping[str, bool]) -> list[str]:
    """The modules left fp32 by an allocation, as wq's `exclude`."""
    return sorted(l.name for l in layers if not quantize[l.name])


def loss_put_back(layers: Sequence[PrecisionLayer], quantize: Mapping[str, bool]) -> float:
    """The estimated loss the fp32 weights take back from the all-quantized stage: their summed sensitivities."""
    return sum(l.error_at(QUANTIZED) for l in layers if not quantize[l.name])
