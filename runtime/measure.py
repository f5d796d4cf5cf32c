"""Honest timing: warm-up, per-call wall clock, percentiles, spread, throughput and peak memory.

Latency is `time.perf_counter` around each `session.run` call, with the device synchronized before
and after the call, so queued GPU work is counted, or, for a CUDA session, CUDA events around it
(runtime/cuda_timing.py; `Timing.clock` says which); warm-up calls are never timed. Feeds are
prepared once, outside the timed window; output copies back to numpy are inside it (a deployed
model pays them too).

Peak memory (`peak_mem_bytes`) is the growth of memory in use while the model runs, over what was
in use just before the session's first call (`session.baseline_mem_bytes`, weights already
loaded): activations, workspaces and arenas the runtime allocates to run, NOT the weights, which
the report gives separately as the file size. Measured in-process, it is approximate when several
sessions share the process (freed memory one keeps may be reused by another); for exact figures
profile one model per process. How it is read depends on the session (runtime/memory.py): CPU sessions report the
process' peak RSS (VmHWM, reset before each measurement), torch CUDA sessions
torch.cuda.max_memory_allocated, TensorRT and ORT-on-CUDA the device memory of this process
(NVML where present, else the whole device's from cudaMemGetInfo). `mem_method` names the reading. In a sweep of growing batches a runtime that keeps its arena between calls reports
each batch's peak correctly; a smaller batch measured after a larger one may report the larger
arena.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from edgeslim.core.errors import ConfigError
from edgeslim.core.progress import bar
from edgeslim.runtime.cuda_timing import resolve_clock, timer
# Above UNSTABLE_CV the run-to-run spread (here usually other processes sharing the cores) is as large as
# the 1.2-2x speedups compression is judged by, so ratios taken from such runs are unreliable: the Timing
# is flagged `unstable` and a warning says so. A board's runner computes the same statistics.
from edgeslim.runtime.device_runner import INTERLEAVED_MEM, UNSTABLE_CV, round_shares, summarize
from edgeslim.runtime.memory import MemoryProbe

Feeds = dict[str, np.ndarray]



@dataclass(frozen=True)
class Timing:
    """The result of timing one session at one batch size."""

    batch: int  # leading dimension of the first input
    p50_ms: float  # median latency per call
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float  # sample standard deviation (ddof=1; 0 for a single call)
    cv: float  # std_ms / mean_ms
    throughput_per_s: float  # samples per second = batch / mean seconds
    peak_mem_bytes: int | None  # memory growth while running, over the session before its first call (None:
    # not measured, as in `interleave`, where sessions share one process: runtime/child.py measures it alone)
    mem_method: str  # how peak_mem_bytes was read
    iters: int  # timed calls
    warmup: int  # untimed calls before them
    unstable: bool  # cv > UNSTABLE_CV
    clock: str = "wall"  # "wall" (perf_counter around a synchronized call) or "cuda-events"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batch_of(feeds: Feeds) -> int:
    if not feeds:
        raise ConfigError("feeds are empty: give one array per model input")
    first = next(iter(feeds.values()))
    return int(first.shape[0]) if first.ndim else 1


def _timed_calls(session, feeds: Feeds, iters: int, probe: MemoryProbe, advance: Callable[[], None],
                 clock: str = "wall") -> np.ndarray:
    timed = timer(session, clock)
    times = np.empty(iters)
    for i in range(iters):
        times[i] = timed(lambda: session.run(feeds))
        probe.sample()
        advance()
    return times


def _summarize(batch: int, times_s: np.ndarray, peak: int | None, method: str, warmup: int,
               clock: str = "wall") -> Timing:
    """The statistics a board's runner computes too (runtime/device_runner.summarize), as a Timing."""
    return Timing(**summarize(times_s, batch, warmup, peak, method, clock))


def _check_counts(warmup: int, iters: int) -> None:
    if iters < 1 or warmup < 0:
        raise ConfigError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")


def _warn_unstable(timing: Timing, what: str = "") -> None:
    if timing.unstable:
        warnings.warn(f"unstable timing{what} at batch {timing.batch}: cv {timing.cv:.2f} > {UNSTABLE_CV} (p50 "
                      f"{timing.p50_ms:.2f} ms, p99 {timing.p99_ms:.2f} ms); other work may share the device: compare "
                      "ratios with care or rerun with more iterations", RuntimeWarning, stacklevel=4)


def _measure(session, feeds: Feeds, warmup: int, iters: int, advance: Callable[[], None], clock: str = "auto") -> Timing:
    _check_counts(warmup, iters)
    clock = resolve_clock(session, clock)
    batch = _batch_of(feeds)
    probe = MemoryProbe(getattr(session, "memory_kind", "rss"))
    before = probe.current()
    probe.reset_peak()
    for _ in range(warmup):
        session.run(feeds)
        probe.sample()
        advance()
    times = _timed_calls(session, feeds, iters, probe, advance, clock)
    baseline = getattr(session, "baseline_mem_bytes", None)  # set by the session's first call
    baseline = before if baseline is None else baseline
    timing = _summarize(batch, times, max(0, probe.peak() - baseline), probe.method, warmup, clock)
    _warn_unstable(timing)
    return timing


