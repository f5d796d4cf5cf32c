"""Conv shapes for ORT's fast INT8 conv kernel, the two input planes and the output bias correction
(compress/int8_kernels.py, quantize.py)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.compress.base import CompressContext, get_compressor
from edgeslim.compress.int8_kernels import CHANNEL_BLOCK
from edgeslim.compress.int8_record import probe_values
from edgeslim.export.onnx import to_onnx
from edgeslim.core.specs import TensorSpec

pytest.importorskip("nncf")
torch.set_num_threads(1)
SPEC = [TensorSpec("x", ("batch", 1, "height", "width"))]
SR = CompressContext(inputs=tuple(SPEC), task="super-resolution")


class TinyESPCN(nn.Module):
    """ESPCN x3's layout, small: 5 x 5 stem on one channel, tanh, 3 x 3, tanh, 3 x 3 to 9, DepthToSpace."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 16, 5, padding=2), nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(8, 9, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pixel_shuffle(self.c3(torch.tanh(self.c2(torch.tanh(self.c1(x))))), 3)


class Strided(nn.Module):
    """A one-channel 3 x 3 stem with stride 2 and a 1 x 1 conv to 4 channels as the graph output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.c1, self.c2 = nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.c1(x)))


def _calib(seed: int = 0) -> CalibData:
    g = torch.Generator().manual_seed(seed)
    return CalibData("tiny", [{"x": torch.rand(4, 1, 16, 16, generator=g)} for _ in range(3)])


def _run(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _export(model, tmp, tag: str, context=SR, **config):
    comp = get_compressor("int8")
    result = comp.compress(model, config, _calib(), context=context)
    fp32 = to_onnx(model, SPEC, tmp / "fp32.onnx").path
    comp.onnx_stage(result.resolved, fp32, tmp / f"{tag}.onnx", context)
    return result, tmp / f"{tag}.onnx", fp32


def _convs(path) -> list:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]


@pytest.mark.parametrize("net,context", [(TinyESPCN, SR), (Strided, CompressContext(inputs=tuple(SPEC)))])
def test_conv_kernels_change_shapes_not_values(tmp_path, net, context):
    model = net().eval()
    config = {"stem_fp32": False, "sensitive_fp32": False, "fine_input": False}
    _, shaped, _ = _export(model, tmp_path, "shaped", context, **config)
    _, plain, _ = _export(model, tmp_path, "plain", context, conv_kernels=False, **config)
    stem, *_, last = _convs(shaped)
    weights = {i.name: i.dims for i in onnx.load(str(shaped)).graph.initializer}
    kernel = [a.ints for a in stem.attribute if a.name == "kernel_shape"][0]
    stem_w = next(weights[n] for n in weights if n.startswith("q_output_") and weights[n][0] == 16 and len(weights[n]) == 4
                  and weights[n][3] == 1)
    assert list(kernel)[1] == 1 and stem_w[1] % 4 == 0  # kh x 1 on column shifts, channels in fours
    assert any(n.op_type == "Slice" and n.name == f"{last.name}_channels" for n in onnx.load(str(shaped)).graph.node)
    assert max(d[0] for n, d in weights.items() if n.startswith("q_output_")) == CHANNEL_BLOCK  # 9 or 4 -> 16
    x = np.random.default_rng(3).random((2, 1, 11, 14), dtype=np.float32)
    np.testing.assert_array_equal(_run(shaped, x), _run(plain, x))  # the same integer sums: bit for bit
    onnx.shape_inference.infer_shapes(onnx.load(str(shaped)), data_prop=True)  # no stale recorded shape or type


def test_two_input_planes_read_8_bit_pixels_exactly_and_the_rest_finer(tmp_path):
    model = TinyESPCN().eval()
    config = {"stem_fp32": False, "sensitive_fp32": False, "output_bias_correction": False, "conv_kernels": False}
    result, one, fp32 = _export(model, tmp_path, "one", fine_input=False, **config)
    assert result.resolved["fine_input"] is False  # and the default turns it on for a quantized stem on the image grid
    assert _export(model, tmp_path, "auto", stem_fp32=False, sensitive_fp32=False)[0].resolved["fine_input"] is True
    planes = _export(model, tmp_path, "two", fine_input=True, **config)[1]
    assert [n.op_type for n in onnx.load(str(planes)).graph.node].count("Concat") == 1  # the two planes
    k = np.random.default_rng(0).integers(0, 256, (2, 1, 12, 15))
    on_grid = (k / 255.0).astype(np.float32)  # what an app's 8-bit pixels are
    np.testing.assert_array_equal(_run(planes, on_grid), _run(one, on_grid))
    x = np.random.default_rng(1).random((4, 1, 12, 15), dtype=np.float32)  # off the grid (BT.601 luma is)
    stem = _convs(one)[0]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(one)).graph.initializer}
    dq = next(n for n in onnx.load(str(one)).graph.node if n.output[0] == stem.input[1])
    weight = inits[dq.input[0]].astype(np.float32) * inits[dq.input[1]].reshape(-1, 1, 1, 1)
    ref = nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(inits[stem.input[2]]),
                               padding=2).numpy()  # the int8 weights on the exact input: only the input's error left
    z = stem.output[0]
    errors = [np.abs(probe_values(onnx.load(str(p)), [z], [{"x": x}])[z][0] - ref).mean() for p in (one, planes)]
    assert errors[1] < 0.4 * errors[0]  # the input read to 1/16 of a step, not half of one (4-bit weights on the rest)


def test_the_input_grid_is_lossless_on_k_over_255(tmp_path):
    from onnx import helper, TensorProto
    result = _export(TinyESPCN().eval(), tmp_path, "q", fine_input=False)[0]
    grid = [q for q in result.resolved["activations"].values() if q["zero_point"] == 0 and q["dtype"] == "uint8"
            and q["scale"] == 1 / 255]
    assert grid  # the input quantizer is on the image's grid
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])], "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256])], [helper.make_tensor_value_info("q", TensorProto.UINT8, [256])],
        [onnx.numpy_helper.from_array(np.array(grid[0]["scale"], np.float32), "s"), onnx.numpy_helper.from_array(np.array(0, np.uint8), "z")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(tmp_path / "q.onnx"))
    k = np.arange(256)
    np.testing.assert_array_equal(_run(tmp_path / "q.onnx", (k / 255.0).astype(np.float32)), k)  # each pixel its byte


def test_output_bias_correction_matches_the_fp32_channel_means_of_the_final_graph(tmp_path):
    model = TinyESPCN().eval()
    result, path, fp32 = _export(model, tmp_path, "q")
    assert len(result.resolved["output_bias_correction"]) == 1 and "c3.bias" in result.resolved["changed"]
    plain = _export(model, tmp_path, "plain", output_bias_correction=False)[1]
    batches = [{k: v.numpy() for k, v in b.items()} for b in _calib().batches]
    z = _convs(path)[-1].output[0]  # the last conv's output before its quantizer (padded to 16 channels here)

    def means(p) -> np.ndarray:
        values = np.concatenate(probe_values(onnx.load(str(p)), [z], batches)[z])
        return values[:, :9].mean(axis=(0, 2, 3))

    want = means(fp32)
    assert np.abs(means(path) - want).max() < 1e-5 < np.abs(means(plain) - want).max()
