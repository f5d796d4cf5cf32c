"""CUDA sessions: fp16 on the GPU agrees with fp32 on the CPU; the profiler reads CUDA memory."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.core.errors import MissingDependencyError
from edgeslim.runtime.measure import measure
from edgeslim.runtime.session import open_session
from edgeslim.runtime.targets import load_profile

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = pytest.mark.filterwarnings("ignore:unstable timing:RuntimeWarning")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.LayerNorm(256), nn.Linear(256, 32))

    def forward(self, x):
        return self.net(x)


def feeds(batch: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(batch).standard_normal((batch, 64)).astype(np.float32)}


@pytest.mark.gpu
@needs_cuda
def test_cuda_fp16_agrees_with_cpu_fp32():
    model = Block().eval()
    with open_session(model, "cpu-torch-fp32") as cpu, open_session(model, "cuda-torch-fp16") as gpu:
        want = cpu.run(feeds(16))["output"]
        got = gpu.run(feeds(16))["output"]
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)
    assert next(model.parameters()).device.type == "cpu" and next(model.parameters()).dtype == torch.float32


@pytest.mark.gpu
@needs_cuda
def test_measure_reports_cuda_memory():
    with open_session(Block().eval(), "cuda-torch-fp16") as s:
        small = measure(s, feeds(8), warmup=2, iters=5)
        big = measure(s, feeds(4096), warmup=2, iters=5)
    assert small.mem_method == big.mem_method == "torch.cuda.max_memory_allocated"
    # Batch 4096 holds at least its fp16 input and the 256-wide hidden activation on the GPU.
    assert big.peak_mem_bytes >= 4096 * 256 * 2
    assert 0 < small.p50_ms <= small.p90_ms <= small.p99_ms


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_profile_without_cuda_says_so():
    with pytest.raises(MissingDependencyError, match="torch.cuda.is_available\\(\\) is False"):
        open_session(Block(), "cuda-torch-fp16")
    assert load_profile("cuda-torch-fp16").device == "cuda"
