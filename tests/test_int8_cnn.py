"""CNN INT8 (issue 39): Conv + ReLU6 (Clip) chains, depthwise convs included, run as QLinearConv in ORT, the
clip folded into the uint8 output range; what stays fp32 is named (runtime/op_profile.fp32_compute_ops)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgeslim.compress.base import CompressContext, get_compressor
from edgeslim.core.calib import CalibData
from edgeslim.core.specs import TensorSpec
from edgeslim.export.onnx import to_onnx
from edgeslim.runtime.op_profile import fp32_compute_ops

pytest.importorskip("nncf")
SPEC = [TensorSpec("x", ("batch", 3, 16, 16))]


class MobileBlock(nn.Module):
    """EfficientNet-Lite's inverted residual: expand + ReLU6, depthwise + ReLU6, linear projection, skip;
    then a pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(8, 24, 1), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.ReLU6())
        self.project = nn.Conv2d(24, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y + self.project(self.depthwise(self.expand(y)))
        return self.head(y.mean((2, 3)))


def _setup(model: nn.Module, tmp_path):
    """Calibration batches, the int8 compressor, its context and the model's fp32 ONNX file."""
    g = torch.Generator().manual_seed(0)
    calib = CalibData("tiny", [{"x": torch.randn(8, 3, 16, 16, generator=g)} for _ in range(4)])
    return calib, get_compressor("int8"), CompressContext(inputs=tuple(SPEC)), to_onnx(model, SPEC, tmp_path / "f.onnx").path


def test_relu6_and_depthwise_convs_run_as_qlinearconv(tmp_path):
    model = MobileBlock().eval()
    calib, comp, context, fp32 = _setup(model, tmp_path)
    g = torch.Generator().manual_seed(1)
    # the stem on the pixels stays fp32, and says why (no op kept fp32 by its measured sensitivity: tested below)
    default = comp.compress(model, {"sensitive_fp32": False}, calib, context=context)
    comp.onnx_stage(default.resolved, fp32, tmp_path / "d.onnx", context)
    kept = fp32_compute_ops(tmp_path / "d.onnx")
    assert sorted(why for why in kept.values()) == ["Conv: no quantizer on its input", "Gemm: its input is dequantized "
                                                    "but not fused"], kept
    assert [r.status for r in default.changes if r.kind.startswith("Conv")].count("skipped") == 1
    result = comp.compress(model, {"stem_fp32": False, "sensitive_fp32": False}, calib, context=context)
    comp.onnx_stage(result.resolved, fp32, tmp_path / "q.onnx", context)
    kept = fp32_compute_ops(tmp_path / "q.onnx")
    assert [why.split(":")[0] for why in kept.values()] == ["Gemm"], kept  # every Conv is INT8, the head is not
    import onnx
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("QLinearConv") == 4 and "Clip" not in ops  # the ReLU6s are folded into the output ranges
    x = torch.randn(16, 3, 16, 16, generator=g)
    with torch.inference_mode():
        ref = model(x).numpy()
    out = session.run(None, {"x": x.numpy()})[0]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.05
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9


def _head_graph(fusable: bool) -> onnx.ModelProto:
    """A classifier head on int8 weights. Not fusable: Gemm(x, DQ(weights, per-row scales, axis -2), bias)
    on the fp32 x. Fusable: Q -> DQ on x, MatMul with per-tensor weights, Q -> DQ on its output, which ORT
    turns into one int8 kernel."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    rows = rng.integers(-127, 128, (6, 5)).astype(np.int8)
    inits = [numpy_helper.from_array(rows.T.copy() if fusable else rows, "wq"),
             numpy_helper.from_array(np.array(0.01, np.float32) if fusable else rng.random(6).astype(np.float32) / 50, "ws"),
             numpy_helper.from_array(np.array(0, np.int8) if fusable else rng.integers(-3, 4, 6).astype(np.int8), "wz"),
             numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b"),
             numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
             numpy_helper.from_array(np.array(128, np.uint8), "xz")]
    if fusable:
        nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="dq_w"),
                 helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                 helper.make_node("MatMul", ["xd", "w"], ["m"]),
                 helper.make_node("QuantizeLinear", ["m", "xs", "xz"], ["mq"]),
                 helper.make_node("DequantizeLinear", ["mq", "xs", "xz"], ["y"])]
    else:
        nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=-2, name="dq_w"),
                 helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


@pytest.mark.parametrize("fusable", [False, True])
def test_weights_no_int8_kernel_reads_are_folded_exactly(fusable):
    import onnxruntime as ort

    from edgeslim.compress.int8_chains import fold_unfused_weights
    model = _head_graph(fusable)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    names = fold_unfused_weights(folded)
    onnx.checker.check_model(folded, full_check=True)
    x = np.random.default_rng(1).standard_normal((2, 5)).astype(np.float32)

    def run(m: onnx.ModelProto) -> np.ndarray:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    assert np.array_equal(run(folded), run(model))  # the values the DequantizeLinear computed, bit for bit
    if fusable:  # ORT reads these weights with an int8 kernel: left for it
        assert names == [] and folded == model
    else:
        assert names == ["dq_w"] and "DequantizeLinear" not in [n.op_type for n in folded.graph.node]
        assert {i.name for i in folded.graph.initializer} == {"w", "b", "xs", "xz"}


class Outlier(nn.Module):
    """A CNN whose second Conv reads one channel 300x larger than the others (its weights scaled down to
    match): one activation scale per tensor leaves the small channels a few levels, so that Conv is by far
    the most sensitive op; the others read balanced activations."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.mid, self.last = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.tail = nn.Conv2d(8, 8, 3, padding=1)
        with torch.no_grad():
            self.stem.weight[0] *= 300
            self.stem.bias[0] *= 300
            self.mid.weight[:, 0] /= 300
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.mid(torch.relu(self.stem(x))))
        y = torch.relu(self.tail(torch.relu(self.last(y))))
        return self.head(y.mean((2, 3)))


