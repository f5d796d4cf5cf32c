"""Measured limits: cached per machine and reused, published figures for remote boards (no timing asserts)."""
from __future__ import annotations

import json

import pytest

from edgeslim.runtime import peak
from edgeslim.runtime.targets import load_profile


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """An empty cache on a machine that is quiet (two CPUs, no load), whatever this one is doing."""
    monkeypatch.setenv("EDGESLIM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(peak.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(peak, "load_now", lambda: 0.2)
    monkeypatch.setattr(peak, "_UNDER_LOAD", {})
    monkeypatch.setattr(peak, "_GEMM_UNDER_LOAD", {})
    return tmp_path / "peak.json"


def test_peak_is_measured_once_and_reused(cache, monkeypatch):
    calls = []
    real = peak._measure_peak

    def counting(threads):
        calls.append(threads)
        monkeypatch.setattr(peak, "_GEMM_SIZES", (64,))
        monkeypatch.setattr(peak, "_COPY_BYTES", 1 << 20)
        return real(threads)

    monkeypatch.setattr(peak, "_measure_peak", counting)
    monkeypatch.setattr(peak, "copy_bandwidth_gbps", lambda: 12.5)
    prof = load_profile("cpu-ort-fp32").override({"threads": 1})
    first = peak.measured_peak(prof)
    second = peak.measured_peak(prof)
    assert calls == [1]
    assert first == second and first.source.startswith("measured on ") and first.mem_gbps == 12.5
    assert first.fp32_gflops > 0 and first.fp32_gflops != prof.peak_gflops
    stored = json.loads(cache.read_text())["peak"]
    assert list(stored) == [peak.machine_key(1)] and "load_avg" in stored[peak.machine_key(1)]
    peak.measured_peak(prof, refresh=True)
    assert calls == [1, 1]


def test_remote_board_uses_published_figures(cache, monkeypatch):
    monkeypatch.setattr(peak, "_measure_peak", lambda threads: pytest.fail("a board is never measured here"))
    for name in ("cuda-trt-fp16", "jetson-orin-nano"):
        prof = load_profile(name)
        got = peak.measured_peak(prof)
        assert (got.fp32_gflops, got.mem_gbps) == (prof.peak_gflops, prof.mem_gbps)
        assert got.source == f"published (profile {name})"
    assert not cache.exists()


def test_gemm_table_times_each_shape_once(cache, monkeypatch):
    timed = []
    monkeypatch.setattr(peak, "time_gemm_ms", lambda m, k, n, threads, repeats: timed.append((m, k, n)) or 1.5)
    table = peak.GemmTable(threads=1)
    assert table.gemm_ms(8, 16, 32) == 1.5 and table.gemm_ms(8, 16, 32) == 1.5
    assert peak.GemmTable(threads=1).gemm_ms(8, 16, 32) == 1.5  # a new table reads the same cache
    assert timed == [(8, 16, 32)]


def test_a_gemm_table_reads_the_cache_file_once_per_shape(cache, monkeypatch):
    monkeypatch.setattr(peak, "time_gemm_ms", lambda m, k, n, threads, repeats: 1.5)
    reads, read = [], peak._read_cache
    monkeypatch.setattr(peak, "_read_cache", lambda: reads.append(1) or read())
    table = peak.GemmTable(threads=1)
    assert [table.gemm_ms(8, 16, 32) for _ in range(5)] == [1.5] * 5 and len(reads) == 1
    assert table.gemm_ms(8, 16, 64) == 1.5 and len(reads) == 2


def test_real_gemm_and_copy_measure_something():
    assert peak.time_gemm_ms(16, 16, 16, threads=1, repeats=1) > 0
    assert peak.copy_bandwidth_gbps(1 << 20, repeats=1) > 0


def test_local_cpu_align_follows_simd_width(monkeypatch):
    from edgeslim.runtime import machine

    for lanes in (8, 16):
        monkeypatch.setattr(machine, "simd_width_fp32", lambda lanes=lanes: lanes)
        assert peak.machine_align(load_profile("cpu-ort-fp32")) == lanes
        assert peak.machine_align(load_profile("rpi5-ort-fp32")) == 4  # a board keeps its own
        assert peak.machine_align(load_profile("cuda-trt-fp16")) == 16


def test_board_profiles_carry_published_limits_and_ram():
    for name in ("jetson-orin-nano", "jetson-agx-orin", "rpi5-ort-fp32", "minipc-n100-ort-fp32"):
        prof = load_profile(name)
        assert prof.remote and prof.ram_gb > 0 and not peak.is_local(prof)


def test_a_peak_measured_under_contention_is_measured_again_and_never_lowered(cache, monkeypatch):
    prof = load_profile("cpu-ort-fp32")
    low = {"fp32_gflops": 18.7, "int8_gops": None, "mem_gbps": 9.5, "load_avg": [29.8, 29.5, 28.7]}
    peak._write_cache({"peak": {peak.machine_key(prof.threads): low}})
    monkeypatch.setattr(peak, "_measure_peak", lambda threads: {"fp32_gflops": 140.0, "int8_gops": None,
                                                                 "mem_gbps": 8.0, "load_avg": [1.0, 1.0, 1.0]})
    again = peak.measured_peak(prof)
    assert again.fp32_gflops == 140.0 and again.mem_gbps == 9.5  # re-measured; the higher copy rate kept
    monkeypatch.setattr(peak, "_measure_peak", lambda threads: pytest.fail("an uncontended figure is reused"))
    assert peak.measured_peak(prof).fp32_gflops == 140.0


def test_a_peak_taken_under_load_serves_this_process_and_is_never_kept(cache, monkeypatch):
    prof = load_profile("cpu-ort-fp32")
    monkeypatch.setattr(peak, "load_now", lambda: 3.9)  # two CPUs, a 1-minute load of 3.9
    calls = []
    monkeypatch.setattr(peak, "_measure_peak", lambda threads: calls.append(threads) or {
        "fp32_gflops": 20.0, "int8_gops": None, "mem_gbps": 4.0, "load_avg": [3.9], "measured_at": "now"})
    first = peak.measured_peak(prof)
    assert first.kept is False and first.load_avg == 3.9 and "under load 3.90 (not kept)" in first.source
    assert peak.measured_peak(prof).fp32_gflops == 20.0 and calls == [prof.threads]  # reused, not re-measured
    assert not cache.exists()
    monkeypatch.setattr(peak, "load_now", lambda: 0.3)
    monkeypatch.setattr(peak, "_UNDER_LOAD", {})  # the next command, on a quiet machine
    monkeypatch.setattr(peak, "_measure_peak", lambda threads: {"fp32_gflops": 150.0, "int8_gops": None,
                                                                 "mem_gbps": 9.0, "load_avg": [0.3], "measured_at": "t"})
    quiet = peak.measured_peak(prof)
    assert quiet.kept and quiet.fp32_gflops == 150.0 and json.loads(cache.read_text())["peak"]


def test_gemm_times_taken_under_load_are_used_but_not_written(cache, monkeypatch):
    monkeypatch.setattr(peak, "time_gemm_ms", lambda m, k, n, threads, repeats: 7.0)
    monkeypatch.setattr(peak, "load_now", lambda: 2.5)
    assert peak.GemmTable(threads=1).gemm_ms(64, 64, 64) == 7.0 and not cache.exists()
    monkeypatch.setattr(peak, "_GEMM_UNDER_LOAD", {})  # the next command, on a quiet machine
    monkeypatch.setattr(peak, "load_now", lambda: 0.1)
    assert peak.GemmTable(threads=1).gemm_ms(64, 64, 64) == 7.0
    assert json.loads(cache.read_text())["gemm"][peak.machine_key(1)] == {"64x64x64": 7.0}


def test_a_gemm_table_that_contradicts_itself_is_measured_again():
    measured = {"1024x1536x160": 12.6, "1024x1536x192": 2.8, "1024x1536x128": 2.5, "8x64x64": 0.01}
    assert peak.inconsistent(measured) == ["1024x1536x160"]  # less work, 4.5x the time (issue 38's table)
    assert peak.inconsistent({"8x8x8": 0.011, "8x8x16": 0.01, "64x64x64": 0.2}) == []  # within the noise


def test_the_contradicted_shape_is_timed_again_and_the_smaller_time_kept(cache, monkeypatch):
    key = peak.machine_key(1)
    peak._write_cache({"gemm": {key: {"1024x1536x160": 12.6, "1024x1536x192": 2.8}}})
    timed = []
    monkeypatch.setattr(peak, "time_gemm_ms", lambda m, k, n, threads, repeats: timed.append((m, k, n)) or 2.4)
    assert peak.GemmTable(threads=1).gemm_ms(1024, 1536, 160) == 2.4 and timed == [(1024, 1536, 160)]
    assert json.loads(cache.read_text())["gemm"][key] == {"1024x1536x160": 2.4, "1024x1536x192": 2.8}


def test_cpus_sold_under_one_name_never_share_figures(monkeypatch):
    from edgeslim.runtime import machine

    keys = set()
    for flags in ({"avx2", "fma"}, {"avx2", "fma", "avx512f", "avx512_vnni"}):
        monkeypatch.setattr(machine, "_cpuinfo", lambda flags=flags: ("AMD EPYC", flags))
        keys.add(peak.machine_key(2))
    assert len(keys) == 2 and all(k.startswith("AMD EPYC [") for k in keys)
