"""The CPU memory probe reads a peak, not the current RSS: memory freed before the reading still counts."""
import mmap

from edgeslim.runtime.memory import MemoryProbe

MIB = 1 << 20
PAGE = mmap.PAGESIZE


def test_rss_peak_stays_above_the_current_after_a_free():
    probe = MemoryProbe("rss")
    probe.reset_peak()
    block = mmap.mmap(-1, 96 * MIB)  # its own mapping: unmapped (returned to the OS) on close, whatever malloc keeps
    for offset in range(0, 96 * MIB, PAGE):
        block[offset] = 1  # every page written, so resident
    during = probe.current()
    block.close()
    after = probe.current()
    assert during - after > 64 * MIB  # the block did leave the process: the test can tell peak from current
    assert probe.peak() >= during - MIB > after  # the peak remembers it; the current RSS does not
