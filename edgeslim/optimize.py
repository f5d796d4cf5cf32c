"""`edgeslim optimize`: one search across compression families under a budget measured on the target.

The public function `optimize()` ties the pieces together: the original is evaluated first (bad eval
data fails before any work), the search space is built and measured (optimize_space), the search runs
its allocate / verify / re-aim rounds (optimize_search) with candidate jobs run here, in worker processes
or on Ray (optimize_jobs) and timed on the target only, and the outputs are written (optimize_report).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from edgeslim.core.errors import ConfigError
from edgeslim.core.progress import say
from edgeslim.optimize_jobs import Job, Runner, data_hash, read_results, store_result
from edgeslim.optimize_search import Estimate, Point, drop_of, search
from edgeslim.optimize_space import FAMILIES, build_space
from edgeslim.trust import Trust

LATENCY_BATCH = 8  # the batch size a time budget is measured at (other dims: the model's defaults)
CALIB_COUNT = 64  # calibration samples of the default data set
SPACE = "space"  # the result cache's entry of the combos' measured costs and losses (a resumed search reuses them)
PRECISION = "precision"  # its entry of each wq (int8) combo's per-weight bytes (per-op ms) and losses


@dataclass(frozen=True)
class OptimizeRequest:
    """Everything `edgeslim optimize` was asked (the CLI builds it from its options)."""

    source: str
    profile: str
    eval: str  # the data the metric is measured on (NAME[:COUNT] or a file/folder)
    max_drop: float  # largest allowed drop of the metric (perplexity: relative increase)
    speedup: float | None = None
    latency_ms: float | None = None
    size_mb: float | None = None
    calib: str | None = None  # default: the first real data set that fits the model, CALIB_COUNT samples
    families: tuple[str, ...] = FAMILIES
    explicit_families: bool = False  # the user named the families: one that cannot apply is an error
    budget_minutes: float | None = None
    device: str | None = None  # ssh://... board the profile's timings are taken on
    ray: str | None = None
    workers: int = 1
    rounds: int = 4
    top: int = 2
    batch: int = LATENCY_BATCH
    source_options: Mapping[str, Any] = field(default_factory=dict)  # weights, inputs, task
    trust: Trust | None = None

    def validate(self) -> str:
        """The budget's axis ("ms" or "bytes"); ConfigError on a request that cannot be searched."""
        given = [k for k, v in (("--speedup", self.speedup), ("--latency-ms", self.latency_ms),
                                ("--size-mb", self.size_mb)) if v is not None]
        if len(given) != 1:
            raise ConfigError("give exactly one budget: --speedup S, --latency-ms T or --size-mb M"
                              + (f" (got {', '.join(given)})" if given else ""))
        if self.speedup is not None and self.speedup <= 1.0:
            raise ConfigError(f"--speedup must be above 1, got {self.speedup:g}")
        if any(v is not None and v <= 0 for v in (self.latency_ms, self.size_mb)) or self.max_drop < 0:
            raise ConfigError("--latency-ms and --size-mb must be positive and --max-drop at least 0")
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown or not self.families:
            raise ConfigError(f"unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown) or '(none)'}; "
                              f"choose among {', '.join(FAMILIES)}")
        if self.workers < 1 or self.rounds < 1 or self.top < 1 or self.batch < 1:
            raise ConfigError("--workers, --rounds, --top and --batch must be positive integers")
        return "bytes" if self.size_mb is not None else "ms"


def _calib_spec(request: OptimizeRequest, loaded: Any) -> str:
    if request.calib:
        return request.calib
    from edgeslim.data import datasets_for, missing_calibration_message
    real = [d for d in datasets_for(loaded) if d.kind != "synthetic"]
    if not real:
        raise ConfigError(missing_calibration_message("optimize", loaded))
    return f"{real[0].name}:{CALIB_COUNT}"


def _measure(request: OptimizeRequest) -> tuple[Any, str]:
    """The target's Measure (timed here for a local CPU profile, on the board for --device or an address) and its
    fingerprint for the result cache."""
    from edgeslim.latency import BoardMeasure, LocalMeasure
    from edgeslim.runtime.machine import machine_info
    from edgeslim.runtime.peak import is_local
    from edgeslim.runtime.targets import load_profile

    prof = load_profile(request.profile)
    if request.device or prof.address:
        measure = BoardMeasure(request.profile, address=request.device)
        where: Any = measure.profile.address
    elif is_local(prof):
        measure = LocalMeasure(request.profile)
        info = machine_info()
        where = {k: info[k] for k in ("cpu_model", "arch", "simd_flags", "int8_features", "onnxruntime_version")}
    else:
        raise ConfigError(f"profile '{request.profile}' is not this machine's CPU and names no board: optimize times "
                          "every candidate on the target, so give --device ssh://... (or a profile with an address)")
    text = json.dumps([prof.to_dict(), where], sort_keys=True, default=str)
    return measure, hashlib.sha256(text.encode()).hexdigest()[:16]


