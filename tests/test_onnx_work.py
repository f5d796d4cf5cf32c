"""Work counted from ONNX graphs, checked against hand-computed FLOPs and bytes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeslim.core.errors import ConfigError
from edgeslim.runtime.onnx_work import graph_work

F = TensorProto.FLOAT


def save(tmp_path, nodes, inputs, outputs, inits=(), name="g.onnx"):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(np.zeros(s, np.float32), n) for n, s in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def vi(name, shape):
    return helper.make_tensor_value_info(name, F, shape)


def test_gemm_with_transposed_weight(tmp_path):
    # Y = X (b x 64) @ W^T (W: 32 x 64) + c: 2 * b * 64 * 32 FLOPs
    path = save(tmp_path, [helper.make_node("Gemm", ["X", "W", "c"], ["Y"], transB=1)],
                [vi("X", ["batch", 64])], [vi("Y", ["batch", 32])], [("W", (32, 64)), ("c", (32,))])
    work = graph_work(path, {"batch": 3})
    assert work.flops == 2 * 3 * 64 * 32
    assert work.by_op_type == {"Gemm": 2 * 3 * 64 * 32}
    assert work.bytes_moved == 4 * (32 * 64 + 32) + 4 * 3 * 64 + 4 * 3 * 32


def test_grouped_dilated_conv(tmp_path):
    # 8 -> 16 channels, groups 4, 3x3 kernel, dilation 2, pad 2: output 16 x 10 x 10 per image.
    node = helper.make_node("Conv", ["X", "W"], ["Y"], group=4, dilations=[2, 2], pads=[2, 2, 2, 2])
    path = save(tmp_path, [node], [vi("X", [2, 8, 10, 10])], [vi("Y", ["o1"])], [("W", (16, 2, 3, 3))])
    work = graph_work(path, {})
    assert work.flops == 2 * (2 * 16 * 10 * 10) * (8 // 4) * 3 * 3


def test_matmul_chain_batched(tmp_path):
    # attention-like: (b, h, s, d) @ (b, h, d, s) then (b, h, s, s) @ (b, h, s, d)
    nodes = [helper.make_node("MatMul", ["Q", "K"], ["S"]), helper.make_node("MatMul", ["S", "V"], ["O"])]
    path = save(tmp_path, nodes, [vi("Q", ["b", 2, "s", 8]), vi("K", ["b", 2, 8, "s"]), vi("V", ["b", 2, "s", 8])],
                [vi("O", ["o1"])])
    b, s = 2, 5
    work = graph_work(path, {"b": b, "s": s})
    assert work.flops == 2 * (b * 2 * s * s) * 8 + 2 * (b * 2 * s * 8) * s
    assert work.uncounted == []


def test_conv_transpose(tmp_path):
    # 4 -> 6 channels, 3x3 kernel, stride 2, on a 5x5 input: every input element meets 6 * 9 weights.
    node = helper.make_node("ConvTranspose", ["X", "W"], ["Y"], strides=[2, 2])
    path = save(tmp_path, [node], [vi("X", [1, 4, 5, 5])], [vi("Y", ["o1"])], [("W", (4, 6, 3, 3))])
    assert graph_work(path, {}).flops == 2 * (4 * 5 * 5) * 6 * 9


def test_dynamic_dim_without_size_is_an_error(tmp_path):
    path = save(tmp_path, [helper.make_node("MatMul", ["X", "W"], ["Y"])], [vi("X", ["batch", "sequence", 4])],
                [vi("Y", ["o1"])], [("W", (4, 4))])
    with pytest.raises(ConfigError, match="sequence"):
        graph_work(path, {"batch": 1})
