"""Lean export of Hugging Face encoders (eager attention) and ORT's per-op-type kernel time breakdown."""
import onnx
import pytest

from edgeslim.errors import ConfigError
from edgeslim.export.onnx import to_onnx
from edgeslim.onnx_io import eager_attention
from edgeslim.runtime.op_profile import _by_op_type, amdahl_bound, gemm_fraction, op_breakdown
from edgeslim.sources import load_model
from edgeslim.specs import example_feeds


def _op_count(path, op):
    return sum(n.op_type == op for n in onnx.load(str(path)).graph.node)


def test_lean_export_drops_the_sdpa_mask_ops_and_restores_the_model(tmp_path):
    loaded = load_model("tiny-bert")
    hf = loaded.model.hf
    hf.set_attn_implementation("sdpa")
    lean = to_onnx(loaded.model, loaded.inputs, tmp_path / "lean.onnx")
    assert hf.config._attn_implementation == "sdpa"  # restored after export
    plain = to_onnx(loaded.model, loaded.inputs, tmp_path / "sdpa.onnx", lean_attention=False)
    layers = hf.config.num_hidden_layers
    # SDPA: a Where and an IsNaN per layer (what its mask costs at run time); eager: one Where building the mask
    assert _op_count(plain.path, "IsNaN") >= layers and _op_count(plain.path, "Where") > layers
    assert _op_count(lean.path, "IsNaN") == 0 and _op_count(lean.path, "Where") <= 1
    assert all(c.ok for c in lean.checks)  # validated against the model as given (SDPA in torch)
    with eager_attention(loaded.model) as switched:
        assert switched == [type(hf).__name__] and hf.config._attn_implementation == "eager"
    assert hf.config._attn_implementation == "sdpa"


def test_op_breakdown_sums_to_one_and_finds_the_matmuls(tmp_path):
    loaded = load_model("tiny-bert")
    path = to_onnx(loaded.model, loaded.inputs, tmp_path / "bert.onnx").path
    feeds = example_feeds(loaded.inputs, {"batch": 2, "sequence": 16}, seed=0)
    feeds["input_ids"] %= 120
    shares = op_breakdown(path, feeds, iters=2, threads=1)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert list(shares.values()) == sorted(shares.values(), reverse=True)
    assert "MatMul" in shares and 0.0 < gemm_fraction(shares) < 1.0
    with pytest.raises(ConfigError, match="iters >= 1"):
        op_breakdown(path, feeds, iters=0)


def test_warmup_runs_are_left_out():
    run = lambda ts: {"cat": "Session", "name": "model_run", "ts": ts, "dur": 10}  # noqa: E731
    node = lambda ts, op, dur: {"cat": "Node", "name": f"n_{op}_kernel_time", "ts": ts, "dur": dur,  # noqa: E731
                                "args": {"op_name": op}}
    events = [run(0), node(1, "MatMul", 9), run(20), node(21, "MatMul", 3), node(25, "Add", 1),
              run(40), node(41, "MatMul", 3), node(45, "Add", 1)]
    assert _by_op_type(events, skip_runs=1) == {"MatMul": 0.75, "Add": 0.25}
    assert _by_op_type(events, skip_runs=0)["MatMul"] == pytest.approx(15 / 17)


def test_amdahl_bound():
    assert amdahl_bound(0.8, 0.5) == pytest.approx(0.6)
    assert amdahl_bound(0.0, 0.1) == 1.0 and amdahl_bound(1.0, 0.3) == pytest.approx(0.3)
