"""Memory probes for the profiler: process RSS on the CPU, allocator or device counters on CUDA.

Three kinds, each with a current reading, a resettable peak and a one-line `method` that the
report prints beside the number:
- "rss": the process resident set. Peak = VmHWM from /proc/self/status, reset by writing 5 to
  /proc/self/clear_refs (Linux). Where that write is refused or /proc is absent, the peak is
  getrusage's ru_maxrss, which cannot be reset: it is the process' lifetime peak, an upper bound.
- "torch-cuda": torch.cuda.memory_allocated / max_memory_allocated after reset_peak_memory_stats
  (tensors of a torch session on the GPU).
- "cuda-device": used device memory (total - free from cudaMemGetInfo), sampled after each call;
  it also sees allocations torch does not make (TensorRT's scratch memory, ORT's CUDA arena).
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

KINDS = ("rss", "torch-cuda", "cuda-device")
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_bytes() -> int:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024  # bytes on macOS, KiB on Linux


class MemoryProbe:
    """Current and peak memory of one kind (see the module docstring)."""

    def __init__(self, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"memory kind {kind!r} not in {KINDS}")
        self.kind = kind
        self._sampled_peak = 0
        self._resettable = True
        if kind != "rss":
            import torch

            self._cuda = torch.cuda

    @property
    def method(self) -> str:
        """How the peak is read, for the report."""
        if self.kind == "rss":
            return "process RSS peak (VmHWM, reset per run)" if self._resettable else \
                "process RSS peak (ru_maxrss, lifetime of the process: an upper bound)"
        if self.kind == "torch-cuda":
            return "torch.cuda.max_memory_allocated"
        return "CUDA device memory in use (cudaMemGetInfo), sampled after each call"

    def current(self) -> int:
        """Memory in use now, in bytes."""
        if self.kind == "rss":
            kib = _status_kib("VmRSS")
            return kib * 1024 if kib is not None else _maxrss_bytes()
        if self.kind == "torch-cuda":
            return int(self._cuda.memory_allocated())
        free, total = self._cuda.mem_get_info()
        return int(total - free)

    def reset_peak(self) -> None:
        """Start a new peak window at the current usage."""
        if self.kind == "rss":
            try:
                _CLEAR_REFS.write_text("5")
            except OSError:
                self._resettable = False
        elif self.kind == "torch-cuda":
            self._cuda.reset_peak_memory_stats()
        else:
            self._sampled_peak = self.current()

    def sample(self) -> None:
        """Record a reading (only "cuda-device" needs it: the other kinds keep their own peak)."""
        if self.kind == "cuda-device":
            self._sampled_peak = max(self._sampled_peak, self.current())

    def peak(self) -> int:
        """Peak usage in bytes since the last reset_peak."""
        if self.kind == "rss":
            kib = _status_kib("VmHWM") if self._resettable else None
            return kib * 1024 if kib is not None else _maxrss_bytes()
        if self.kind == "torch-cuda":
            return int(self._cuda.max_memory_allocated())
        return self._sampled_peak
