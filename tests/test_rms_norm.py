"""RMSNorm chains rewritten as ONNX Runtime's SimplifiedLayerNormalization (export/rms_norm.py): the outputs
stay those of the seven-node chain, and only true RMSNorms (mean over the last axis) are fused."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeslim.export.rms_norm import fuse_rms_norms

ort = pytest.importorskip("onnxruntime")


def chain_graph(path, form: str, axis: int = -1) -> None:
    """y = RMSNorm(x) * w, then + x (x read outside the chain too), in the form torch exports ("reciprocal")
    or the Div form; `axis` the ReduceMean axis."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "w")
    consts = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
              numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
              numpy_helper.from_array(np.array([axis], np.int64), "axes")]
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["mse"]),
             helper.make_node("Sqrt", ["mse"], ["rms"])]
    if form == "reciprocal":
        nodes += [helper.make_node("Reciprocal", ["rms"], ["inv"]), helper.make_node("Mul", ["x", "inv"], ["normed"])]
    else:
        nodes += [helper.make_node("Div", ["x", "rms"], ["normed"])]
    nodes += [helper.make_node("Mul", ["w", "normed"], ["y0"]), helper.make_node("Add", ["y0", "x"], ["y"])]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 16])], [w] + consts)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))


def fused(path) -> int:
    """fuse_rms_norms on the file at `path`, written back."""
    model = onnx.load(str(path))
    count = fuse_rms_norms(model)
    onnx.save(model, str(path))
    return count


def run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("form", ["reciprocal", "div"])
def test_rms_chain_becomes_one_node_with_the_same_output(tmp_path, form):
    path = tmp_path / "m.onnx"
    chain_graph(path, form)
    x = (np.random.default_rng(1).standard_normal((2, 3, 16)) * 5).astype(np.float32)
    before = run(path, x)
    assert fused(path) == 1
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops == ["SimplifiedLayerNormalization", "Add"]
    np.testing.assert_allclose(run(path, x), before, rtol=1e-5, atol=1e-5)
    expected = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * \
        numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0]) + x
    np.testing.assert_allclose(run(path, x), expected, rtol=1e-5, atol=1e-5)


def test_a_mean_over_another_axis_is_left_alone(tmp_path):
    path = tmp_path / "m.onnx"
    chain_graph(path, "reciprocal", axis=1)
    assert fused(path) == 0
    assert "SimplifiedLayerNormalization" not in {n.op_type for n in onnx.load(str(path)).graph.node}
