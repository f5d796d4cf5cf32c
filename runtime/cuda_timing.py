"""Which clock times a call: the wall clock around a synchronized call, or CUDA events on the GPU's stream.

CUDA events (`torch.cuda.Event(enable_timing=True)`) are recorded on the current CUDA stream before
and after the call and read after the end event completes, so the figure is the GPU's own time for
the work queued between them (kernels, and the host<->device copies a session makes), free of the
host's scheduling noise; torch sessions (eager and CUDA graphs) and TensorRT sessions (which enqueue
on torch's current stream) are timed alike. The wall clock is what a CPU session uses.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from edgeslim.core.errors import ConfigError, MissingDependencyError

CLOCKS = ("auto", "wall", "cuda-events")


def resolve_clock(session: Any, clock: str = "auto") -> str:
    """"wall" or "cuda-events" for `session`; "auto" picks CUDA events for a session on a CUDA device.

    Raises:
        ConfigError: an unknown clock, or CUDA events asked for a session that does not run on CUDA.
        MissingDependencyError: CUDA events asked where torch sees no CUDA device.
    """
    if clock not in CLOCKS:
        raise ConfigError(f"clock must be one of {CLOCKS}, got {clock!r}")
    on_cuda = getattr(session, "device", "cpu") == "cuda"
    if clock == "auto":
        return "cuda-events" if on_cuda else "wall"
    if clock == "cuda-events":
        if not on_cuda:
            raise ConfigError(f"CUDA events time work on a CUDA stream; this session runs on "
                              f"'{getattr(session, 'device', 'cpu')}': use clock 'wall' (or 'auto')")
        import torch
        if not torch.cuda.is_available():
            raise MissingDependencyError(f"CUDA events need a CUDA device, but torch.cuda.is_available() is False "
                                         f"(torch {torch.__version__})")
    return clock


def timer(session: Any, clock: str) -> Callable[[Callable[[], Any]], float]:
    """A function that calls `call()` once and returns its duration in seconds on `clock` (resolved)."""
    if clock == "cuda-events":
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def on_events(call: Callable[[], Any]) -> float:
            start.record()
            call()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds

        return on_events
    sync = getattr(session, "synchronize", lambda: None)

    def on_wall(call: Callable[[], Any]) -> float:
        sync()
        t0 = time.perf_counter()
        call()
        sync()
        return time.perf_counter() - t0

    return on_wall
