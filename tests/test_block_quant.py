"""wq mode int4_min (compress/block_quant.py): GGUF's Q4_1 / Q8_0 grids found again from weights already
on them, the float minimum kept in the file (MatMulNBits + a block-sum correction), replay with no data."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers")

from edgeslim.cli import main  # noqa: E402
from edgeslim.compress.block_quant import grid_weight, offset_grid  # noqa: E402
from edgeslim.export.nbits import QuantizedMatrix, lower_matmul_nbits  # noqa: E402
from tiny_lm import llama_folder  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def q4_1_weight(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight on llama.cpp's Q4_1 grid (fp16 d and m per block of 32, every block using q = 0 and 15)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand((n, k // 32, 1), generator=g) * 0.02 + 1e-3).half().float()
    m = (-torch.rand((n, k // 32, 1), generator=g) * 0.2).half().float()
    return (d * q + m).reshape(n, k), q.reshape(n, k)


def test_q4_1_and_q8_0_weights_come_back_exactly():
    w, q = q4_1_weight(6, 128)
    iw = grid_weight(w, "int4_min", 32)
    assert torch.equal(iw.q.long(), q) and iw.offset is not None
    # q exactly; the minimum up to its offset's int8 grid (block_quant.offset_grid, one scale for these 4 blocks):
    # within half a step of that grid, 1/254 of the row's largest offset
    err = (iw.dense() - w).abs().amax(-1)
    assert float((err - iw.offset.abs().amax(-1) / 254).max()) <= 1e-6 * float(w.abs().max()) and float(err.max()) > 0
    value, offset_q, offset_scale = offset_grid(iw.offset)
    assert torch.equal(offset_q, iw.offset_q) and torch.allclose(value, iw.offset, rtol=0, atol=1e-9)
    # an integer zero point (NNCF's int4 asymmetric) cannot: the same scale with round(-m / d) misses the grid
    b = w.reshape(6, 4, 32)
    lo, d = b.amin(-1, keepdim=True), (b.amax(-1, keepdim=True) - b.amin(-1, keepdim=True)) / 15
    z = torch.round(-lo / d)
    nncf_like = (torch.clamp(torch.round(b / d) + z, 0, 15) - z) * d
    assert float((nncf_like.reshape(6, 128) - w).abs().max()) > 10 * float((iw.dense() - w).abs().max())
    # Q8_0: symmetric int8 blocks
    g = torch.Generator().manual_seed(1)
    q8 = torch.randint(-127, 128, (5, 4, 32), generator=g)
    q8[..., 0] = 127
    d8 = (torch.rand((5, 4, 1), generator=g) * 0.01 + 1e-3).half().float()
    w8 = (d8 * q8).reshape(5, 128)
    iw8 = grid_weight(w8, "int8_sym", 32)
    assert torch.equal(iw8.q.long() - 128, q8.reshape(5, 128)) and iw8.offset is None
    assert float((iw8.dense() - w8).abs().max()) <= 1e-6 * float(w8.abs().max())


def test_offset_lowering_matches_the_dense_matmul(tmp_path):
    from onnx import TensorProto, helper, numpy_helper
    import onnxruntime as ort
    w, _ = q4_1_weight(3, 64, seed=2)
    iw = grid_weight(w, "int4_min", 32)
    m = QuantizedMatrix("w", iw.dense().numpy(), iw.q.numpy(), iw.scale.numpy(), iw.zero.numpy(), 4, iw.offset.numpy(),
                        iw.offset_q.numpy(), iw.offset_scale.numpy())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "wt"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 3])],
                              [numpy_helper.from_array(np.ascontiguousarray(m.dense.T), "wt")])
    path = tmp_path / "offset.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    report = lower_matmul_nbits(path, [m])
    assert report.matmuls == 1 and not report.unmatched
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # the weights at 4 bits; their offsets int8 in the file, over the block sums (a ReduceSum over a view of the
    # input) as one fp32 MatMul whose matrix ORT computes from the int8 once, when it loads the file
    assert ops.count("MatMulNBits") == 1 and ops.count("MatMul") == 1 and ops.count("ReduceSum") == 1
    assert "wt" not in {i.name for i in onnx.load(str(path)).graph.initializer}
    inits = {i.name: i for i in onnx.load(str(path)).graph.initializer}
    assert inits["w_offset_q"].data_type == onnx.TensorProto.INT8
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert sorted(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node) == \
        ["Add", "MatMul", "MatMulNBits", "ReduceSum", "Reshape"]  # Cast, Mul, Reshape, Slice of constants folded
    x = np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)
    y = session.run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ m.dense.T, rtol=1e-5, atol=1e-5)


def test_int4_min_cache_graph(tmp_path, capsys):
    folder = llama_folder(tmp_path / "tiny-llama", hidden=128, positions=192)
    assert main(["export", str(folder), "--kv-cache", "-o", str(tmp_path / "fp32.onnx"), "--json"]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    slim = tmp_path / "min.slim"
    assert main(["compress", str(folder), "-m", "wq", "--set", "mode=int4_min", "--set", "group_size=32",
                 "-o", str(slim), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert main(["export", str(slim), "--kv-cache", "-o", str(tmp_path / "min.onnx"), "--json"]) == 0  # replayed
    info = json.loads(capsys.readouterr().out)
    assert info["matmul_nbits"] == 2 * 7 + 1  # q k v o gate up down per layer, and the tied head (int8 blocks)
    assert info["greedy_prompts_equal"] == 3 and max(info["max_abs_diff"].values()) < 1e-4
    model = onnx.load(info["onnx"])
    bits = sorted({a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"})
    # q, k, v as one MatMulNBits and gate, up as one (then a Split each); the offsets: one block sum (a ReduceSum)
    # per input (qkv, o, gate/up, down) and one fp32 product per MatMulNBits
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * 4 + 1 and sum(n.op_type == "Split" for n in model.graph.node) == 2 * 2
    # MatMuls left: per layer the 4 offset products and attention's 2 (scores, weighted values)
    assert bits == [4, 8] and sum(n.op_type == "MatMul" for n in model.graph.node) == 2 * (4 + 2)
    assert sum(n.op_type == "ReduceSum" for n in model.graph.node) == 2 * 4
    # o_proj's and down_proj's offsets added with the residual in one Sum
    assert sum(n.op_type == "Sum" and len(n.input) == 3 for n in model.graph.node) == 2 * 2
    sizes = [sum(len(i.raw_data) for i in onnx.load(p).graph.initializer) for p in (info["onnx"], fp32["onnx"])]
    assert sizes[0] / sizes[1] < 0.30  # 4 bits + fp32 scale and minimum per 32 weights; the table at 8 bits
    assert not any(tuple(i.dims) == (90, 128) and i.data_type == onnx.TensorProto.FLOAT for i in model.graph.initializer)
    assert main(["compress", str(folder), "-m", "wq", "--set", "mode=int4_min", "--set", "all_layers=true",
                 "-o", str(tmp_path / "x.slim")]) == 2
    assert report["steps"][-1]["resolved"]["grid"]["hf.model.embed_tokens.weight"] == "int8_sym"


def test_int4_min_shared_layout_feeds_the_packed_product(tmp_path, capsys):
    """int4_min with GroupQueryAttention (heads of 16): the merged q/k/v MatMulNBits (with its offsets) is the
    attention's packed input, no Split; checked against the fake-quantized model like every cache graph."""
    folder = llama_folder(tmp_path / "tiny-llama", hidden=64, positions=192)
    slim = tmp_path / "min.slim"
    assert main(["compress", str(folder), "-m", "wq", "--set", "mode=int4_min", "--set", "group_size=32",
                 "-o", str(slim)]) == 0
    capsys.readouterr()
    assert main(["export", str(slim), "--kv-cache", "--kv-layout", "shared", "-o", str(tmp_path / "min.onnx"),
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cache_layout"] == "shared" and info["greedy_prompts_equal"] == 3
    model = onnx.load(info["onnx"])
    producer = {o: n for n in model.graph.node for o in n.output}
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(n.input[1] == n.input[2] == "" for n in gqa)
    # the packed q/k/v: the MatMulNBits product plus its offsets, read whole
    assert all(producer[n.input[0]].op_type == "Add" and "MatMulNBits" in
               {producer[i].op_type for i in producer[n.input[0]].input if i in producer} for n in gqa)
    assert sum(n.op_type == "Split" for n in model.graph.node) == 2  # gate and up only
