"""The shared budget allocator: one BudgetConfig (ratio, rank or energy) for every family.

The allocator sees each targeted layer through the small `BudgetLayer` protocol: its admissible
non-dense decisions (a rank, a kept channel count, or a tuple such as MPO bond dimensions), the
parameters and the (globally comparable) error at each, and how a fixed rank or an energy
threshold maps to a decision. `allocate()` then implements
- ratio, uniform: the same kept ratio per layer (layers that cannot save are paid for first);
- ratio, sensitivity: a global greedy that spends the budget one decision step at a time where it
  removes the most error per parameter, along each layer's convex hull with dense as its last point;
- rank and energy: each layer's own mapping.
`LayerSpectrum` is the implementation for a factored m x n matrix (svd, fwsvd, asvd): rank r keeps
r*(m+n) (+m bias) parameters and saves only when r*(m+n) < m*n; truncating the (weighted) spectrum
at r leaves the error sum(energy[r:]).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from edgeslim.compress.base import BudgetConfig, Decision
from edgeslim.core.errors import ConfigError


class BudgetLayer(Protocol):
    """One targeted layer as the allocator sees it."""

    name: str
    dense_params: int  # parameters of the layer as it is

    def decisions(self, align: int) -> Sequence[Decision]:
        """Admissible non-dense decisions that save parameters, ascending in params (may be empty)."""
        ...

    def params_at(self, d: Decision) -> int:
        """Parameters the layer keeps at decision d."""
        ...

    def error_at(self, d: Decision) -> float:
        """Error at decision d, scaled so that layers compare globally (sensitivity allocation)."""
        ...

    def rank_decision(self, rank: int, align: int) -> Decision | None:
        """The decision for a fixed `rank` (None: stays dense). Raises ConfigError if it does not fit."""
        ...

    def energy_decision(self, fraction: float, align: int) -> Decision | None:
        """The smallest decision keeping `fraction` of the energy (None: stays dense)."""
        ...


def weigh(weight: torch.Tensor, row_weight: torch.Tensor | None = None,
          col_factor: torch.Tensor | None = None) -> torch.Tensor:
    """L W R in float64, the matrix a LayerSpectrum is the spectrum of: L = diag(row_weight) or an
    upper-triangular m x m factor, R = diag(col_factor) or a lower-triangular n x n factor."""
    w = weight.detach().to(torch.float64)
    if row_weight is not None:
        row_weight = row_weight.to(torch.float64)
        w = row_weight[:, None] * w if row_weight.dim() == 1 else row_weight @ w
    if col_factor is not None:
        col_factor = col_factor.to(torch.float64)
        w = w * col_factor if col_factor.dim() == 1 else w @ col_factor
    return w


@dataclass
class LayerSpectrum:
    """A factored m x n matrix (optional bias of m) with its (weighted) spectrum: a BudgetLayer."""

    name: str
    out_features: int  # m
    in_features: int  # n
    bias: int  # number of bias parameters (0 or m)
    energy: torch.Tensor  # squared (weighted) singular values, descending, float64
    scale: float = 1.0  # multiplies energy to compare layers in one global greedy (sensitivity)

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features + self.bias

    def params_at(self, rank: int) -> int:
        return rank * (self.out_features + self.in_features) + self.bias

    def saves(self, rank: int) -> bool:
        """True when rank r stores fewer weights than the dense matrix: r*(m+n) < m*n."""
        return rank * (self.out_features + self.in_features) < self.out_features * self.in_features

    def max_saving_rank(self, align: int) -> int:
        """Largest multiple of align that still saves parameters (0 when none does)."""
        m, n = self.out_features, self.in_features
        r = min((m * n - 1) // (m + n), min(m, n))
        return r - r % align

    def decisions(self, align: int) -> range:
        return range(align, self.max_saving_rank(align) + 1, align)

    def error_at(self, rank: int) -> float:
        return self.scale * float(self.energy[rank:].sum())

    def rank_decision(self, rank: int, align: int) -> int | None:
        top = min(self.out_features, self.in_features)
        if rank > top:
            raise ConfigError(f"rank {rank} is too large for layer '{self.name}' "
                              f"({self.out_features}x{self.in_features}, max rank {top})")
        rank = max(rank - rank % align, min(align, rank))
        return rank if self.saves(rank) else None

    def energy_decision(self, fraction: float, align: int) -> int | None:
        """Smallest rank keeping `fraction` of the energy, rounded UP to align (the floor is honoured)."""
        total = float(self.energy.sum())
        rank = align
        if total > 0.0:
            kept = torch.cumsum(self.energy, 0) / total
            rank = int(torch.searchsorted(kept, torch.tensor(fraction - 1e-12, dtype=kept.dtype)).item()) + 1
            rank = -(-rank // align) * align
        rank = min(rank, min(self.out_features, self.in_features))
        return rank if self.saves(rank) else None


def _uniform(layers: Sequence[BudgetLayer], ratio: float, align: int) -> dict[str, Decision | None]:
    """Same kept ratio for each layer that can save; the others stay dense and are paid first."""
    options = {l.name: list(l.decisions(align)) for l in layers}
    fixed = [l for l in layers if not options[l.name]]
    free = [l for l in layers if options[l.name]]
    budget = ratio * sum(l.dense_params for l in layers) - sum(l.dense_params for l in fixed)
    out: dict[str, Decision | None] = {l.name: None for l in fixed}
    if not free:
        return out
    layer_ratio = budget / sum(l.dense_params for l in free)  # <= 0: the dense layers alone exceed the ratio
    for l in free:
        if layer_ratio >= 1.0:
            out[l.name] = None
            continue
        fits = [d for d in options[l.name] if l.params_at(d) <= layer_ratio * l.dense_params]
        out[l.name] = fits[-1] if fits else options[l.name][0]  # the largest that fits, else the smallest
    return out


def _hull(layer: BudgetLayer, options: Sequence[Decision], dense: bool = True) -> list[Decision | None]:
    """The decisions on the lower convex hull of (params, error), ending at dense (None, error 0)
    unless `dense` is False.

    A layer's curve is not convex at its end: the last saving rank still drops part of the spectrum
    and going dense removes that error for few parameters. On the hull every step removes less error
    per parameter than the one before, so the greedy order stays optimal (the multiple-choice
    knapsack relaxation) and a layer can go dense straight from a rank when that is the better buy.
    """
    points = [(layer.params_at(d), layer.error_at(d), d) for d in options]
    points += [(layer.dense_params, 0.0, None)] if dense else []
    hull: list[tuple[int, float, Decision | None]] = []
    for p in points:
        # drop the last point while it lies on or above the line from the one before it to p
        while len(hull) >= 2 and ((hull[-2][1] - hull[-1][1]) * (p[0] - hull[-2][0])
                                  <= (hull[-2][1] - p[1]) * (hull[-1][0] - hull[-2][0])):
            hull.pop()
        hull.append(p)
    return [d for _, _, d in hull]


def _greedy(layers: Sequence[BudgetLayer], ratio: float, align: int) -> dict[str, Decision | None]:
    """Global greedy: each step moves one layer to its next decision on its convex hull (`_hull`,
    dense last) where that removes the most (scaled) error per added parameter."""
    options = {l.name: list(l.decisions(align)) for l in layers}
    fixed = [l for l in layers if not options[l.name]]
    free = [l for l in layers if options[l.name]]
    budget = ratio * sum(l.dense_params for l in layers) - sum(l.dense_params for l in fixed)
    out: dict[str, Decision | None] = {l.name: None for l in fixed}
    spent = sum(l.params_at(options[l.name][0]) for l in free)
    if spent > budget:  # the ratio cannot be reached: the smallest decisions are the closest (the caller warns)
        return out | {l.name: options[l.name][0] for l in free}
    path = {l.name: _hull(l, options[l.name]) for l in free}
    index = {l.name: 0 for l in free}  # position on the layer's hull

    def params(l: BudgetLayer, d: Decision | None) -> int:
        return l.dense_params if d is None else l.params_at(d)

    def step(l: BudgetLayer) -> tuple[float, int]:
        here, there = path[l.name][index[l.name]], path[l.name][index[l.name] + 1]
        cost = params(l, there) - params(l, here)
        gain = l.error_at(here) - (0.0 if there is None else l.error_at(there))
        return gain / cost, cost

    heap = [(-step(l)[0], i) for i, l in enumerate(free) if len(path[l.name]) > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        l = free[i]
        cost = step(l)[1]
        if spent + cost > budget:
            # the hull step does not fit: the decisions it skipped may (a smaller layer may too)
            here, there = path[l.name][index[l.name]], path[l.name][index[l.name] + 1]
            between = [d for d in options[l.name] if params(l, here) <= l.params_at(d) < params(l, there)]
            path[l.name] = path[l.name][:index[l.name]] + _hull(l, between, dense=False)
            if index[l.name] + 1 < len(path[l.name]):
                heapq.heappush(heap, (-step(l)[0], i))
            continue
        index[l.name] += 1
        spent += cost
        if index[l.name] + 1 < len(path[l.name]):
            heapq.heappush(heap, (-step(l)[0], i))
    out.update({l.name: path[l.name][index[l.name]] for l in free})
    return out


def allocate(layers: Sequence[BudgetLayer], config: BudgetConfig) -> dict[str, Decision | None]:
    """Decide every layer under one budget; None means the layer stays dense.

    `config` must be resolved (`BudgetConfig.resolve`): allocation is "uniform", "sensitivity" or
    "loss" (the greedy on scales a measured profile set on the layers), align is set. With a ratio, the kept parameters of all targeted layers stay within
    ratio * (their dense parameters), up to one decision step per layer.

    Raises:
        ConfigError: a rank that a layer cannot take (the layer is named) or a ratio that cannot be met.
    """
    align = config.align
    if config.rank is not None and align is not None:
        return {l.name: l.rank_decision(config.rank, align) for l in layers}
    if config.energy is not None and align is not None:
        return {l.name: l.energy_decision(config.energy, align) for l in layers}
    if config.allocation == "auto" or align is None:
        raise ValueError("allocate() needs a resolved BudgetConfig (call config.resolve(...) first)")
    if config.allocation in ("sensitivity", "loss"):  # "loss": the layers' scales come from a measured profile
        return _greedy(layers, config.ratio, align)
    return _uniform(layers, config.ratio, align)


def dense_note(layer: BudgetLayer, config: BudgetConfig) -> str:
    """Why allocation left `layer` dense, for its LayerChange row."""
    if not layer.decisions(config.align):
        return f"dense: no decision that is a multiple of align={config.align} would save parameters"
    if config.rank is not None:
        return f"dense: factoring would not save parameters at rank {config.rank} (align {config.align})"
    if config.energy is not None:
        return f"dense: keeping {config.energy:g} of the energy would not save parameters"
    return f"dense: the ratio {config.ratio:g} budget leaves room for the whole layer"
