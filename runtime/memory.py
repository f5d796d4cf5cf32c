"""Memory probes for the profiler: process RSS on the CPU, allocator or device counters on CUDA.

Three kinds, each with a current reading, a resettable peak and a one-line `method` that the
report prints beside the number:
- "rss": the process resident set. Peak = VmHWM from /proc/self/status, reset by writing 5 to
  /proc/self/clear_refs (Linux). Where that write is refused or /proc is absent, the peak is
  getrusage's ru_maxrss, which cannot be reset: it is the process' lifetime peak, an upper bound.
- "torch-cuda": torch.cuda.memory_allocated / max_memory_allocated after reset_peak_memory_stats
  (tensors of a torch session on the GPU).
- "cuda-device": used device memory (total - free from cudaMemGetInfo), sampled after each call;
  it also sees allocations torch does not make (TensorRT's scratch memory, ORT's CUDA arena), and
  those of every other process on the device.
- "cuda-process": device memory of THIS process through NVML (`pynvml`, package nvidia-ml-py:
  nvmlDeviceGetComputeRunningProcesses on the current CUDA device, the entry whose pid is ours),
  sampled after each call like "cuda-device" but blind to other processes. Where pynvml is missing,
  NVML does not start, or it does not list this process (a container's own PID namespace), the
  probe reads "cuda-device" instead and its `method` says why.
"""
from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

KINDS = ("rss", "torch-cuda", "cuda-device", "cuda-process")
SAMPLED = ("cuda-device", "cuda-process")  # kinds whose peak is the largest reading after a call
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


class _NvmlUnavailable(Exception):
    """Why NVML cannot read this process' device memory (the probe falls back to cudaMemGetInfo)."""


class _NvmlReader:
    """This process' used memory on the current CUDA device, from NVML's list of compute processes."""

    def __init__(self, cuda) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise _NvmlUnavailable("pynvml is not installed (pip install nvidia-ml-py)") from exc
        self._nvml, self.pid = pynvml, os.getpid()
        try:
            pynvml.nvmlInit()
            uuid = getattr(cuda.get_device_properties(cuda.current_device()), "uuid", None)
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}") if uuid is not None else \
                pynvml.nvmlDeviceGetHandleByIndex(cuda.current_device())
            used = self.used()
        except Exception as exc:  # pynvml.NVMLError and its many subclasses, driver errors
            raise _NvmlUnavailable(f"NVML failed: {type(exc).__name__}: {exc}") from exc
        if used is None:  # checked once a session is open, so its CUDA context exists
            raise _NvmlUnavailable(f"NVML does not list this process (pid {self.pid}) with its memory on the "
                                   "device: another PID namespace (a container?), no CUDA context, or a hidden figure")

    def used(self) -> int | None:
        """Bytes this process uses on the device; None when NVML does not list it or hides the figure."""
        mine = [p.usedGpuMemory for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
                if p.pid == self.pid]
        if not mine or any(m is None for m in mine):
            return None
        return int(sum(mine))


class MemoryProbe:
    """Current and peak memory of one kind (see the module docstring)."""

    def __init__(self, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"memory kind {kind!r} not in {KINDS}")
        self.kind = kind
        self._sampled_peak = 0
        self._resettable = True
        self._nvml: _NvmlReader | None = None
        self._nvml_missing = ""  # why "cuda-process" reads cudaMemGetInfo instead
        if kind != "rss":
            import torch

            self._cuda = torch.cuda
        if kind == "cuda-process":
            try:
                self._nvml = _NvmlReader(self._cuda)
            except _NvmlUnavailable as exc:
                self._nvml_missing = str(exc)

    @property
    def method(self) -> str:
        """How the peak is read, for the report."""
        if self.kind == "rss":
            return "process RSS peak (VmHWM, reset per run)" if self._resettable else \
                "process RSS peak (ru_maxrss, lifetime of the process: an upper bound)"
        if self.kind == "torch-cuda":
            return "torch.cuda.max_memory_allocated"
        if self._nvml is not None:
            return f"device memory of this process (NVML compute processes, pid {self._nvml.pid}), sampled after each call"
        device = "CUDA device memory in use (cudaMemGetInfo, whole device), sampled after each call"
        return device if self.kind == "cuda-device" else f"{device}; NVML unavailable: {self._nvml_missing}"

    def current(self) -> int:
        """Memory in use now, in bytes."""
        if self.kind == "rss":
            kib = _status_kib("VmRSS")
            return kib * 1024 if kib is not None else _maxrss_bytes()
        if self.kind == "torch-cuda":
            return int(self._cuda.memory_allocated())
        if self._nvml is not None:
            return self._nvml.used() or 0  # no longer listed: the process holds nothing on the device
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
        """Record a reading (only the SAMPLED kinds need it: the others keep their own peak)."""
        if self.kind in SAMPLED:
            self._sampled_peak = max(self._sampled_peak, self.current())

    def peak(self) -> int:
        """Peak usage in bytes since the last reset_peak."""
        if self.kind == "rss":
            kib = _status_kib("VmHWM") if self._resettable else None
            return kib * 1024 if kib is not None else _maxrss_bytes()
        if self.kind == "torch-cuda":
            return int(self._cuda.max_memory_allocated())
        return self._sampled_peak
