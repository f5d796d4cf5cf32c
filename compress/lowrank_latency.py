"""The latency-aware budget of the low-rank family: `speedup = S` reached with the least error.

A factored m x n linear map run on M input rows costs two GEMMs, (M x n) @ (n x r) and
(M x r) @ (r x m), instead of one (M x n) @ (n x m). Whether that is faster depends on the
target's kernels, not on FLOPs alone (thin GEMMs run far below peak), so every time here comes
from the target's own GEMM table (`Measure.gemm_ms`, measured on the target and cached; compress/
never measures itself) and the whole model's latency (`Measure.model_ms`). The budget is Amdahl's:
with T the model's latency and G the targeted layers' dense GEMM time, the layers may spend
T / S - (T - G). `allocate_latency` spends it with the same greedy as the ratio budget
(lowrank_budget._greedy), in milliseconds instead of parameters: every layer starts at its fastest
decision and moves, one step at a time, where that removes the most error per added millisecond.
A rank that is not faster than the dense layer is never a candidate: such a layer stays dense.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from edgeslim.compress.base import CompressContext, Measure
from edgeslim.compress.lowrank_budget import LayerSpectrum
from edgeslim.core.errors import ConfigError
from edgeslim.core.specs import example_feeds


def gemm_rows(model: nn.Module, names: Sequence[str], context: CompressContext) -> dict[str, int]:
    """Input rows M of each named linear map in one call at the context's input sizes (one forward pass)."""
    if not context.inputs:
        raise ConfigError("a speedup budget needs the model's input spec (CompressContext.inputs) to size its GEMMs")
    feeds = {k: torch.from_numpy(v) for k, v in example_feeds(context.inputs, context.dims or {"batch": 1}).items()}
    rows: dict[str, int] = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: rows.__setitem__(n, rows.get(n, 0) + args[0].numel() // args[0].shape[-1]))
        for n in names]
    try:
        with torch.inference_mode():
            model(**feeds)
    finally:
        for h in handles:
            h.remove()
    return {n: rows.get(n, 0) for n in names}


@dataclass
class LayerTimes:
    """Measured GEMM times of one layer: dense, and at each admissible rank."""

    spectrum: LayerSpectrum
    rows: int  # M
    measure: Measure

    @property
    def dense_ms(self) -> float:
        s = self.spectrum
        return self.measure.gemm_ms(self.rows, s.in_features, s.out_features) if self.rows else 0.0

    def ms_at(self, rank: int | None) -> float:
        """GEMM time of the layer at `rank` (None: dense)."""
        if rank is None:
            return self.dense_ms
        s = self.spectrum
        return (self.measure.gemm_ms(self.rows, s.in_features, rank) +
                self.measure.gemm_ms(self.rows, rank, s.out_features)) if self.rows else 0.0

    def candidates(self, align: int) -> list[tuple[int | None, float, float]]:
        """(rank or None for dense, ms, error), strictly increasing in ms and decreasing in error: a rank
        slower than a larger one (or than the dense layer) is dropped, as it loses on both counts."""
        out: list[tuple[int | None, float, float]] = [(None, self.dense_ms, 0.0)]
        for rank in reversed(list(self.spectrum.decisions(align))):
            ms = self.ms_at(rank)
            if ms < out[-1][1]:
                out.append((rank, ms, self.spectrum.error_at(rank)))
        return out[::-1]


