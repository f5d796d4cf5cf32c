"""Percentile maths of the profiler's Timing on known samples (no timing of real code)."""
from __future__ import annotations

import numpy as np
import pytest

from edgeslim.runtime.measure import UNSTABLE_CV, _summarize


def test_percentiles_mean_std_and_throughput_on_1_to_100_ms():
    t = _summarize(batch=4, times_s=np.arange(1, 101) / 1e3, peak=0, method="x", warmup=2)
    # numpy's linear interpolation: p50 of 1..100 is 50.5, p90 is 90.1, p99 is 99.01
    assert (t.p50_ms, t.p90_ms, t.p99_ms) == pytest.approx((50.5, 90.1, 99.01))
    assert t.mean_ms == pytest.approx(50.5) and t.std_ms == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert t.throughput_per_s == pytest.approx(4 / 0.0505) and t.iters == 100 and t.warmup == 2
    assert t.unstable == (t.cv > UNSTABLE_CV) and t.unstable


def test_single_sample_and_constant_samples_are_stable():
    one = _summarize(batch=1, times_s=np.array([0.002]), peak=0, method="x", warmup=0)
    assert one.p50_ms == one.p99_ms == pytest.approx(2.0) and one.std_ms == 0 and not one.unstable
    flat = _summarize(batch=1, times_s=np.full(10, 0.003), peak=0, method="x", warmup=0)
    assert flat.cv == pytest.approx(0) and flat.p90_ms == pytest.approx(3.0)