def test_the_most_sensitive_op_is_kept_fp32_and_replays(tmp_path):
    import onnxruntime as ort
    model = Outlier().eval()
    calib, comp, context, fp32 = _setup(model, tmp_path)
    nodes = onnx.load(str(fp32)).graph.node
    mid, head = [n.name for n in nodes if n.op_type == "Conv"][1], {n.name for n in nodes if n.op_type == "Gemm"}
    result = comp.compress(model, {"sensitive_macs": 0.5}, calib, context=context)
    sens = result.resolved["sensitivity"]
    ranking = sens["ranking"]
    assert [r["error_if_fp32"] for r in ranking] == sorted(r["error_if_fp32"] for r in ranking)
    assert ranking[0]["op"] == mid and sens["fp32_ops"][0] == mid  # the planted op: the largest measured error
    assert ranking[0]["error_if_fp32"] < 0.5 * sens["error_int8"] < ranking[1]["error_if_fp32"]
    assert sens["error"] <= ranking[0]["error_if_fp32"] and 0 < sens["macs_fp32_share"] <= 0.5
    assert [r.note for r in result.changes if f"({mid})" in r.kind] == ["kept fp32: measured sensitivity"]
    comp.onnx_stage(result.resolved, fp32, tmp_path / "q.onnx", context)  # the record replays without data
    assert mid in fp32_compute_ops(tmp_path / "q.onnx")
    x = np.concatenate([b["x"].numpy() for b in calib.batches])
    ref = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    out = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) == pytest.approx(sens["error"], rel=0.05)
    # no INT8 kernel fits a zero budget: only the head may go back (ORT runs it in fp32 anyway: no output quantizer)
    none = comp.compress(model, {"sensitive_macs": 0.0}, calib, context=context).resolved["sensitivity"]
    assert mid not in none["fp32_ops"] and none["macs_fp32_share"] == 0.0 and set(none["fp32_ops"]) <= head


