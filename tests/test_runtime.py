"""Sessions, timing, FLOP counting and the roofline on tiny models (CPU only)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.core.errors import ConfigError, SourceError
from edgeslim.runtime.measure import Timing, measure, sweep
from edgeslim.runtime.roofline import (count_flops, explain_speedup, memory_bound, min_bytes_moved,
                                       roofline_fraction, roofline_ms)
from edgeslim.runtime.session import open_session
from edgeslim.runtime.targets import load_profile

# Timings on a shared 2-core machine are often unstable; the warning itself is tested below.
pytestmark = pytest.mark.filterwarnings("ignore:unstable timing:RuntimeWarning")
torch.set_num_threads(1)
ONE_THREAD = {"threads": 1}


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)


class TwoOutputs(nn.Module):
    def forward(self, x, scale=None):
        return x * 2, x.sum(dim=1)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "mlp.onnx"
    torch.onnx.export(TinyMLP().eval(), (torch.randn(2, 16),), str(path), dynamo=True, external_data=False,
                      verbose=False, input_names=["x"], dynamic_shapes={"x": {0: "batch"}})
    return path


def feeds(batch: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(batch).standard_normal((batch, 16)).astype(np.float32)}


def test_torch_and_ort_sessions_agree(onnx_file):
    model = TinyMLP().eval()
    torch_profile = load_profile("cpu-torch-fp32").override(ONE_THREAD)
    ort_profile = load_profile("cpu-ort-fp32").override(ONE_THREAD)
    with open_session(model, torch_profile) as ts, open_session(onnx_file, ort_profile) as os_:
        assert ts.inputs == ["x"] and os_.inputs == ["x"]
        for b in (1, 7):
            a, o = ts.run(feeds(b)), os_.run(feeds(b))
            assert list(a) == ["output"] and len(o) == 1
            ort_out = next(iter(o.values()))
            assert a["output"].shape == ort_out.shape == (b, 4)
            np.testing.assert_allclose(a["output"], ort_out, atol=1e-5, rtol=1e-4)


def test_torch_session_leaves_the_callers_model_alone():
    model = TinyMLP().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with open_session(model, load_profile("cpu-torch-fp32").override(ONE_THREAD)) as s:
        s.run(feeds(2))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_torch_session_names_tuple_outputs_and_checks_feeds():
    with open_session(TwoOutputs(), load_profile("cpu-torch-fp32").override(ONE_THREAD)) as s:
        out = s.run(feeds(3))
        assert list(out) == ["output_0", "output_1"] and out["output_1"].shape == (3,)
        with pytest.raises(ConfigError, match="missing \\['x'\\]"):
            s.run({"scale": np.ones(1, np.float32)})
        with pytest.raises(ConfigError, match="unknown \\['y'\\]"):
            s.run({"x": feeds(1)["x"], "y": feeds(1)["x"]})


def test_profile_runtime_must_match_the_model_kind(onnx_file):
    with pytest.raises(ConfigError, match="export it to ONNX"):
        open_session(TinyMLP(), "cpu-ort-fp32")
    with pytest.raises(ConfigError, match="nn.Module itself"):
        open_session(onnx_file, "cpu-torch-fp32")


def test_missing_corrupt_and_unknown_files_name_the_file(tmp_path):
    with pytest.raises(SourceError, match="absent.onnx"):
        open_session(tmp_path / "absent.onnx")
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\x01\x02" * 10)
    with pytest.raises(SourceError, match="corrupt.onnx"):
        open_session(bad)
    odd = tmp_path / "model.bin"
    odd.write_bytes(b"x")
    with pytest.raises(SourceError, match="model.bin"):
        open_session(odd)


class CountingSession:
    """Wraps a session and counts run() calls, to see which calls measure() times."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def run(self, feeds):
        self.calls += 1
        return self.inner.run(feeds)


def test_measure_structure_and_warmup_not_timed(onnx_file):
    with open_session(onnx_file, load_profile("cpu-ort-fp32").override(ONE_THREAD)) as s:
        counting = CountingSession(s)
        t = measure(counting, feeds(8), warmup=3, iters=12)
    assert isinstance(t, Timing)
    assert counting.calls == 15 and t.iters == 12 and t.warmup == 3 and t.batch == 8
    assert 0 < t.p50_ms <= t.p90_ms <= t.p99_ms
    assert t.throughput_per_s == pytest.approx(8 / (t.mean_ms / 1e3))
    assert t.cv == pytest.approx(t.std_ms / t.mean_ms)
    assert t.unstable == (t.cv > 0.15)
    assert t.peak_mem_bytes >= 0 and "RSS" in t.mem_method


def test_warmup_calls_are_excluded_from_the_timings(onnx_file):
    """A session whose first calls are slow: with warm-up covering them, no timed call is slow."""

    class SlowStart:
        def __init__(self, inner) -> None:
            self.inner, self.calls = inner, 0

        def run(self, feeds):
            self.calls += 1
            if self.calls <= 2:
                import time
                time.sleep(0.05)
            return self.inner.run(feeds)

    with open_session(onnx_file, load_profile("cpu-ort-fp32").override(ONE_THREAD)) as s:
        t = measure(SlowStart(s), feeds(1), warmup=2, iters=5)
        with pytest.warns(RuntimeWarning, match="unstable timing"):
            cold = measure(SlowStart(s), feeds(1), warmup=0, iters=5)
    assert t.p99_ms < 50 <= cold.p99_ms and cold.unstable


