"""The `factorize` compressor: every selected Conv2d/Conv3d becomes a rank-R SeparableConv2d/3d.

Two routes (Boukraichi et al., arXiv 2304.04964, 2023; the layer is in separable_conv.py):
- a priori, init="fresh": the untrained architecture is factored before training, each layer at
  the same rank (`rank`) or the same kept fraction (`ratio`, uniform), freshly initialised with
  variance preservation; the model is then trained in that form (compress.train.heal).
- a posteriori, init="cp": trained kernels are CP-decomposed (Lebedev et al., ICLR 2015) under the
  shared budget forms: ratio (uniform, or global greedy on a per-layer error curve), rank or
  energy. The error is the kernel's relative squared error, or with calibration data the relative
  squared change of the model's output when only that layer is factored (its sensitivity,
  `output_errors`), which the shared global greedy (compress/lowrank_budget.py) then spends on.
A layer is factored only at ranks whose form has strictly fewer parameters than the layer. Depthwise
convolutions (groups == in_channels > 1) are skipped by default (`depthwise=False`): a k x k
depthwise kernel keeps C*k^2 weights and the rank-R form R*C*(2 + 2k), so only rank 1 of a 3x3
(8C against 9C) or ranks 1-2 of a 5x5 save anything, at the error of a rank-1/2 approximation of
every k x k filter; on a trained CNN that costs far more accuracy than the few parameters it saves.
Replay rebuilds the factored structure from the recorded ranks; the weights load afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.compress.base import (BudgetConfig, CompressContext, CompressResult, Compressor, LayerChange, register,
                                    working_copy)
from edgeslim.compress.lowrank_budget import allocate, dense_note
from edgeslim.compress.replace import recorded_module, select_modules, set_submodule, skipped_change, tensor_bytes
from edgeslim.compress.separable_conv import SeparableConvNd, separable_class
from edgeslim.core.errors import ConfigError
from edgeslim.core.specs import TensorSpec

_GRID = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)  # fractions of the largest saving rank


class ConvBudgetLayer:
    """One targeted convolution seen by the budget allocator: decisions are ranks R, params and
    error at each (the per-layer protocol of the shared allocator)."""

    def __init__(self, name: str, conv: nn.Module, n_iter: int, seed: int) -> None:
        self.name, self.conv, self.n_iter, self.seed = name, conv, n_iter, seed
        self.cls = separable_class(conv)
        self.bias = conv.out_channels if conv.bias is not None else 0
        self.dense_params = conv.weight.numel() + self.bias
        self.per_rank = self.cls.param_count(conv.in_channels, conv.out_channels, conv.kernel_size, 1, conv.groups,
                                             bias=False)
        self.errors: dict[int, float] = {}  # error per grid rank, filled before a greedy allocation
        self.measured = False  # True when `errors` are output changes on calibration data
        self._layers: dict[int, SeparableConvNd] = {}

    def params_at(self, rank: int) -> int:
        return rank * self.per_rank + self.bias

    def max_saving_rank(self, align: int) -> int:
        """Largest multiple of align that keeps fewer parameters than the dense layer (0: none)."""
        r = min((self.dense_params - self.bias - 1) // self.per_rank, self.cls.exact_rank(self.conv))
        return r - r % align

    def rank_decision(self, rank: int, align: int) -> int | None:
        rank = max(rank - rank % align, min(align, rank))
        return rank if self.params_at(rank) < self.dense_params else None

    def ratio_decision(self, ratio: float, align: int) -> int | None:
        top = self.max_saving_rank(align)
        if top < align or ratio >= 1.0:
            return None
        rank = int((ratio * self.dense_params - self.bias) // self.per_rank)
        return max(align, min(rank - rank % align, top))

    def grid(self, align: int) -> list[int]:
        """At most len(_GRID) saving ranks, ascending: where errors are measured."""
        top = self.max_saving_rank(align)
        return sorted({max(align, int(f * top) - int(f * top) % align) for f in _GRID}) if top >= align else []

    def decisions(self, align: int) -> range:
        """Every saving multiple of align (BudgetLayer protocol)."""
        return range(align, self.max_saving_rank(align) + 1, align)

    def error_at(self, rank: int) -> float:
        """Error at `rank`: measured on the grid (`errors`), linear in between (BudgetLayer protocol)."""
        ranks = sorted(self.errors)
        if rank in self.errors or not ranks:
            return self.errors.get(rank, 0.0)
        return float(np.interp(rank, ranks, [self.errors[r] for r in ranks]))

    def layer(self, rank: int) -> SeparableConvNd:
        """The layer factored at `rank` (CP computed once per rank)."""
        if rank not in self._layers:
            self._layers[rank] = self.cls.from_conv(self.conv, rank, self.n_iter, self.seed)
        return self._layers[rank]

    def kernel_error(self, rank: int) -> float:
        """||W - W_R||_F^2 / ||W||_F^2."""
        w = self.conv.weight.detach().double()
        with torch.no_grad():
            diff = self.layer(rank).dense_kernel().double() - w
        return float(diff.square().sum() / w.square().sum().clamp_min(1e-300))

    def energy_decision(self, fraction: float, align: int) -> int | None:
        """Smallest grid rank keeping `fraction` of the kernel energy (None: none does, stay dense)."""
        for rank in self.grid(align):
            if 1.0 - self.kernel_error(rank) >= fraction:
                return rank
        return None


def depthwise_reason(conv: nn.Module) -> str | None:
    """Why `factorize` skips `conv` by default (a depthwise convolution), or None when it does not."""
    if conv.groups == 1 or conv.groups != conv.in_channels:
        return None
    cls, c = separable_class(conv), conv.in_channels
    weights = conv.weight.numel()
    rank1 = cls.param_count(conv.in_channels, conv.out_channels, conv.kernel_size, 1, conv.groups, bias=False)
    return (f"depthwise {'x'.join(map(str, conv.kernel_size))} convolution ({c} channels): {weights} weights, "
            f"the separable form {rank1} per rank; it is skipped by default (depthwise = true includes it)")


@torch.no_grad()
def output_errors(model: nn.Module, layers: Sequence[ConvBudgetLayer], calib, align: int, batches: int = 2) -> None:
    """Sensitivity: relative squared change of the model's output when only one layer is factored,
    at each grid rank, on the first `batches` calibration batches (fills `layer.errors`)."""
    feeds = [b for _, b, _ in calib][:batches]
    was_training = model.training
    model.eval()
    try:
        reference = [model(**b) for b in feeds]
        norm = sum(float(r.double().square().sum()) for r in reference)
        for l in layers:
            for rank in l.grid(align):
                set_submodule(model, l.name, l.layer(rank))
                diff = sum(float((model(**b) - r).double().square().sum()) for b, r in zip(feeds, reference))
                l.errors[rank] = diff / max(norm, 1e-300)
            l.measured = True
            set_submodule(model, l.name, l.conv)
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class FactorizeConfig(BudgetConfig):
    """CP factorization of convolutions; the budget forms are those of BudgetConfig."""

    init: Literal["cp", "fresh"] = "cp"  # "cp": factor trained kernels (a posteriori); "fresh": untrained (a priori)
    n_iter: int = 100  # ALS iterations of the CP decomposition (kernels with more than two modes > 1)
    seed: int = 0  # fresh initialisation and the CP start
    sensitivity_batches: int = 2  # calibration batches used to measure each layer's output change
    depthwise: bool = False  # also factor depthwise convolutions (groups == in_channels > 1); see the module doc

    def validate(self) -> None:
        super().validate()
        if self.init == "fresh" and (self.energy is not None or self.allocation == "sensitivity"):
            raise ConfigError("init='fresh' has no trained kernel to measure: give rank or ratio with "
                              "allocation='uniform' (or 'auto')")
        for key in ("n_iter", "sensitivity_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"factorize {key} must be a positive integer, got {getattr(self, key)!r}")


@register
class Factorize(Compressor):
    """Conv2d/Conv3d -> SeparableConv2d/3d (CP), a priori (fresh) or from trained kernels (cp)."""

    name = "factorize"
    Config = FactorizeConfig
    kind = "structural"
    data_aware = True  # with calibration data, sensitivity = the model's output change per layer

    def compress(self, model: nn.Module, config: FactorizeConfig, calib: CalibData | None = None,
                 inplace: bool = False, context: CompressContext | None = None) -> CompressResult:
        config = self.make_config(config)
        fresh = config.init == "fresh"
        config = config.resolve(data_aware=calib is not None and not fresh, context=context)
        model = working_copy(model, inplace)
        selected = select_modules(model, config.target, config.exclude, types=(nn.Conv2d, nn.Conv3d))
        skipped = {n: r for n, c in selected if not config.depthwise and (r := depthwise_reason(c)) is not None}
        chosen = [(n, c) for n, c in selected if n not in skipped]
        if not chosen:
            raise ConfigError(f"no convolution left to factorize: the {len(skipped)} selected are depthwise, which "
                              "factorize skips by default (set depthwise = true to factor them anyway)")
        for _, conv in chosen:  # refuse what the layer cannot express before any work
            separable_class(conv).empty_like(conv, 1)
        layers = [ConvBudgetLayer(n, c, config.n_iter, config.seed) for n, c in chosen]
        if config.allocation == "sensitivity" and config.ratio is not None:
            if calib is not None:
                output_errors(model, layers, calib, config.align, config.sensitivity_batches)
            else:
                for l in layers:
                    l.errors = {r: l.kernel_error(r) for r in l.grid(config.align)}
        ranks = allocate(layers, config)
        changes = {n: skipped_change(n, c, skipped[n]) for n, c in selected if n in skipped}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            for l in layers:
                rank, size = ranks[l.name], l.conv.weight.element_size()
                if rank is None:
                    changes[l.name] = LayerChange(l.name, type(l.conv).__name__, l.dense_params, l.dense_params,
                                                  status="dense", bytes_before=tensor_bytes(l.conv),
                                                  bytes_after=tensor_bytes(l.conv), rel_error=0.0,
                                                  note=dense_note(l, config))
                    continue
                new = l.cls.empty_like(l.conv, rank) if fresh else l.layer(rank)
                set_submodule(model, l.name, new)
                changes[l.name] = LayerChange(
                    l.name, f"{type(l.conv).__name__} -> {type(new).__name__}", l.dense_params, l.params_at(rank), rank,
                    bytes_before=tensor_bytes(l.conv), bytes_after=size * l.params_at(rank),
                    rel_error=None if fresh else l.kernel_error(rank) ** 0.5,
                    sensitivity=l.error_at(rank) if l.measured else None,
                    note="fresh init (a priori: train it)" if fresh else "")
        resolved = {"init": config.init, "ranks": {n: r for n, r in ranks.items() if r is not None},
                    "dense": [n for n, r in ranks.items() if r is None], "skipped": skipped}
        return self.result(model, config, [changes[n] for n, _ in selected], resolved)

    def replay(self, model: nn.Module, resolved: Mapping[str, Any], inputs: Sequence[TensorSpec]) -> nn.Module:
        """Swap the recorded convolutions for empty SeparableConv layers of the recorded ranks."""
        for name, rank in resolved.get("ranks", {}).items():
            conv = recorded_module(model, name, (nn.Conv2d, nn.Conv3d))
            set_submodule(model, name, separable_class(conv).empty_like(conv, int(rank)))
        return model
