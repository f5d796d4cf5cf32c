"""CUDA events timing and CUDA graphs for CUDA sessions (marked gpu: skipped without a GPU), and the clear
errors where there is no CUDA."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.core.errors import ConfigError, MissingDependencyError
from edgeslim.runtime.cuda_timing import resolve_clock
from edgeslim.runtime.measure import interleave, measure
from edgeslim.runtime.session import open_session

pytestmark = pytest.mark.filterwarnings("ignore:unstable timing:RuntimeWarning")


def block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 32)).eval()


def feeds(batch: int) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(batch).standard_normal((batch, 64)).astype(np.float32)}


class FakeCuda:
    device = "cuda"

    def run(self, feeds):
        return {}


def test_wall_clock_on_the_cpu_and_auto_picks_it():
    with open_session(block(), "cpu-torch-fp32") as s:
        assert resolve_clock(s) == "wall"
        assert measure(s, feeds(2), warmup=0, iters=2).clock == "wall"


def test_cuda_events_for_a_cpu_session_is_a_config_error():
    with open_session(block(), "cpu-torch-fp32") as s:
        with pytest.raises(ConfigError, match="CUDA events time work on a CUDA stream; this session runs on 'cpu'"):
            measure(s, feeds(2), iters=2, clock="cuda-events")
    with pytest.raises(ConfigError, match="clock must be one of"):
        resolve_clock(FakeCuda(), "sundial")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path")
def test_cuda_events_without_cuda_say_so():
    with pytest.raises(MissingDependencyError, match=r"CUDA events need a CUDA device, but torch.cuda.is_available\(\) is False"):
        measure(FakeCuda(), feeds(2), warmup=0, iters=1, clock="cuda-events")
    with pytest.raises(MissingDependencyError, match="runs on CUDA"):
        open_session(block(), "cuda-torch-fp16")


def test_cuda_graphs_need_a_cuda_profile():
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA profile; 'cpu-torch-fp32' runs on cpu"):
        open_session(block(), "cpu-torch-fp32", cuda_graph=True)


@pytest.mark.gpu
def test_cuda_session_is_timed_with_cuda_events():
    with open_session(block(), "cuda-torch-fp16") as s:
        t = measure(s, feeds(64), warmup=2, iters=5)
        a, b = interleave([s, s], [feeds(8), feeds(64)], warmup=1, iters=4, rounds=2)
    assert t.clock == a.clock == b.clock == "cuda-events" and t.p50_ms > 0 and a.p50_ms > 0


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager_and_recaptures_per_shape():
    model = block()
    with open_session(model, "cuda-torch-fp16") as eager, open_session(model, "cuda-torch-fp16", cuda_graph=True) as g:
        for batch in (8, 8, 32):  # the second call replays; a new shape captures a second graph
            np.testing.assert_allclose(g.run(feeds(batch))["output"], eager.run(feeds(batch))["output"], atol=1e-3)
        assert len(g._graphs) == 2
        assert measure(g, feeds(8), warmup=1, iters=3).clock == "cuda-events"