def test_a_quantized_input_no_int8_kernel_reads_goes_back_to_fp32_first(tmp_path):
    model = MobileBlock().eval()
    calib, comp, context, fp32 = _setup(model, tmp_path)
    head = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Gemm"]
    # no ranked op can remove the whole error: only the free one (ORT runs the Gemm head in fp32 either way) goes
    result = comp.compress(model, {"sensitive_gain": 1.0}, calib, context=context)
    sens = result.resolved["sensitivity"]
    assert sens["free_ops"] == head and sens["fp32_ops"] == [] and sens["macs_fp32_share"] == 0.0
    assert sens["free_weights"] == head  # ORT would dequantize its int8 weight on every call: fp32 weight too
    assert sens["error"] < sens["error_int8"]
    assert [r.note for r in result.changes if f"({head[0]})" in r.kind] == [
        "kept fp32: ORT runs it in fp32 (no INT8 kernel reads its input), weights included"]
    comp.onnx_stage(result.resolved, fp32, tmp_path / "q.onnx", context)
    kept = fp32_compute_ops(tmp_path / "q.onnx")
    assert kept[head[0]] == "Gemm: no quantizer on its input"  # its Q/DQ pair is gone, not just left unfused
    graphs = [onnx.load(str(p)).graph for p in (fp32, tmp_path / "q.onnx")]
    weights = [{i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}[next(
        n for n in g.node if n.name == head[0]).input[1]] for g in graphs]
    assert np.array_equal(weights[0], weights[1])  # the fp32 weight itself, not its dequantized int8 values
    assert sum(why.startswith("Conv") for why in kept.values()) == 1  # the stem only: no Conv kernel was unfused


def test_fp32_ops_are_reverted_as_optimize_scores_them_and_replay(tmp_path):
    import onnxruntime as ort

    from edgeslim.compress.int8_sensitivity import op_quantizers, reverted
    from edgeslim.core.errors import ConfigError
    model = MobileBlock().eval()
    calib, comp, context, fp32 = _setup(model, tmp_path)
    depthwise = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv"][2]
    plain = {"stem_fp32": False, "sensitive_fp32": False}
    comp.onnx_stage(comp.compress(model, plain, calib, context=context).resolved, fp32, tmp_path / "q.onnx", context)
    result = comp.compress(model, plain | {"fp32_ops": [depthwise]}, calib, context=context)
    assert result.resolved["reverted"] and [r.note for r in result.changes if f"({depthwise})" in r.kind] == [
        "kept fp32: fp32_ops"]
    comp.onnx_stage(result.resolved, fp32, tmp_path / "m.onnx", context)  # replayed from the record, no data
    # optimize's score of that op: the all-INT8 graph with its input quantizers taken out
    all_int8 = onnx.load(str(tmp_path / "q.onnx"))
    onnx.save(reverted(all_int8, onnx.load(str(fp32)), op_quantizers(all_int8)[depthwise]), str(tmp_path / "s.onnx"))
    kept, scored = fp32_compute_ops(tmp_path / "m.onnx"), fp32_compute_ops(tmp_path / "s.onnx")
    assert depthwise in kept and set(kept) == set(scored) and len(kept) < 4  # other Convs still INT8 kernels
    mixed = onnx.load(str(tmp_path / "m.onnx"))
    node = next(n for n in mixed.graph.node if n.name == depthwise)
    weight = {i.name: i for i in mixed.graph.initializer}[node.input[1]]
    assert weight.data_type == onnx.TensorProto.FLOAT  # read straight, not through an int8 DequantizeLinear
    x = np.concatenate([b["x"].numpy() for b in calib.batches])
    outs = [ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for f in ("f.onnx", "m.onnx", "s.onnx")]
    assert np.linalg.norm(outs[1] - outs[2]) < 0.05 * np.linalg.norm(outs[1] - outs[0])  # the graph it scored
    with pytest.raises(ConfigError, match="fp32_ops \\['nope'\\] are not ops of the exported graph"):
        comp.compress(model, plain | {"fp32_ops": ["nope"]}, calib, context=context)
