"""The CPU memory probe reads a peak, not the current RSS: memory freed before the reading still counts."""
import numpy as np

from edgeslim.runtime.memory import MemoryProbe

MIB = 1 << 20


def test_rss_peak_stays_above_the_current_after_a_free():
    probe = MemoryProbe("rss")
    probe.reset_peak()
    block = np.ones(96 * MIB // 8)  # 96 MiB, written (so resident), then returned to the OS on free
    during = probe.current()
    del block
    after = probe.current()
    assert during - after > 64 * MIB  # the block did leave the process: the test can tell peak from current
    assert probe.peak() >= during - MIB > after  # the peak remembers it; the current RSS does not