def measure(session, feeds: Feeds, warmup: int = 5, iters: int = 30, progress: bool = False,
            clock: str = "auto") -> Timing:
    """Time `session.run(feeds)`: `warmup` untimed calls, then `iters` timed ones.

    Args:
        session: an open Session (anything with `run(feeds)`; `synchronize`, `memory_kind` and
            `baseline_mem_bytes` are used when present).
        feeds: one array per input; the batch size is the first input's leading dimension.
        warmup: untimed calls first (lazy allocation, kernel selection, caches).
        iters: timed calls.
        progress: show progress on stderr (edgeslim.core.progress).
        clock: "auto" (CUDA events for a session on CUDA, else the wall clock), "wall" or "cuda-events".

    Returns:
        Timing with p50/p90/p99, mean, std, cv, throughput and peak memory growth.

    Raises:
        ConfigError: iters < 1, warmup < 0, empty feeds, or CUDA events for a session not on CUDA.
        MissingDependencyError: CUDA events where torch sees no CUDA device.
    """
    with bar(f"timing batch {_batch_of(feeds)}", warmup + iters, progress) as shown:
        return _measure(session, feeds, warmup, iters, shown.advance, clock)


def sweep(session, make_feeds: Callable[[int], Feeds], batches: Sequence[int], warmup: int = 5, iters: int = 30,
          progress: bool = True) -> list[Timing]:
    """Latency against batch size: `measure` at each batch (ascending), one progress bar for all.

    Args:
        session: an open Session.
        make_feeds: batch size -> feeds (e.g. `lambda b: example_feeds(specs, {"batch": b, ...})`).
        batches: batch sizes; measured in ascending order (see the module docstring on memory).
        warmup, iters: per batch, as in `measure`.
        progress: show progress on stderr (edgeslim.core.progress).
    """
    order = sorted(set(int(b) for b in batches))
    if not order or order[0] < 1:
        raise ConfigError(f"batches must be positive integers, got {list(batches)}")
    with bar("profiling", len(order) * (warmup + iters), progress) as shown:
        results = []
        for b in order:
            shown.describe(f"profiling batch {b}")
            results.append(_measure(session, make_feeds(b), warmup, iters, shown.advance))
    return results


def interleave(sessions: Sequence[Any], feeds: Sequence[Feeds], warmup: int = 5, iters: int = 30, rounds: int = 5,
               progress: bool = False, clock: str = "auto") -> list[Timing]:
    """Time several sessions side by side, round by round, so drift (other jobs, clock changes) hits all alike.

    Each session gets `warmup` untimed calls first; then each of `rounds` rounds runs every session in
    turn for its share of the `iters` timed calls (the first rounds get one more when `iters` does not
    divide). Ratios between the returned timings are what to read.

    Args:
        sessions: open Sessions (e.g. an original and its compressed candidates).
        feeds: one feeds dict per session (the same shapes for a fair comparison).
        rounds: how many times the order cycles through the sessions (clamped to `iters`).
        clock: as in `measure`, resolved per session.

    Returns:
        one Timing per session, in order; peak memory is not measured here (None).

    Raises:
        ConfigError: iters < 1, warmup < 0, rounds < 1, or a feeds list of another length.
    """
    _check_counts(warmup, iters)
    if rounds < 1 or len(feeds) != len(sessions) or not sessions:
        raise ConfigError(f"interleave needs rounds >= 1 and one feeds dict per session, got rounds={rounds}, "
                          f"{len(sessions)} session(s) and {len(feeds)} feeds")
    clocks = [resolve_clock(s, clock) for s in sessions]
    rounds = min(rounds, iters)
    shares = round_shares(iters, rounds)
    times: list[list[np.ndarray]] = [[] for _ in sessions]
    with bar(f"{len(sessions)} candidates, {rounds} rounds", len(sessions) * (warmup + iters), progress) as shown:
        for session, f in zip(sessions, feeds):
            for _ in range(warmup):
                session.run(f)
                shown.advance()
        for share in shares:
            for i, (session, f) in enumerate(zip(sessions, feeds)):
                times[i].append(_timed_calls(session, f, share, MemoryProbe("rss"), shown.advance, clocks[i]))
    out = [_summarize(_batch_of(f), np.concatenate(t), None, INTERLEAVED_MEM, warmup, c)
           for f, t, c in zip(feeds, times, clocks)]
    for timing in out:
        _warn_unstable(timing, " (interleaved)")
    return out