def allocate_latency(layers: Sequence[LayerTimes], speedup: float, align: int, model_ms: float
                     ) -> tuple[dict[str, int | None], dict[str, float]]:
    """Ranks (None: dense) that reach `speedup` of the whole model with the least (scaled) error.

    Returns (decisions, summary) with summary holding model_ms, the layers' dense GEMM time, the time
    left for them, and the estimated latency and speedup of the result.

    Raises:
        ConfigError: the speedup is out of reach even with every layer at its fastest rank (the best
            estimated speedup is named).
    """
    options = {t.spectrum.name: t.candidates(align) for t in layers}
    dense = sum(t.dense_ms for t in layers)
    other = max(model_ms - dense, 0.0)  # time outside the targeted GEMMs (never negative)
    budget = model_ms / speedup - other
    index = {name: 0 for name in options}
    spent = sum(opts[0][1] for opts in options.values())
    if spent > budget:
        best = fastest_speedup(layers, align, model_ms)
        raise ConfigError(f"speedup {speedup:g} is out of reach on this target: with every targeted layer at its "
                          f"fastest rank the estimate is {best:.2f}x (the targeted GEMMs take {dense:.3g} of "
                          f"{model_ms:.3g} ms); target more layers or ask for less")

    def step(name: str) -> tuple[float, float]:
        (_, ms_a, err_a), (_, ms_b, err_b) = options[name][index[name]], options[name][index[name] + 1]
        return (err_a - err_b) / (ms_b - ms_a), ms_b - ms_a

    heap = [(-step(n)[0], n) for n, opts in options.items() if len(opts) > 1]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        cost = step(name)[1]
        if spent + cost > budget:
            continue  # a cheaper step of another layer may still fit
        index[name] += 1
        spent += cost
        if index[name] + 1 < len(options[name]):
            heapq.heappush(heap, (-step(name)[0], name))
    decisions = {name: options[name][index[name]][0] for name in options}
    summary = {"model_ms": model_ms, "targeted_dense_ms": dense, "other_ms": other, "budget_ms": budget,
               "estimated_ms": other + spent, "estimated_speedup": model_ms / (other + spent) if other + spent else None}
    return decisions, summary


EXTRAPOLATE = 3.0  # a re-aim without a round above the goal goes at most to the cube of the highest estimate


def fastest_speedup(layers: Sequence[LayerTimes], align: int, model_ms: float) -> float:
    """The estimated speedup with every layer at its fastest decision (the most a budget can reach)."""
    dense = sum(t.dense_ms for t in layers)
    fastest = max(model_ms - dense, 0.0) + sum(t.candidates(align)[0][1] for t in layers)
    return model_ms / fastest if fastest > 0 else float("inf")


def reaim(rounds: Sequence[Mapping[str, float]], asked: float, reachable: float) -> float:
    """The estimated speedup to aim the next allocation at, so that the measured one reaches `asked`.

    Each round holds the `estimated` and the `measured` speedup of one allocation. GEMMs timed alone
    overstate what the model gains, by an amount that depends on the layer mix, so the measured
    speedup is followed as a function of the estimate: log(measured) interpolated linearly in
    log(estimated) between the nearest rounds below and above `asked` (the uncompressed model, 1 -> 1,
    is the first point below), extrapolated through the two highest rounds while none reaches it.
    Capped just under `reachable`, the fastest estimate (fastest_speedup). On MiniLM asked 1.3, the
    first allocation measured 1.03x; extrapolating from it alone jumped to 8.5x estimated, 2.6x measured.
    """
    goal = math.log(asked)
    points = sorted([(0.0, 0.0)] + [(math.log(r["estimated"]), math.log(r["measured"])) for r in rounds
                                     if r["estimated"] > 0 and r["measured"] > 0])
    below = [p for p in points if p[1] < goal]
    above = [p for p in points if p[1] >= goal and p[0] > (below[-1][0] if below else -math.inf)]
    if above:
        (x0, y0), (x1, y1) = below[-1], above[0]
        aim = x0 + (goal - y0) * (x1 - x0) / (y1 - y0)
    else:  # extrapolated, at most to the cube of the highest estimate so far
        (x0, y0), (x1, y1) = points[-2:]
        aim = min(x0 + (goal - y0) * (x1 - x0) / (y1 - y0), EXTRAPOLATE * x1) if y1 > y0 else EXTRAPOLATE * x1
    return min(math.exp(aim), reachable * (1 - 1e-6))


def timing_note(times: LayerTimes, rank: int | None, align: int) -> str:
    """Whether factoring paid off for this layer on the target, for its LayerChange row."""
    dense = times.dense_ms
    if rank is None:
        if len(times.candidates(align)) == 1:
            return (f"dense: no rank (multiple of {align}) is faster than the dense layer on this target "
                    f"({dense:.3g} ms)")
        return f"dense: the budget leaves room for the dense layer ({dense:.3g} ms on this target)"
    now = times.ms_at(rank)
    verdict = "paid off" if now < dense else "did NOT pay off (slower than dense)"
    return f"factoring {verdict}: {now:.3g} ms vs {dense:.3g} ms dense on this target"
