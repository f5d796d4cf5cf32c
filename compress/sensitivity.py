"""Layer sensitivity profiling: replace one layer at a time and measure the change in task loss.

This is how CompactifAI (Tomut et al., "CompactifAI: Extreme Compression of Large Language Models
using Quantum-Inspired Tensor Networks", 2024, Sec. 3) chooses which layers to compress and how
hard: each layer is compressed alone and the loss on calibration data is compared with the
original model's. Family-independent: the caller passes, per layer, a function building its
replacement, and gets back a `LossProfile` whose per-layer scales the shared allocator reads (each
family sets them on its `BudgetLayer`s: `LayerSpectrum.scale`, `MPOPlan.scale`).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import nn

from edgeslim.compress.base import BudgetConfig, CompressContext, CompressResult, Decision
from edgeslim.compress.statistics import CalibStats
from edgeslim.compress.lowrank_layer import WeightedSVD
from edgeslim.compress.replace import set_submodule
from edgeslim.compress.train import check_finite, task_loss, teacher_targets
from edgeslim.core.calib import CalibData
from edgeslim.core.config import ConfigBase
from edgeslim.core.errors import ConfigError
from edgeslim.core.progress import bar


@torch.no_grad()
def mean_loss(model: nn.Module, data: CalibData) -> float:
    """Mean task loss of `model` over the batches of `data` (which must have targets)."""
    total = 0.0
    for i, batch, target in data:
        out = model(**batch)
        check_finite({"model output": out}, f"sensitivity batch {i} of '{data.name}'")
        total += float(task_loss(out, target))
    return total / len(data.batches)


@torch.no_grad()
def loss_changes(model: nn.Module, data: CalibData, swaps: Mapping[str, Callable[[], Callable[[], None]]], title: str,
                 progress: bool = True) -> dict[str, float]:
    """Task-loss change on `data` caused by each swap alone: `swaps[name]()` changes the model in place and returns
    the function that puts it back (called before the next swap, also on error)."""
    was_training = model.training
    model.eval()
    try:
        base = mean_loss(model, data)
        out: dict[str, float] = {}
        with bar(title, len(swaps), progress) as shown:
            for name, swap in swaps.items():
                undo = swap()
                try:
                    out[name] = mean_loss(model, data) - base
                finally:
                    undo()
                shown.advance()
    finally:
        model.train(was_training)
    return out


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
    if data.targets is None:
        data = teacher_targets(model, data)

    def replace(name: str, build: Callable[[nn.Module], nn.Module]) -> Callable[[], Callable[[], None]]:
        def swap() -> Callable[[], None]:
            original = model.get_submodule(name)
            set_submodule(model, name, build(original))
            return lambda: set_submodule(model, name, original)
        return swap

    swaps = {name: replace(name, build) for name, build in builders.items()}
    return loss_changes(model, data, swaps, f"layer sensitivity on {data.name}", progress)


def loss_per_error(delta: Mapping[str, float], error: Mapping[str, float]) -> tuple[dict[str, float], float]:
    """Measured loss change per unit of allocation error, for the global greedy; and the floor.

    The greedy (compress/lowrank_budget.py) minimizes sum_l scale_l * error_l(decision). With
    scale_l = delta_l / error_l(probe), the loss change a layer showed alone at the probe decision,
    the greedy minimizes the linear estimate sum_l delta_l * error_l(d) / error_l(probe) of the
    total loss increase (CompactifAI's profile, Tomut et al. 2024, Sec. 3, made into per-layer
    budgets). A layer with no measurable increase (delta <= 0, or not profiled) gets the floor:
    1% of the median positive value, so it is compressed first but never for free.

    Returns:
        ({layer: scale} for the profiled layers, floor).
    """
    raw = {name: max(d, 0.0) / max(error[name], 1e-12) for name, d in delta.items()}
    positive = sorted(v for v in raw.values() if v > 0)
    floor = 0.01 * positive[len(positive) // 2] if positive else 1.0
    return {name: max(v, floor) for name, v in raw.items()}, floor


@dataclass
class LossProfile:
    """Per-layer loss changes of a family at its uniform probe, and the per-layer scales the allocator reads."""

    method: str
    probe_ratio: float
    delta: dict[str, float]  # loss change with only this layer replaced at its probe decision
    probe_ranks: dict[str, Decision]  # the probe decision of each profiled layer (a rank, MPO bonds)
    scales: dict[str, float]  # loss change per unit of relative (weighted) squared error
    floor: float
    seconds: float

    def scale(self, name: str) -> float:
        """The allocation scale of layer `name` (the floor for a layer the probe left dense)."""
        return self.scales.get(name, self.floor)


def profile_layers(method: str, probe_ratio: float, model: nn.Module, data: CalibData,
                   builders: Mapping[str, Callable[[nn.Module], nn.Module]], rel_error2: Mapping[str, float],
                   decisions: Mapping[str, Decision], progress: bool = True, since: float | None = None) -> LossProfile:
    """The loss profile of any family: each probe replacement alone (`layer_sensitivity`), turned into scales.

    Args:
        method: the compressor the profile is of (only it may allocate with the profile).
        probe_ratio: the kept ratio of the uniform probe.
        builders: layer name -> its replacement at the probe decision (as for `layer_sensitivity`).
        rel_error2: layer name -> relative (weighted) squared error of that replacement.
        decisions: layer name -> the probe decision.
        since: when the profile started (perf_counter), if it began before the measurement (the probe).
    """
    start = time.perf_counter() if since is None else since
    delta = layer_sensitivity(model, data, builders, progress)
    scales, floor = loss_per_error(delta, {name: rel_error2[name] for name in delta})
    return LossProfile(method, probe_ratio, delta, {name: decisions[name] for name in delta}, scales, floor,
                       time.perf_counter() - start)


class LowRankFamily(Protocol):
    """What the loss profile needs of a low-rank family (svd, fwsvd, asvd in compress/svd.py)."""

    name: str

    def make_config(self, data: Mapping[str, Any] | ConfigBase | None = None) -> ConfigBase:
        ...

    def compress_with_stats(self, model: nn.Module, config: Mapping[str, Any] | BudgetConfig, stats: CalibStats | None,
                            inplace: bool = False, context: CompressContext | None = None,
                            svds: dict[str, WeightedSVD] | None = None, profile: LossProfile | None = None
                            ) -> CompressResult:
        ...


def profile_lowrank(compressor: LowRankFamily, model: nn.Module, stats: CalibStats | None, data: CalibData,
                    config: Mapping[str, Any] | BudgetConfig, progress: bool = True,
                    context: CompressContext | None = None, svds: dict[str, WeightedSVD] | None = None) -> LossProfile:
    """Loss-measured sensitivity of a low-rank compressor (svd, fwsvd, asvd): factor each layer alone.

    The probe is the compressor itself at `config` with uniform allocation (every layer at the same
    kept ratio); each factored layer is then put alone into `model` and the task loss on `data`
    measured against the original's (`profile_layers`). One profile serves every ratio
    (`compress_by_loss`): the scales extrapolate linearly in the layer's relative squared error.

    Args:
        compressor: an svd-family compressor.
        stats: its calibration statistics (`collect_stats`), or None for plain svd.
        data: batches with targets (next-token ids for a causal LM), or without (distillation).
        config: its budget config with a `ratio` (the probe); allocation is overridden.
        context: the CompressContext passed to the probe (alignment).
        svds: filled with the probe's weighted SVDs by layer (`compress_by_loss` reuses them).
    """
    start = time.perf_counter()
    cfg = dataclasses.replace(compressor.make_config(config), allocation="uniform")
    if cfg.ratio is None:
        raise ConfigError("a loss profile needs a ratio budget for its probe (e.g. ratio = 0.8)")
    probe = compressor.compress_with_stats(model, cfg, stats, context=context, svds=svds)
    replaced = {c.name: c for c in probe.changes if c.status == "replaced"}
    builders = {name: (lambda _m, mod=probe.model.get_submodule(name): mod) for name in replaced}
    return profile_layers(compressor.name, cfg.ratio, model, data, builders,
                          {n: c.rel_error ** 2 for n, c in replaced.items()},
                          {n: int(c.decision) for n, c in replaced.items()}, progress, since=start)


def compress_by_loss(compressor: LowRankFamily, model: nn.Module, stats: CalibStats | None,
                     config: Mapping[str, Any] | BudgetConfig, profile: LossProfile,
                     context: CompressContext | None = None, inplace: bool = False,
                     svds: dict[str, WeightedSVD] | None = None) -> CompressResult:
    """`compressor` with the global greedy on measured loss: layer l's lost (weighted) energy counts
    scale_l / ||L W R||^2, i.e. scale_l times its relative squared error (`loss_per_error`).

    Every LayerChange's `sensitivity` is the loss change measured at the probe. Returns the
    CompressResult (its config says allocation "loss"; replay needs only the ranks). `svds`:
    the weighted SVDs `profile_lowrank` filled for the same statistics, reused.
    """
    result = compressor.compress_with_stats(model, config, stats, inplace=inplace, context=context, svds=svds,
                                            profile=profile)
    for change in result.changes:
        change.sensitivity = profile.delta.get(change.name, change.sensitivity)
    return result