def work_folder(request: OptimizeRequest, calib: str, axis: str) -> Path:
    """The search's work folder in edgeslim's cache: candidates' artifacts and the result cache (resume)."""
    from edgeslim import cache
    key = json.dumps([request.source, dict(request.source_options), request.profile, request.device,
                      data_hash(request.eval), calib, axis, request.batch], sort_keys=True, default=str)
    folder = cache.root() / "optimize" / hashlib.sha256(key.encode()).hexdigest()[:20]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def optimize(request: OptimizeRequest, out: str | Path) -> dict[str, Any]:
    """Search, verify and write `out` (recipe.toml, best.slim, best.onnx, report.html, optimize.json).

    Returns the summary (also in optimize.json). Raises ConfigError / SourceError / MissingDependencyError
    on bad input (an out-of-reach budget, eval data without labels, a named family that cannot apply, a Ray
    address that does not answer) before the output is touched.
    """
    from edgeslim.core.files import check_not_input, check_output
    from edgeslim.data import load_calibration
    from edgeslim.optimize_report import OPTIMIZE, write_outputs
    from edgeslim.pipeline import compress_context
    from edgeslim.sources import load_model

    axis = request.validate()
    check_not_input(out, request.source)
    check_output(out, OPTIMIZE)
    start = time.monotonic()
    deadline = start + 60 * request.budget_minutes if request.budget_minutes else None
    with Runner(request.workers, request.ray) as runner:  # a Ray address that does not answer: before any work
        loaded = load_model(request.source, trust=request.trust, **dict(request.source_options))
        calib_spec = _calib_spec(request, loaded)
        measure, fingerprint = _measure(request)
        folder = work_folder(request, calib_spec, axis)

        def job(steps: Sequence[Mapping[str, Any]]) -> Job:
            return Job(request.source, tuple(steps), request.profile, request.eval, str(folder), fingerprint,
                       dict(request.source_options), request.trust, export=axis == "ms")

        answers: dict[str, dict[str, Any]] = {}
        runner.map([job(())], lambda j, r: answers.__setitem__(j.key, r))
        base = answers[job(()).key]
        if "error" in base:
            raise ConfigError(f"the original model on --eval {request.eval}: {base['error']}")
        say(f"original: {base['metric_name']} {base['metric']:.4f} on {request.eval}")
        calib = load_calibration(calib_spec, loaded)
        context = compress_context(loaded, request.profile, latency_batch=request.batch)
        cached = read_results(folder)
        space = build_space(loaded, calib, calib_spec, measure, request.profile, measure.profile.runtime,
                            request.families, axis,
                            context, request.explicit_families, cached.get(SPACE), cached.get(PRECISION))
        store_result(folder, SPACE, {c.label: [c.cost, c.loss] for c in space.combos})
        store_result(folder, PRECISION, {c.label: [dataclasses.astuple(p) for p in c.precision]
                                         for c in space.combos if c.precision})
        for family, why in space.skipped.items():
            say(f"family {family} left out: {why}")
        asked = (request.speedup or (space.base_cost / request.latency_ms if request.latency_ms else
                                     space.base_cost / (request.size_mb * 1e6)))

        def verify(estimates: Sequence[Estimate], round_: int) -> list[Point]:
            jobs = [job(e.combo.steps(e.ranks, calib_spec, space.align, e.fp32)) for e in estimates]
            for j in jobs:
                answers.pop(j.key, None)
            runner.map(jobs, lambda j, r: answers.__setitem__(j.key, r))
            results = [answers[j.key] for j in jobs]
            todo = [r for r in results if "error" not in r and "gain" not in r]
            if axis == "ms" and todo:  # timed on the target only, side by side with the original
                times = measure.files_ms([Path(base["onnx"])] + [Path(r["onnx"]) for r in todo], loaded.inputs,
                                         context.dims)
                for r, ms in zip(todo, times[1:]):
                    r.update(gain=times[0] / ms, latency_ms=ms, base_latency_ms=times[0])
            for r in todo:
                if axis == "bytes":
                    r.update(gain=space.base_cost / r["weight_bytes"])
                store_result(folder, r["key"], r)
            points = []
            for e, j, r in zip(estimates, jobs, results):
                if "error" in r:
                    say(f"[round {round_ + 1}] {e.label}: failed: {r['error']}")
                    points.append(Point(e.label, e.families, list(j.steps), e.gain, e.loss, 0.0, float("nan"),
                                        float("inf"), r, e.combo.label, round_, bool(e.fp32)))
                    continue
                drop = drop_of(r["metric"], base["metric"], r["metric_name"])
                points.append(Point(e.label, e.families, list(j.steps), e.gain, e.loss, r["gain"], r["metric"], drop,
                                    r, e.combo.label, round_, bool(e.fp32)))
                say(f"[round {round_ + 1}] {e.label}: measured {r['gain']:.2f}x (estimated {e.gain:.2f}x), "
                    f"{r['metric_name']} {r['metric']:.4f} (drop {drop:+.4f}){' (cached)' if r.get('cached') else ''}")
            return points

        outcome = search(space, axis, asked, request.max_drop, verify, deadline, request.rounds, request.top)
    summary = {"source": request.source, "profile": request.profile, "device": request.device, "axis": axis,
               "asked": asked, "max_drop": request.max_drop, "eval": request.eval, "calib": calib_spec,
               "metric": base["metric_name"], "base_metric": base["metric"], "base_cost": space.base_cost,
               "met": outcome.met, "rounds": outcome.rounds, "seconds": time.monotonic() - start,
               "skipped": space.skipped, "work_folder": str(folder),
               "families": sorted({f for c in space.combos for f in c.families} | ({"asvd"} if space.profile else set()))}
    if not outcome.met:
        say(f"the budget is out of reach: the best point found is {outcome.chosen.label}, "
            f"{outcome.chosen.gain:.2f}x, {base['metric_name']} {outcome.chosen.metric:.4f}")
    return write_outputs(out, summary, outcome, request)
