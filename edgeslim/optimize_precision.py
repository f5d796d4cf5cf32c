"""Per-layer precision of a weight-only quantization stage under a size budget: which weights stay fp32.
(The same layers and greedy, in milliseconds, choose the ops an INT8 stage keeps fp32: optimize_int8.py.)

A wq stage quantizes every linear map (and the embeddings) at one mode. When the quantized model is
smaller than a --size-mb budget, the slack buys loss back: the weights whose quantization costs the most
loss per byte it saves stay fp32 (the wq step's `exclude`). Each weight is scored by its loss-measured
sensitivity: the task loss with that weight alone replaced by its dequantized value (the integers the
real stage stored, `weight_quant.dequantized`), less the original's loss (as compress/sensitivity.py
measures layers). The shared allocator (lowrank_budget.allocate, the greedy on each layer's convex hull)
then picks, in bytes, the weights to quantize: each is a `PrecisionLayer` whose one non-dense decision is
"quantized" (its stored integers, scales and zero points) and whose dense state is fp32.
With class or next-token targets the loss change is estimated from the empirical Fisher instead (one
backward pass a batch for every weight, AutoQuantize's score): measuring 211 weights of SmolLM2 one by one
took about 10 s each on the shared 2-core machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from edgeslim.compress.base import BudgetConfig
from edgeslim.compress.lowrank_budget import allocate
from edgeslim.compress.sensitivity import loss_changes
from edgeslim.compress.train import task_loss
from edgeslim.core.calib import CalibData

QUANTIZED = 0  # the one non-dense decision of a PrecisionLayer


@dataclass
class PrecisionLayer:
    """One quantized weight (or INT8 op) as the shared allocator sees it (a BudgetLayer, in the budget's unit:
    bytes, or milliseconds for an INT8 op)."""

    name: str  # the module that owns the weight (what wq's `exclude` names), or the ONNX op (int8's `fp32_ops`)
    dense_params: float  # cost fp32: bytes of the fp32 weight (an INT8 op: the ms its INT8 kernel saves)
    quantized_cost: float  # cost quantized: bytes of its integers, scales and zero points (an INT8 op: 0 more ms)
    delta: float  # task-loss change with this weight (op) alone quantized (may be slightly negative)

    def decisions(self, align: int) -> list[int]:
        return [QUANTIZED] if self.quantized_cost < self.dense_params else []

    def params_at(self, d: int) -> float:
        return self.quantized_cost

    def error_at(self, d: int) -> float:
        return max(self.delta, 0.0)

    def rank_decision(self, rank: int, align: int) -> int | None:
        return QUANTIZED

    def energy_decision(self, fraction: float, align: int) -> int | None:
        return QUANTIZED


def precision_layers(original: nn.Module, quantized: nn.Module, data: CalibData, label: str = "wq",
                     fisher: dict[str, torch.Tensor] | None = None, progress: bool = True) -> list[PrecisionLayer]:
    """Every weight a wq stage quantized in `quantized` (the stage applied to `original`), with its bytes both
    ways and its estimated loss change on `data` (which has targets). With class or next-token targets the
    estimate is Fisher's (`fisher_diagonal`, computed once into `fisher` and shared by the stages); with
    distillation targets (the original's own outputs, where every gradient is 0) it is measured: the loss with
    that weight alone quantized, less the original's. A weight tied to others (an LM head sharing the
    embedding) is one layer: its one parameter is every use of it."""
    from edgeslim.compress.weight_quant import decompressors, integer_weights

    ints = integer_weights(quantized)
    stored = decompressors(quantized)
    if data.targets is not None and not torch.is_floating_point(data.targets[0]):
        fisher = {} if fisher is None else fisher
        missing = [n for n in sorted(ints) if n not in fisher]
        if missing:
            fisher.update(fisher_diagonal(original, data, missing))
        delta = {n: 0.5 * float((fisher[n] * (iw.dense().reshape(fisher[n].shape) - original.get_parameter(n).detach()
                                               ).square()).sum()) for n, iw in ints.items()}
    else:
        delta = measured_losses(original, {n: iw.dense() for n, iw in ints.items()}, data, label, progress)
    out = []
    for name in sorted(ints):
        kept, q = original.get_parameter(name), quantized.get_parameter(name)
        qbytes = q.numel() * q.element_size() + sum(b.numel() * b.element_size() for b in stored[name].buffers())
        out.append(PrecisionLayer(name.rsplit(".", 1)[0], kept.numel() * kept.element_size(), int(qbytes),
                                  delta[name]))
    return out


def fisher_diagonal(model: nn.Module, data: CalibData, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The empirical Fisher of the named parameters on `data`: the mean over batches of the task loss's squared
    gradient, so that 0.5 * sum(F * dw**2) estimates the loss change of a weight moved by dw (the second-order
    term at a trained model; AutoQuantize's score, ModelOpt)."""
    params = [model.get_parameter(n) for n in names]
    flags = [p.requires_grad for p in params]
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        for _, batch, target in data:
            with torch.enable_grad():
                grads = torch.autograd.grad(task_loss(model(**batch), target), params, allow_unused=True)
            for f, g in zip(fisher, grads):
                if g is not None:
                    f += g.detach().float().square() / len(data.batches)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return dict(zip(names, fisher))


def measured_losses(model: nn.Module, replaced: Mapping[str, torch.Tensor], data: CalibData, label: str,
                    progress: bool = True) -> dict[str, float]:
    """Task-loss change on `data` with each named parameter alone set to its `replaced` value (put back after)."""
    def set_to(name: str, value: torch.Tensor) -> Callable[[], Callable[[], None]]:
        def swap() -> Callable[[], None]:
            param = model.get_parameter(name)
            kept = param.data
            param.data = value.reshape(kept.shape).to(kept.dtype)
            return lambda: setattr(param, "data", kept)
        return swap

    swaps = {name: set_to(name, replaced[name]) for name in sorted(replaced)}
    return loss_changes(model, data, swaps, f"loss of each weight of {label} quantized alone", progress)


def allocate_precision(layers: Sequence[PrecisionLayer], budget: float) -> dict[str, bool]:
    """Which weights to quantize (name -> True) so that their cost stays within `budget`, with the least summed
    sensitivity of the quantized ones: the shared allocator's greedy, fp32 being each layer's dense state.
    A weight whose quantization loses nothing (delta <= 0) stays quantized: fp32 would buy nothing back.
    A budget below every weight quantized quantizes them all."""
    lossy = [l for l in layers if l.delta > 0]
    budget -= sum(l.quantized_cost for l in layers if l.delta <= 0)
    if not lossy or budget <= sum(l.quantized_cost for l in lossy):  # no room to put any weight back
        return {l.name: True for l in layers}
    ratio = min(budget / sum(l.dense_params for l in lossy), 1.0)
    decided = allocate(lossy, BudgetConfig(ratio=ratio, allocation="sensitivity", align=1))
    return {l.name: l.delta <= 0 or decided[l.name] is not None for l in layers}


def kept_fp32(layers: Sequence[PrecisionLayer], quantize: Mapping[str, bool]) -> list[str]:
    """The modules left fp32 by an allocation, as wq's `exclude`."""
    return sorted(l.name for l in layers if not quantize[l.name])


def loss_put_back(layers: Sequence[PrecisionLayer], quantize: Mapping[str, bool]) -> float:
    """The estimated loss the fp32 weights take back from the all-quantized stage: their summed sensitivities."""
    return sum(l.error_at(QUANTIZED) for l in layers if not quantize[l.name])
