"""The exported self-attention fused for ONNX Runtime (compress/int8_attention.py): Attention / QAttention nodes
in place of the op-by-op chain, the same outputs as the unfused graphs on padded batches."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeslim.compress.int8_attention import fuse_attention
from edgeslim.compress.int8_dynamic import dynamic_record, quantize_dynamic_graph


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    from edgeslim.export.onnx import to_onnx
    from edgeslim.sources import load_model
    loaded = load_model("tiny-bert")
    return to_onnx(loaded.model, loaded.inputs, tmp_path_factory.mktemp("attn") / "f.onnx").path


def _run(path, batch=3, seq=12):
    rng = np.random.default_rng(0)
    mask = np.ones((batch, seq), np.int64)
    mask[1, 7:], mask[2, 2:] = 0, 0
    feeds = {"input_ids": rng.integers(1, 100, (batch, seq)).astype(np.int64), "attention_mask": mask}
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _ops(path) -> dict[str, int]:
    ops: dict[str, int] = {}
    for n in onnx.load(str(path)).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def test_fp32_fusion_is_the_same_attention(fp32, tmp_path):
    model = onnx.load(str(fp32))
    assert fuse_attention(model, quantize=False) == 2  # tiny-bert's two layers
    onnx.save(model, str(tmp_path / "fused.onnx"))
    ops = _ops(tmp_path / "fused.onnx")
    assert ops["Attention"] == 2 and "Softmax" not in ops and "Transpose" not in ops and "Where" not in ops
    np.testing.assert_allclose(_run(tmp_path / "fused.onnx"), _run(fp32), rtol=1e-5, atol=1e-5)


def test_dynamic_int8_runs_qattention_on_the_same_integers(fp32, tmp_path):
    record = dynamic_record("disable", ())
    quantize_dynamic_graph(record, fp32, tmp_path / "fused.onnx")
    quantize_dynamic_graph(record | {"fused_attention": False}, fp32, tmp_path / "plain.onnx")
    fused, plain = _ops(tmp_path / "fused.onnx"), _ops(tmp_path / "plain.onnx")
    assert fused["QAttention"] == 2 and "Softmax" not in fused and plain["Softmax"] == 2 and "QAttention" not in plain
    assert fused["MatMulInteger"] == plain["MatMulInteger"] - 6  # q, k, v of each layer now inside QAttention
    np.testing.assert_allclose(_run(tmp_path / "fused.onnx"), _run(tmp_path / "plain.onnx"), rtol=1e-4, atol=1e-4)


def test_a_layer_with_an_ignored_projection_stays_unfused(fp32, tmp_path):
    model = onnx.load(str(fp32))
    query = next(n.name for n in model.graph.node if n.op_type == "MatMul")  # layer 0's first projection
    assert fuse_attention(model, quantize=True, skip={query}) == 1


def test_a_mask_that_is_not_padding_is_not_fused(fp32):
    model = onnx.load(str(fp32))
    where = next(n for n in model.graph.node if n.op_type == "Where")
    where.input[1], where.input[2] = where.input[2], where.input[1]  # masks the real tokens instead
    assert fuse_attention(model, quantize=False) == 0
