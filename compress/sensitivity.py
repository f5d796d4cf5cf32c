"""Layer sensitivity profiling: replace one layer at a time and measure the change in task loss.

This is how CompactifAI (Tomut et al., "CompactifAI: Extreme Compression of Large Language Models
using Quantum-Inspired Tensor Networks", 2024, Sec. 3) chooses which layers to compress and how
hard: each layer is compressed alone and the loss on calibration data is compared with the
original model's. Family-independent: the caller passes, per layer, a function building its
replacement.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from rich.progress import Progress
from torch import nn

from edgeslim.calib import CalibData
from edgeslim.compress.replace import set_submodule
from edgeslim.compress.train import check_finite, task_loss, teacher_targets


@torch.no_grad()
def mean_loss(model: nn.Module, data: CalibData) -> float:
    """Mean task loss of `model` over the batches of `data` (which must have targets)."""
    total = 0.0
    for i, batch, target in data:
        out = model(**batch)
        check_finite({"model output": out}, f"sensitivity batch {i} of '{data.name}'")
        total += float(task_loss(out, target))
    return total / len(data.batches)


def layer_sensitivity(model: nn.Module, data: CalibData, builders: Mapping[str, Callable[[nn.Module], nn.Module]],
                      progress: bool = True) -> dict[str, float]:
    """Task-loss increase caused by replacing each named layer alone (all others left original).

    Args:
        model: the original model; it is modified only temporarily (each layer is put back).
        data: calibration batches; without targets the loss is the MSE to the original model's
            outputs (distillation), so the original's own loss is 0.
        builders: layer name -> function from the original module to its replacement.
        progress: show a progress bar.

    Returns:
        layer name -> loss(with that layer replaced) - loss(original); may be slightly negative.
    """
    was_training = model.training
    model.eval()
    if data.targets is None:
        data = teacher_targets(model, data)
    try:
        base = mean_loss(model, data)
        out: dict[str, float] = {}
        with Progress(transient=True, disable=not progress) as bar:
            task = bar.add_task(f"layer sensitivity on {data.name}", total=len(builders))
            for name, build in builders.items():
                original = model.get_submodule(name)
                set_submodule(model, name, build(original))
                try:
                    out[name] = mean_loss(model, data) - base
                finally:
                    set_submodule(model, name, original)
                bar.advance(task)
    finally:
        model.train(was_training)
    return out
