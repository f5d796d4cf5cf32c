"""Shared test settings: CPU threads, offline Hugging Face, GPU/TensorRT skips."""
import os

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

# CI replays a fixed sequence of fuzz examples (reproducible verdicts); local runs explore new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if ("gpu" in item.keywords or "tensorrt" in item.keywords) and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the test inside an empty temporary folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def cpu_simd_width(request, monkeypatch):
    """The fp32 SIMD width a local CPU target's `align` follows (runtime/peak.machine_align), pinned so that no
    test depends on the CPU it runs on: 8 (AVX2) unless a test asks for another with
    `@pytest.mark.parametrize("cpu_simd_width", [8, 16], indirect=True)`."""
    from edgeslim.runtime import machine
    width = getattr(request, "param", 8)
    monkeypatch.setattr(machine, "simd_width_fp32", lambda: width)
    return width
