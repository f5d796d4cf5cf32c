"""Rank allocation for low-rank factorization under one BudgetConfig (ratio, rank or energy).

A layer W (m x n, optional bias of m) factored at rank r keeps r*(m+n) (+m) parameters; it saves
parameters only when r*(m+n) < m*n, otherwise it stays dense. Allocation works on each layer's
(weighted) spectrum: `energy[k]` is the squared k-th singular value, so truncating at rank r leaves
the error sum(energy[r:]).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from edgeslim.compress.base import BudgetConfig
from edgeslim.errors import ConfigError


@dataclass
class LayerSpectrum:
    """What allocation needs to know about one targeted layer."""

    name: str
    out_features: int  # m
    in_features: int  # n
    bias: int  # number of bias parameters (0 or m)
    energy: torch.Tensor  # squared (weighted) singular values, descending, float64
    scale: float = 1.0  # multiplies energy to compare layers in one global greedy (sensitivity)

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features + self.bias

    def lowrank_params(self, rank: int) -> int:
        return rank * (self.out_features + self.in_features) + self.bias

    def saves(self, rank: int) -> bool:
        """True when rank r stores fewer weights than the dense matrix: r*(m+n) < m*n."""
        return rank * (self.out_features + self.in_features) < self.out_features * self.in_features

    def max_saving_rank(self, align: int) -> int:
        """Largest multiple of align that still saves parameters (0 when none does)."""
        m, n = self.out_features, self.in_features
        r = min((m * n - 1) // (m + n), min(m, n))
        return r - r % align


def _round_down(rank: int, align: int) -> int:
    return rank - rank % align


def _energy_rank(energy: torch.Tensor, fraction: float, align: int) -> int:
    """Smallest rank keeping `fraction` of the energy, rounded UP to align (the floor is honoured)."""
    total = float(energy.sum())
    if total <= 0.0:
        return align
    kept = torch.cumsum(energy, 0) / total
    rank = int(torch.searchsorted(kept, torch.tensor(fraction - 1e-12, dtype=kept.dtype)).item()) + 1
    return -(-rank // align) * align


def _uniform_ranks(layers: list[LayerSpectrum], ratio: float, align: int) -> dict[str, int | None]:
    """Same kept ratio for each factorable layer; layers that cannot save stay dense and are paid first."""
    fixed = [l for l in layers if l.max_saving_rank(align) < align]
    free = [l for l in layers if l.max_saving_rank(align) >= align]
    budget = ratio * sum(l.dense_params for l in layers) - sum(l.dense_params for l in fixed)
    free_total = sum(l.dense_params for l in free)
    ranks: dict[str, int | None] = {l.name: None for l in fixed}
    if not free:
        return ranks
    layer_ratio = budget / free_total
    if layer_ratio <= 0.0:
        raise ConfigError(f"ratio {ratio} is below what the layers that cannot be factored already keep "
                          f"({[l.name for l in fixed]})")
    for l in free:
        if layer_ratio >= 1.0:
            ranks[l.name] = None
            continue
        rank = int((layer_ratio * l.dense_params - l.bias) // (l.out_features + l.in_features))
        ranks[l.name] = max(align, min(_round_down(rank, align), l.max_saving_rank(align)))
    return ranks


def _greedy_ranks(layers: list[LayerSpectrum], ratio: float, align: int) -> dict[str, int | None]:
    """Global greedy: spend the budget one aligned rank step at a time where it removes the most
    (scaled) truncation error per parameter. Spectra are descending, so each layer's gain per step
    shrinks and the greedy order is optimal for the relaxed problem."""
    fixed = [l for l in layers if l.max_saving_rank(align) < align]
    free = [l for l in layers if l.max_saving_rank(align) >= align]
    budget = ratio * sum(l.dense_params for l in layers) - sum(l.dense_params for l in fixed)
    ranks: dict[str, int | None] = {l.name: None for l in fixed}
    ranks.update({l.name: align for l in free})
    spent = sum(l.lowrank_params(align) for l in free)
    if free and spent > budget:
        raise ConfigError(f"ratio {ratio} is too small: even rank {align} in every targeted layer keeps "
                          f"{spent} parameters, over the budget of {int(budget)}")

    def gain(l: LayerSpectrum, rank: int) -> float:
        return l.scale * float(l.energy[rank:rank + align].sum()) / (align * (l.out_features + l.in_features))

    heap = [(-gain(l, align), i) for i, l in enumerate(free) if 2 * align <= l.max_saving_rank(align)]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        l = free[i]
        step = align * (l.out_features + l.in_features)
        if spent + step > budget:
            continue  # a smaller layer may still fit
        ranks[l.name] += align
        spent += step
        if ranks[l.name] + align <= l.max_saving_rank(align):
            heapq.heappush(heap, (-gain(l, ranks[l.name]), i))
    for l in free:  # a layer at its largest saving rank goes back to dense when the budget allows
        extra = l.dense_params - l.lowrank_params(ranks[l.name])
        if ranks[l.name] == l.max_saving_rank(align) and spent + extra <= budget:
            ranks[l.name] = None
            spent += extra
    return ranks


def allocate_ranks(layers: list[LayerSpectrum], config: BudgetConfig) -> dict[str, int | None]:
    """Rank per layer (None = stays dense) for the config's budget form and allocation.

    - ratio: kept parameters of the targeted layers <= ratio * their dense parameters (within one
      aligned rank step when a layer needs the minimum rank), uniform or sensitivity-driven.
    - rank: that rank (rounded down to align) everywhere; a rank above min(m, n) is an error.
    - energy: per layer, the smallest rank keeping that fraction of the (weighted) spectral energy.
    In every form a layer whose rank would not save parameters stays dense.

    Raises:
        ConfigError: the rank exceeds a layer's dimensions (the layer is named) or the ratio cannot
            be met.
    """
    align = config.align
    if config.rank is not None:
        ranks: dict[str, int | None] = {}
        for l in layers:
            if config.rank > min(l.out_features, l.in_features):
                raise ConfigError(f"rank {config.rank} is too large for layer '{l.name}' "
                                  f"({l.out_features}x{l.in_features}, max rank {min(l.out_features, l.in_features)})")
            rank = max(_round_down(config.rank, align), min(align, config.rank))
            ranks[l.name] = rank if l.saves(rank) else None
        return ranks
    if config.energy is not None:
        out: dict[str, int | None] = {}
        for l in layers:
            rank = min(_energy_rank(l.energy, float(config.energy), align), min(l.out_features, l.in_features))
            out[l.name] = rank if l.saves(rank) else None
        return out
    if config.allocation == "sensitivity":
        return _greedy_ranks(layers, float(config.ratio), align)
    return _uniform_ranks(layers, float(config.ratio), align)
