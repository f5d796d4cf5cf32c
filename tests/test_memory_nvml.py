"""Device memory of this process through NVML ("cuda-process"), and its cudaMemGetInfo fallback.

No GPU here: a fake `pynvml` module goes into sys.modules and torch.cuda's device queries are
replaced, so the NVML logic (process filtering, method text, fallbacks) runs for real on fake data.
"""
from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest
import torch

from edgeslim.runtime.measure import measure
from edgeslim.runtime.memory import MemoryProbe

pytestmark = pytest.mark.filterwarnings("ignore:unstable timing:RuntimeWarning")
MB = 1 << 20
TOTAL, FREE = 80_000 * MB, 30_000 * MB  # cudaMemGetInfo of the fake device: 50,000 MB in use


class FakeNVMLError(Exception):
    pass


def fake_pynvml(processes: list, init_error: Exception | None = None) -> types.ModuleType:
    """A pynvml with one device (UUID GPU-fake-uuid) whose process list is `processes` (read live)."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = FakeNVMLError
    nvml.calls = []

    def init():
        if init_error is not None:
            raise init_error

    def by_uuid(uuid):
        nvml.calls.append(("uuid", uuid))
        if uuid != "GPU-fake-uuid":
            raise FakeNVMLError("Not Found")
        return "handle0"

    def by_index(index):
        nvml.calls.append(("index", index))
        return "handle0"

    def running(handle):
        assert handle == "handle0"
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in processes]

    nvml.nvmlInit, nvml.nvmlDeviceGetHandleByUUID, nvml.nvmlDeviceGetHandleByIndex = init, by_uuid, by_index
    nvml.nvmlDeviceGetComputeRunningProcesses = running
    return nvml


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's device queries on a fake device 0 (UUID fake-uuid)."""
    props = types.SimpleNamespace(uuid="fake-uuid", name="Fake GPU")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (FREE, TOTAL))
    return props


def test_reads_only_this_process_through_nvml(monkeypatch, fake_cuda):
    procs = [(os.getpid() + 1, 9_000 * MB), (os.getpid(), 300 * MB)]
    nvml = fake_pynvml(procs)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    probe = MemoryProbe("cuda-process")
    assert probe.current() == 300 * MB  # not the other process' 9 GB, not the device's 50 GB
    assert "NVML" in probe.method and f"pid {os.getpid()}" in probe.method and "cudaMemGetInfo" not in probe.method
    assert nvml.calls[0] == ("uuid", "GPU-fake-uuid")  # the device torch runs on, found by its UUID


def test_peak_is_sampled_after_each_call(monkeypatch, fake_cuda):
    procs = [(os.getpid(), 100 * MB)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(procs))
    probe = MemoryProbe("cuda-process")
    probe.reset_peak()
    for used in (500, 200):
        procs[0] = (os.getpid(), used * MB)
        probe.sample()
    assert probe.peak() == 500 * MB and probe.current() == 200 * MB
    probe.reset_peak()
    assert probe.peak() == 200 * MB


def test_without_a_uuid_the_current_index_is_used(monkeypatch, fake_cuda):
    del fake_cuda.uuid
    nvml = fake_pynvml([(os.getpid(), 7 * MB)])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert MemoryProbe("cuda-process").current() == 7 * MB and nvml.calls == [("index", 0)]


@pytest.mark.parametrize("case, reason", [
    ("init", "NVML failed: FakeNVMLError: Driver Not Loaded"),
    ("absent", "pynvml is not installed (pip install nvidia-ml-py)"),
    ("unlisted", f"NVML does not list this process (pid {os.getpid()})"),
    ("hidden", f"NVML does not list this process (pid {os.getpid()})"),
])
def test_falls_back_to_cudamemgetinfo_and_says_why(monkeypatch, fake_cuda, case, reason):
    procs = {"unlisted": [(os.getpid() + 1, 9 * MB)], "hidden": [(os.getpid(), None)]}.get(case, [])
    nvml = None if case == "absent" else fake_pynvml(procs, FakeNVMLError("Driver Not Loaded") if case == "init" else None)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)  # None: `import pynvml` raises ImportError
    probe = MemoryProbe("cuda-process")
    assert probe.current() == TOTAL - FREE  # the whole device, as "cuda-device" reads it
    assert "cudaMemGetInfo, whole device" in probe.method and f"NVML unavailable: {reason}" in probe.method
    assert "NVML" not in MemoryProbe("cuda-device").method  # the plain kind never tries NVML


def test_measure_reports_nvml_growth_of_a_session(monkeypatch, fake_cuda):
    """measure() with a session whose memory_kind is "cuda-process": peak minus the pre-run baseline."""
    procs = [(os.getpid(), 1_000 * MB), (os.getpid() + 1, 5_000 * MB)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(procs))

    class GrowingSession:
        memory_kind, device, baseline_mem_bytes = "cuda-process", "cpu", None  # wall clock: no CUDA here
        calls = 0

        def run(self, feeds):
            self.calls += 1
            procs[0] = (os.getpid(), (1_000 + 64 * min(self.calls, 3)) * MB)  # workspace grows, then stays
            return {"y": feeds["x"]}

    timing = measure(GrowingSession(), {"x": np.zeros((2, 3), np.float32)}, warmup=1, iters=4)
    assert timing.peak_mem_bytes == 3 * 64 * MB and "NVML" in timing.mem_method


def test_report_names_how_memory_was_read_and_the_arena_settings():
    from edgeslim.report import memory_method_text

    child = {"memory": {"method": "VmHWM of a fresh child process (its whole life)",
                        "runtime": {"provider": "CPUExecutionProvider", "cpu_mem_arena": True, "mem_pattern": False}}}
    nvml = {"mem_method": "device memory of this process (NVML compute processes, pid 7), sampled after each call"}
    text = memory_method_text([child, child, nvml])
    assert text.count("VmHWM") == 1 and "cpu_mem_arena True, mem_pattern False" in text
    assert "NVML compute processes, pid 7), sampled after each call (growth while running in this process)" in text
    assert memory_method_text([{"crashed": "SIGKILL"}]) == "-"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_process_probe_sees_a_real_allocation():
    torch.cuda.init()
    torch.zeros(1, device="cuda")  # the CUDA context, before the baseline
    probe = MemoryProbe("cuda-process")
    before = probe.current()
    probe.reset_peak()
    block = torch.empty(256 * MB, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    probe.sample()
    assert probe.peak() - before >= 256 * MB, probe.method
    del block
