"""Lean export of Hugging Face encoders (eager attention) and ORT's per-op-type kernel time breakdown."""
import onnx
import pytest

from edgeslim.core.errors import ConfigError
from edgeslim.export.onnx import to_onnx
from edgeslim.core.onnx_io import eager_attention
from edgeslim.runtime.op_profile import (SHRUNK, _kernel_ms, amdahl_bound, gemm_fraction, op_breakdown,
                                         op_comparison, op_times, shares)
from edgeslim.sources import load_model
from edgeslim.core.specs import example_feeds


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


@pytest.fixture(scope="module")
def bert_file(tmp_path_factory):
    """A tiny BERT's ONNX file and one set of its inputs."""
    loaded = load_model("tiny-bert")
    path = to_onnx(loaded.model, loaded.inputs, tmp_path_factory.mktemp("bert") / "bert.onnx").path
    feeds = example_feeds(loaded.inputs, {"batch": 2, "sequence": 16}, seed=0)
    feeds["input_ids"] %= 120
    return path, feeds


def test_op_breakdown_sums_to_one_and_finds_the_matmuls(bert_file):
    path, feeds = bert_file
    share = op_breakdown(path, feeds, iters=2, threads=1)
    assert sum(share.values()) == pytest.approx(1.0)
    assert list(share.values()) == sorted(share.values(), reverse=True)
    assert "MatMul" in share and 0.0 < gemm_fraction(share) < 1.0
    with pytest.raises(ConfigError, match="iters >= 1"):
        op_breakdown(path, feeds, iters=0)


def test_warmup_runs_are_left_out():
    run = lambda ts: {"cat": "Session", "name": "model_run", "ts": ts, "dur": 10}  # noqa: E731
    node = lambda ts, op, dur: {"cat": "Node", "name": f"n_{op}_kernel_time", "ts": ts, "dur": dur,  # noqa: E731
                                "args": {"op_name": op}}
    events = [run(0), node(1, "MatMul", 9), run(20), node(21, "MatMul", 3), node(25, "Add", 1),
              run(40), node(41, "MatMul", 3), node(45, "Add", 1)]
    assert _kernel_ms(events, skip_runs=1) == {"MatMul": pytest.approx(0.003), "Add": pytest.approx(0.001)}  # per run
    assert shares(_kernel_ms(events, skip_runs=1)) == {"MatMul": 0.75, "Add": 0.25}
    assert shares(_kernel_ms(events, skip_runs=0))["MatMul"] == pytest.approx(15 / 17)
    assert shares({}) == {}


def test_op_comparison_names_the_op_types_that_did_not_shrink():
    before = {"MatMul": 8.0, "Where": 1.3, "LayerNormalization": 0.9, "Add": 0.05}
    after = {"MatMul": 3.0, "Where": 1.3, "LayerNormalization": 0.85, "Add": 0.01, "Transpose": 0.5}
    cmp = op_comparison(before, after)
    assert [r["op"] for r in cmp["rows"]] == ["MatMul", "Where", "LayerNormalization", "Add", "Transpose"]
    mm, where = cmp["rows"][0], cmp["rows"][1]
    assert mm["ratio"] == pytest.approx(3 / 8) and mm["before_share"] == pytest.approx(8 / 10.25)
    assert where["ratio"] == 1.0 and cmp["rows"][-1]["ratio"] is None and cmp["rows"][-1]["before_ms"] == 0
    # MatMul shrank; Where and LayerNorm did not (0.94 >= SHRUNK); Add is under 2% of either model's time;
    # Transpose is new, 8.9% of the compressed model's kernel time
    assert 0.85 / 0.9 >= SHRUNK and cmp["not_shrunk"] == ["Where", "LayerNormalization", "Transpose"]
    assert op_comparison(before, before)["not_shrunk"] == ["MatMul", "Where", "LayerNormalization"]


def test_op_times_are_ms_per_run(bert_file):
    path, feeds = bert_file
    times = op_times(path, feeds, iters=3, threads=1)
    assert "MatMul" in times and all(v > 0 for v in times.values())
    assert list(times.values()) == sorted(times.values(), reverse=True)
    assert sum(times.values()) < 1000  # ms per run of a tiny encoder, not a sum over the runs in microseconds


def test_amdahl_bound():
    assert amdahl_bound(0.8, 0.5) == pytest.approx(0.6)
    assert amdahl_bound(0.0, 0.1) == 1.0 and amdahl_bound(1.0, 0.3) == pytest.approx(0.3)
