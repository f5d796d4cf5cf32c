"""The search of `edgeslim optimize`: allocate on estimates, verify on the target, re-aim from the measured points.

For an aimed gain g (a speedup, or the size ratio of a --size-mb budget) every combo of whole-model stages
(optimize_space.Combo) gets the per-layer asvd ranks that reach it with the least estimated loss, from the
shared allocator: in milliseconds of the target's GEMM table for a time budget
(lowrank_latency.allocate_latency, the greedy on each layer's convex hull), in parameters for a size
budget (lowrank_budget.allocate). An INT8 combo's measured time scales the fp32 GEMM savings by its own
measured INT8/fp32 ratio. The estimate of a candidate's loss is the combo's measured loss change plus
the asvd layers' estimated ones.

Verify, don't trust: the candidates with the least estimated loss (and, for comparison, the best of each
single family) are really compressed, exported, evaluated on the eval data (optimize_jobs) and timed on
the target side by side with the original. Each combo's estimate is then re-aimed from its measured
points (lowrank_latency.reaim, as `compress --speedup` does) until a candidate within the metric budget
meets the asked gain within TOLERANCE, the rounds run out or the time budget ends.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from edgeslim.compress.base import BudgetConfig
from edgeslim.compress.lowrank_budget import allocate
from edgeslim.compress.lowrank_latency import allocate_latency, fastest_speedup, reaim
from edgeslim.core.errors import ConfigError
from edgeslim.core.progress import say
from edgeslim.optimize_precision import allocate_precision, kept_fp32, loss_put_back
from edgeslim.optimize_space import Combo, Space, bytes_per_weight

TOLERANCE = 0.05  # the measured gain meets the asked one within 5%
ROUNDS = 4  # verification rounds at most (each re-aims every combo it measured)
TOP = 2  # candidates of least estimated loss verified per round (beside the single-family ones)


@dataclass
class Estimate:
    """One allocation: a combo and its asvd ranks, with the estimated cost, gain and loss change."""

    combo: Combo
    ranks: dict[str, int | None]
    cost: float  # ms on the target, or weight bytes
    gain: float  # base cost / cost
    loss: float
    aimed: float  # the gain the allocation aimed at
    fp32: tuple[str, ...] = ()  # the modules its wq stage (ONNX ops its int8 stage) leaves fp32: a precision mix

    @property
    def families(self) -> tuple[str, ...]:
        lowrank = ("asvd",) if any(r is not None for r in self.ranks.values()) else ()
        return tuple(sorted(set(self.combo.families) | set(lowrank)))

    @property
    def label(self) -> str:
        factored = sum(r is not None for r in self.ranks.values())
        parts = [s.label for s in self.combo.stages] + ([f"asvd {factored} layers"] if factored else [])
        kept = f" ({len(self.fp32)} {'ops' if 'int8' in self.combo.families else 'weights'} fp32)"
        return " + ".join(parts) + (kept if self.fp32 else "") or "original"


@dataclass
class Point:
    """A verified candidate: its estimate and what was measured."""

    label: str
    families: tuple[str, ...]
    steps: list[dict[str, Any]]
    estimated_gain: float
    estimated_loss: float
    gain: float  # measured on the target (speedup) or on the artifact (size ratio)
    metric: float
    drop: float  # in the metric's units (perplexity: relative increase)
    result: dict[str, Any] = field(default_factory=dict)  # the job's answer (artifact, ONNX file, cache flags)
    combo: str = ""
    round: int = 0
    mixed: bool = False  # a per-layer precision mix (some weights of its wq stage, ops of its int8 stage, fp32):
    # no family's own recipe


def drop_of(metric: float, base: float, name: str) -> float:
    """How much worse `metric` is than the original's `base`: absolute for accuracy-like metrics, relative for
    perplexity (lower is better; 0.1 = 10% higher)."""
    return metric / base - 1.0 if name == "perplexity" else base - metric


def estimate(combo: Combo, space: Space, aim: float, axis: str) -> Estimate | None:
    """The least-loss asvd ranks on `combo` whose estimated cost is base/aim (None: out of the combo's reach)."""
    target = space.base_cost / aim
    dense = {s.name: None for s in combo.spectra}
    if combo.cost <= target:  # the stages alone reach it (the original itself is no candidate)
        if not combo.stages:
            return None
        if combo.precision:  # the slack keeps the weights that lose most per byte fp32
            return _precision_mix(combo, space, target, aim)
        return Estimate(combo, dense, combo.cost, space.base_cost / combo.cost, combo.loss, aim)
    if not combo.spectra:
        return None
    if axis == "ms":
        factor = combo.cost / combo.dense_cost  # INT8's measured time per fp32 ms (1 without INT8)
        try:
            ranks, summary = allocate_latency(combo.layers, combo.cost / target, space.align, combo.dense_cost)
        except ConfigError:
            return None
        cost = factor * summary["estimated_ms"]
        if cost > target * (1 + 1e-9) or all(r is None for r in ranks.values()):
            return None
    else:
        per_param = bytes_per_weight(combo.loaded.model)
        dense_params = sum(s.dense_params for s in combo.spectra)
        ratio = 1.0 - (combo.cost - target) / per_param / dense_params
        if ratio <= 0.0:
            return None
        ranks = allocate(combo.spectra, BudgetConfig(ratio=min(ratio, 1.0), allocation="sensitivity",
                                                     align=space.align))
        cost = combo.cost - per_param * sum(s.dense_params - s.params_at(ranks[s.name]) for s in combo.spectra
                                            if ranks[s.name] is not None)
        if cost > target * (1 + 1e-9):
            return None
    loss = combo.loss + sum(s.error_at(ranks[s.name]) for s in combo.spectra if ranks[s.name] is not None)
    return Estimate(combo, ranks, cost, space.base_cost / cost, loss, aim)


def _precision_mix(combo: Combo, space: Space, target: float, aim: float) -> Estimate:
    """The wq (int8) combo with the weights (ops) whose quantization loses most per byte (ms) saved left fp32,
    within `target` (optimize_precision, optimize_int8); the combo's measured loss less the sensitivities of the
    weights put back."""
    layers = combo.precision
    other = combo.cost - sum(l.quantized_cost for l in layers)  # outside the quantized weights (INT8 ops: all)
    quantize = allocate_precision(layers, target - other)
    cost = other + sum(l.quantized_cost if quantize[l.name] else l.dense_params for l in layers)
    loss = combo.loss - loss_put_back(layers, quantize)
    dense = {s.name: None for s in combo.spectra}
    return Estimate(combo, dense, cost, space.base_cost / cost, loss, aim, tuple(kept_fp32(layers, quantize)))


def first_weight_mix(combo: Combo, space: Space, aim: float) -> Estimate | None:
    """The wq combo with only the weight that loses most per byte saved left fp32 (the shared greedy's first
    step), when the budget `aim` has room for it; None otherwise. Each weight's loss is estimated alone, with
    every other weight fp32, and those losses do not add: on SmolLM2 the int8 errors of the late layers offset
    the others', so the full mix (109 weights fp32 at 0.5x) measured perplexity 26.579 against wq int8's 26.578,
    while its first weight alone (layers.11.mlp.down_proj, 0.5% of the weights) measured 26.513. The search
    verifies both and keeps the better."""
    lossy = [l for l in combo.precision if l.delta > 0 and l.dense_params > l.quantized_cost]
    target = space.base_cost / aim
    if not lossy or combo.cost > target:
        return None
    top = max(lossy, key=lambda l: l.delta / (l.dense_params - l.quantized_cost))
    room = combo.cost + top.dense_params - top.quantized_cost
    if room > target:
        return None
    return _precision_mix(combo, space, room, aim)


def reachable(combo: Combo, space: Space, axis: str) -> float:
    """The largest gain the estimate gives `combo` (every layer at its fastest or smallest rank)."""
    if not combo.spectra:
        return space.base_cost / combo.cost
    if axis == "ms":
        fastest = combo.dense_cost / fastest_speedup(combo.layers, space.align, combo.dense_cost)
        return space.base_cost / (combo.cost / combo.dense_cost * fastest)
    per_param = bytes_per_weight(combo.loaded.model)
    saved = sum(s.dense_params - s.params_at(s.decisions(space.align)[0]) for s in combo.spectra
                if len(s.decisions(space.align)))
    return space.base_cost / (combo.cost - per_param * saved)


@dataclass
class Outcome:
    """What the search found: every verified point, the chosen one, and whether the budget was met."""

    points: list[Point]
    chosen: Point
    met: bool
    asked: float
    rounds: int
    best_single: dict[str, Point]


def meets(point: Point, asked: float, max_drop: float) -> bool:
    return point.gain >= asked * (1 - TOLERANCE) and point.drop <= max_drop


def choose(points: Sequence[Point], asked: float, max_drop: float) -> tuple[Point, bool]:
    """The point with the best metric among those meeting the budget; else the fastest within the metric
    budget, else the one that loses least (a fast point that no longer works is no answer): the best point
    found, the budget out of reach."""
    good = [p for p in points if meets(p, asked, max_drop)]
    if good:
        return min(good, key=lambda p: (p.drop, -p.gain)), True
    within = [p for p in points if p.drop <= max_drop]
    if within:
        return max(within, key=lambda p: p.gain), False
    return min(points, key=lambda p: (p.drop, -p.gain)), False


def best_single(points: Sequence[Point], asked: float, max_drop: float) -> dict[str, Point]:
    """For each family, its best single-family point (chosen as the whole search chooses)."""
    out = {}
    for family in sorted({f for p in points for f in p.families}):
        alone = [p for p in points if p.families == (family,) and not p.mixed]
        if alone:
            out[family] = choose(alone, asked, max_drop)[0]
    return out


Verify = Callable[[Sequence[Estimate], int], list[Point]]


def search(space: Space, axis: str, asked: float, max_drop: float, verify: Verify, deadline: float | None = None,
           rounds: int = ROUNDS, top: int = TOP) -> Outcome:
    """Allocate, verify, re-aim: see the module docstring. `verify(estimates, round)` builds, evaluates and
    measures the estimates and returns their points (in the same order).

    Raises:
        ConfigError: the asked gain is out of reach of every combo's estimate by more than TOLERANCE.
    """
    limits = {c.label: reachable(c, space, axis) for c in space.combos}
    if max(limits.values()) < asked * (1 - TOLERANCE):
        what = "speedup" if axis == "ms" else "size reduction"
        raise ConfigError(f"{what} {asked:.3g}x is out of reach on this target: the most any combination of "
                          f"{', '.join(sorted({f for c in space.combos for f in c.families} | ({'asvd'} if space.profile else set())))} "
                          f"is estimated to reach is {max(limits.values()):.2f}x; ask for less")
    aims = {c.label: min(asked, limits[c.label] * (1 - 1e-6)) for c in space.combos}
    measured: dict[str, list[dict[str, float]]] = {c.label: [] for c in space.combos}
    points: list[Point] = []
    seen: set[str] = set()
    verified_rounds = 0
    for r in range(rounds):
        if deadline is not None and time.monotonic() > deadline and points:
            say(f"time budget over after {r} rounds")
            break
        estimates = [e for c in space.combos if (e := estimate(c, space, aims[c.label], axis)) is not None]
        fresh = [e for e in estimates if _signature(e) not in seen]
        good = [p for p in points if meets(p, asked, max_drop)]
        if good:  # only an estimate that promises less loss than the best point that meets the budget is worth it
            promise = min(good, key=lambda p: p.drop).estimated_loss
            fresh = [e for e in fresh if e.loss < promise]
        picked = sorted(fresh, key=lambda e: e.loss)[:top]
        for family in sorted({f for e in fresh for f in e.families}):  # the best single-family candidates
            alone = [e for e in fresh if e.families == (family,) and not e.fp32]
            if alone and not any(p.families == (family,) and not p.mixed and meets(p, asked, max_drop) for p in points):
                picked.append(min(alone, key=lambda e: e.loss))
        if r == 0:  # every single stage alone, measured, for the report's comparison
            picked += [Estimate(c, {s.name: None for s in c.spectra}, c.cost, space.base_cost / c.cost, c.loss, asked)
                       for c in space.combos if len(c.stages) == 1]
            if axis == "bytes":  # and the greedy's first step beside its full mix: the weights' losses do not add
                picked += [e for c in space.combos if c.precision and (e := first_weight_mix(c, space, asked))]
        picked = list({_signature(e): e for e in picked}.values())
        if not picked:
            break
        seen.update(_signature(e) for e in picked)
        new = verify(picked, r)
        verified_rounds = r + 1
        points += new
        for est, point in zip(picked, new):
            if (est.combo.spectra or est.combo.precision) and point.gain > 0:
                measured[est.combo.label].append({"estimated": est.gain, "measured": point.gain})
        for combo in space.combos:
            if measured[combo.label]:
                aims[combo.label] = reaim(measured[combo.label], asked, limits[combo.label])
        if any(meets(p, asked, max_drop) and p.gain <= asked * (1 + TOLERANCE) for p in points):
            break
    points = [p for p in points if p.gain > 0]  # a candidate that failed to build said why on its line
    if not points:
        raise ConfigError("no candidate could be built and measured (each one's error is on its line above)")
    chosen, met = choose(points, asked, max_drop)
    return Outcome(points, chosen, met, asked, verified_rounds, best_single(points, asked, max_drop))


def _signature(e: Estimate) -> str:
    return f"{e.combo.label}|{sorted((k, v) for k, v in e.ranks.items() if v is not None)}|{list(e.fp32)}"


def pareto(points: Sequence[Mapping[str, float]], higher_better: bool = True) -> list[int]:
    """Indices of the points no other point beats on both gain (higher) and metric, sorted by gain."""
    sign = 1.0 if higher_better else -1.0
    order = sorted(range(len(points)), key=lambda i: (-points[i]["gain"], -sign * points[i]["metric"]))
    front, best = [], -math.inf
    for i in order:
        value = sign * points[i]["metric"]
        if value > best:
            front.append(i)
            best = value
    return sorted(front, key=lambda i: points[i]["gain"])
