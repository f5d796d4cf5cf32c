"""machine_info(): what every benchmark JSON records about the CPU it ran on."""
import json

import pytest

from edgeslim.runtime import machine


@pytest.fixture
def cpu_simd_width():
    """Here the real SIMD width is under test: conftest's pin is off."""


def test_machine_info_names_the_cpu_and_its_features():
    info = machine.machine_info()
    json.dumps(info)  # JSON-ready
    assert info["cpu_model"] and info["cpu_model"] != "x86_64"
    assert set(info["int8_features"]) <= set(machine.INT8_FLAGS)
    assert info["simd_width_fp32"] in (4, 8, 16)


def test_simd_width_follows_the_flags(monkeypatch):
    for flags, width in (({"avx512f", "avx2"}, 16), ({"avx2"}, 8), ({"sse4_2"}, 4)):
        monkeypatch.setattr(machine, "_cpuinfo", lambda flags=flags: ("test cpu", flags))
        assert machine.simd_width_fp32() == width