def test_measure_rejects_bad_counts(onnx_file):
    with open_session(onnx_file) as s:
        with pytest.raises(ConfigError, match="iters"):
            measure(s, feeds(1), iters=0)
        with pytest.raises(ConfigError, match="empty"):
            measure(s, {}, iters=1)


def test_sweep_runs_each_batch_in_order(onnx_file):
    with open_session(onnx_file, load_profile("cpu-ort-fp32").override(ONE_THREAD)) as s:
        rows = sweep(s, feeds, [8, 1, 4], warmup=1, iters=3, progress=False)
    assert [r.batch for r in rows] == [1, 4, 8] and all(r.iters == 3 for r in rows)


@pytest.mark.parametrize("b,m,n", [(1, 16, 8), (5, 32, 12), (3, 7, 9)])
def test_count_flops_linear_exact(b, m, n):
    class Lin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(m, n)

        def forward(self, x):
            return self.fc(x)

    assert count_flops(Lin(), {"x": np.zeros((b, m), np.float32)}) == 2 * b * m * n


def test_min_bytes_moved_counts_weights_inputs_outputs():
    lin = nn.Linear(10, 6)

    class Lin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = lin

        def forward(self, x):
            return self.fc(x)

    x = {"x": np.zeros((4, 10), np.float32)}
    assert min_bytes_moved(Lin(), x) == (10 * 6 + 6) * 4 + 4 * 10 * 4 + 4 * 6 * 4
    assert min_bytes_moved(Lin(), x, "fp16") == (10 * 6 + 6) * 2 + 4 * 10 * 4 + 4 * 6 * 2


def test_roofline_math_on_known_numbers():
    p = load_profile("cpu-ort-fp32").override({"peak_gflops": 100, "mem_gbps": 10})
    # 1 GFLOP at 100 GFLOP/s = 10 ms; 50 MB at 10 GB/s = 5 ms -> compute-bound, 10 ms.
    assert roofline_ms(1e9, 50e6, p) == pytest.approx(10.0)
    assert not memory_bound(1e9, 50e6, p)
    # 0.1 GFLOP = 1 ms; 200 MB = 20 ms -> memory-bound, 20 ms.
    assert roofline_ms(1e8, 200e6, p) == pytest.approx(20.0)
    assert memory_bound(1e8, 200e6, p)
    assert roofline_fraction(40.0, 1e8, 200e6, p) == pytest.approx(0.5)


def test_explain_speedup_none_when_latency_follows_flops():
    p = load_profile("cpu-ort-fp32")
    assert explain_speedup(0.5, 0.5, 0.52, profile=p, batch=8) is None
    assert explain_speedup(0.5, 0.5, 0.4, profile=p, batch=8) is None


def test_explain_speedup_gives_reasons_in_a_synthetic_case():
    p = load_profile("cpu-ort-fp32").override({"peak_gflops": 100, "mem_gbps": 10})
    # Half the FLOPs, 0.95 of the latency; 1e6 FLOP and 1e6 bytes: roofline 0.1 ms, measured 5 ms.
    changes = [{"name": "encoder.layer.0.ffn", "params_before": 100, "params_after": 100, "decision": None,
                "status": "dense"},
               {"name": "q", "params_before": 100, "params_after": 40, "decision": 37, "status": "replaced"},
               {"name": "k", "params_before": 100, "params_after": 60, "decision": [64, 8], "status": "replaced"},
               {"name": "adapter", "params_before": 100, "params_after": 120, "decision": 8, "status": "adapter"},
               {"name": "int8", "params_before": 100, "params_after": 100, "status": "quantized"},
               {"name": "attn.out_proj", "params_before": 100, "params_after": 100, "status": "skipped"}]
    why = explain_speedup(0.5, 0.5, 0.95, profile=p, batch=1, flops=1e6, bytes_moved=1e6, latency_ms=5.0,
                          changes=changes)
    assert why is not None
    assert "batch 1 is too small" in why and "memory-bound" in why
    assert "1 targeted layer(s) stayed dense (encoder.layer.0.ffn)" in why  # not the adapter nor INT8
    assert "1 targeted layer(s) were skipped" in why and "attn.out_proj" in why
    assert "1 shape(s) not a multiple of align=8" in why and "q: 37" in why
    # Only an alignment problem.
    only_align = explain_speedup(0.5, 0.5, 0.8, profile="cpu-ort-fp32", batch=32,
                                 changes=[{"name": "r", "params_before": 9, "params_after": 3, "decision": 30}])
    assert "align=8" in only_align and "too small" not in only_align and "memory-bound" not in only_align
    # Short, with no identifiable cause: still a sentence saying so.
    assert "no single cause" in explain_speedup(0.5, 0.5, 0.9, profile=p, batch=32)
