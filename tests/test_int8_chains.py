"""Conv -> Tanh as QLinearConv + ORT's quantized sigmoid table (compress/int8_chains.py)."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.compress.base import CompressContext, get_compressor
from edgeslim.compress.int8_chains import SIGMOID_EDGE, chain_sites, uint8_grid
from edgeslim.core.errors import ExportValidationError
from edgeslim.export.onnx import to_onnx
from edgeslim.core.specs import TensorSpec

pytest.importorskip("nncf")
torch.set_num_threads(1)
SPEC = [TensorSpec("x", ("batch", 1, "height", "width"))]


class TanhNet(nn.Module):
    """ESPCN-like: conv-tanh-conv-tanh-conv, zero padding everywhere."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 16, 5, padding=2), nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(torch.tanh(self.c2(torch.tanh(self.c1(x)))))


def _session(path, level=None):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if level is not None:
        opts.graph_optimization_level = level
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chains")
    model = TanhNet().eval()
    g = torch.Generator().manual_seed(0)
    calib = CalibData("tiny", [{"x": torch.rand(4, 1, 16, 16, generator=g)} for _ in range(4)])
    comp, context = get_compressor("int8"), CompressContext(inputs=tuple(SPEC))
    results = {flag: comp.compress(model, {"tanh_table": flag, "stem_fp32": False}, calib, context=context)
               for flag in (True, False)}  # the stem in int8 too: both Conv -> Tanh sites are chains
    fp32 = to_onnx(model, SPEC, tmp / "f.onnx").path
    paths = {}
    for flag, result in results.items():
        paths[flag] = tmp / f"q{int(flag)}.onnx"
        comp.onnx_stage(result.resolved, fp32, paths[flag], context)
    return model, results, paths, fp32, tmp


def test_the_table_encodes_tanh_on_its_grid():
    z = np.linspace(-8, 8, 20001)
    q = np.clip(np.round(256 / (1 + np.exp(-2 * z))), 0, 255)  # QLinearSigmoid output on scale 1/256, zp 0
    h = (q - 128) / 128  # what the next DequantizeLinear reads (scale 1/128, zero point 128)
    assert np.max(np.abs(h - np.tanh(z))) <= 1 / 128 + 1e-9  # the same step as an int8 quantizer of tanh
    assert h[np.argmin(np.abs(z))] == 0.0  # zero padding (q = zero point 128) is tanh(0) exactly
    assert 1 / (1 + np.exp(-SIGMOID_EDGE)) * 256 == pytest.approx(255.5)  # past the edge the table is flat


def test_uint8_grid_holds_zero_exactly():
    scale, zp = uint8_grid(-1.3, 2.2)
    assert scale == pytest.approx(3.5 / 255) and -zp * scale == pytest.approx(-1.3, abs=scale / 2)
    assert uint8_grid(0.2, 0.9)[1] == 0  # zero is kept in range, at the bottom


def test_records_sites_and_ort_runs_an_int8_chain(made):
    model, results, paths, fp32, tmp = made
    sites = results[True].resolved["tanh_table"]
    assert len(sites) == 2 and results[False].resolved["tanh_table"] == {}
    assert all(-SIGMOID_EDGE <= lo < 0 < hi <= SIGMOID_EDGE for lo, hi in sites.values())
    import onnxruntime as ort
    opt = tmp / "opt.onnx"
    opts = ort.SessionOptions()
    opts.optimized_model_filepath, opts.log_severity_level = str(opt), 3
    ort.InferenceSession(str(paths[True]), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(opt)).graph.node]
    assert ops.count("QLinearSigmoid") == 2 and ops.count("QLinearConv") >= 2 and "Tanh" not in ops
    plain = onnx.load(str(paths[False]))  # without the table the same Convs feed the Tanhs, in fp32: ORT cannot
    assert {n.input[0] for n in plain.graph.node if n.op_type == "Tanh"} == set(sites)  # fuse a Conv -> Tanh
    assert chain_sites(plain) == []  # so their weights were folded (no per-call DequantizeLinear)


def test_the_chain_follows_fp32_within_int8_tolerance(made):
    model, results, paths, fp32, _ = made
    x = {"x": np.random.default_rng(1).random((2, 1, 20, 24), dtype=np.float32)}
    with torch.inference_mode():
        ref = model(x=torch.from_numpy(x["x"])).numpy()
    import onnxruntime as ort
    err = {}
    for flag in (False, True):
        for fused in (False, True):  # ORT's INT8 kernels, and the plain Q/DQ arithmetic they stand for
            level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fused else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            out = _session(paths[flag], level).run(None, x)[0]
            err[flag, fused] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    # the table adds one 8-bit rounding per site (the pre-tanh Conv output): about twice NNCF's own error
    # here (measured 0.022 vs 0.012; this net's Conv output is the graph output, so no bias correction)
    assert err[True, True] < 0.08 and err[True, True] < 2.5 * err[False, True], err
    assert err[True, True] == pytest.approx(err[True, False], rel=0.1), err  # no kernel saturation


def test_a_missing_site_is_refused(made):
    _, results, _, fp32, tmp = made
    resolved = copy.deepcopy(results[True].resolved)
    resolved["tanh_table"]["no_such_tensor"] = [-1.0, 1.0]
    with pytest.raises(ExportValidationError, match="no_such_tensor"):
        get_compressor("int8").onnx_stage(resolved, fp32, tmp / "bad.onnx", CompressContext(inputs=tuple(SPEC)))


class ShuffleNet(nn.Module):
    """ESPCN's tail: conv-relu-conv -> PixelShuffle (DepthToSpace in ONNX) as the graph output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.c1, self.c2, self.shuffle = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 9, 3, padding=1), nn.PixelShuffle(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.c2(torch.relu(self.c1(x))))


def _optimized_ops(path, tmp) -> list[str]:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.optimized_model_filepath, opts.log_severity_level = str(tmp / "opt_ops.onnx"), 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp / "opt_ops.onnx")).graph.node]


def test_a_conv_output_becomes_uint8_and_depth_to_space_runs_on_bytes(tmp_path):
    model = ShuffleNet().eval()
    g = torch.Generator().manual_seed(0)
    calib = CalibData("tiny", [{"x": torch.rand(4, 1, 12, 12, generator=g)} for _ in range(4)])
    comp, context = get_compressor("int8"), CompressContext(inputs=tuple(SPEC))
    fp32 = to_onnx(model, SPEC, tmp_path / "f.onnx").path
    config = {"stem_fp32": False, "sensitive_fp32": False, "output_bias_correction": False}  # the same biases
    results = {flag: comp.compress(model, config | {"quantize_output": flag}, calib,
                                   context=context) for flag in (True, False)}  # both convs INT8: no op kept by sensitivity
    paths = {flag: tmp_path / f"q{int(flag)}.onnx" for flag in results}
    for flag, result in results.items():
        comp.onnx_stage(result.resolved, fp32, paths[flag], context)
    sites = results[True].resolved["output_ranges"]
    assert len(sites) == 1 and results[False].resolved["output_ranges"] == {}
    assert _optimized_ops(paths[True], tmp_path).count("QLinearConv") == 2
    assert _optimized_ops(paths[False], tmp_path).count("QLinearConv") == 1
    graph = onnx.load(str(paths[True])).graph
    d2s = next(n for n in graph.node if n.op_type == "DepthToSpace")
    assert d2s.input[0].startswith("chain_q_") and graph.node[-1].op_type == "DequantizeLinear"
    # the moved DepthToSpace is exact: the same bytes as DequantizeLinear before DepthToSpace
    import onnxruntime as ort
    unmoved = onnx.load(str(paths[False]))
    conv = next(n for n in unmoved.graph.node if n.op_type == "Conv" and n.output[0] in sites)
    from edgeslim.compress.int8_chains import _quantize_output
    _quantize_output(unmoved, conv, *uint8_grid(*sites[conv.output[0]]))
    x = {"x": np.random.default_rng(2).random((2, 1, 10, 14), dtype=np.float32)}
    plain = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    moved_out = _session(paths[True], plain).run(None, x)[0]
    onnx.save(unmoved, str(tmp_path / "unmoved.onnx"))
    unmoved_out = _session(tmp_path / "unmoved.onnx", plain).run(None, x)[0]
    np.testing.assert_array_equal(moved_out, unmoved_out)
    with torch.inference_mode():
        ref = model(x=torch.from_numpy(x["x"])).numpy()
    fused = _session(paths[True]).run(None, x)[0]
    scale = uint8_grid(*sites[conv.output[0]])[0]
    assert np.abs(fused - ref).max() < 0.1 * np.abs(ref).max() and moved_out.shape == ref.shape
    assert float(np.abs(fused - moved_out).max()) <= 2 * scale + 1e-6  # fused kernels: at most a rounding step off
    assert results[True].resolved["output_grid"] == "calibrated"
    sr = comp.compress(model, {"stem_fp32": False, "sensitive_fp32": False}, calib, context=CompressContext(inputs=tuple(SPEC), task="super-resolution"))
    assert sr.resolved["output_grid"] == "image" and list(sr.resolved["output_ranges"].values()) == [[0.0, 1.0]]
    inputs = [q for q in sr.resolved["activations"].values() if q["dtype"] == "uint8" and q["zero_point"] == 0]
    assert {"scale": 1 / 255, "zero_point": 0, "dtype": "uint8"} in inputs  # the image's input grid: 8-bit values exact
    assert results[True].resolved["activations"] != sr.resolved["activations"]  # calibrated elsewhere
    comp.onnx_stage(sr.resolved, fp32, tmp_path / "sr.onnx", context)
    image = _session(tmp_path / "sr.onnx", plain).run(None, x)[0]  # the bytes an app writes, as they are
    np.testing.assert_allclose(image * 255, np.rint(image * 255), atol=1e-3)
    assert image.min() >= 0.0 and image.max() <= 1.0
    resolved = copy.deepcopy(results[True].resolved)
    resolved["output_ranges"]["no_such_conv"] = [0.0, 1.0]
    with pytest.raises(ExportValidationError, match="no_such_conv"):
        comp.onnx_stage(resolved, fp32, tmp_path / "bad.onnx", context)


def test_table_range_fits_the_calibration_values():
    """A range tighter than the calibrated one where tanh is flat: lower chain error on heavy-tailed 2z, and
    never higher than the calibrated range's (it is a candidate)."""
    from edgeslim.compress.int8_chains import table_error, table_range
    rng = np.random.default_rng(0)
    t = np.concatenate([rng.standard_normal(50_000), rng.choice([-6.0, 6.0], 50)])  # a few large outputs
    fitted = table_range(t, -6.0, 6.0)
    assert -6.0 < fitted[0] < -2 and 2 < fitted[1] < 6.0
    assert table_error(t, *fitted) < 0.6 * table_error(t, -6.0, 6.0)
    wide = rng.uniform(-6, 6, 20_000)  # values everywhere: nothing to gain by clipping
    assert table_error(wide, *table_range(wide, -6.0, 6.0)) <= table_error(wide, -6.0, 6.0)
    assert table_error(np.zeros(10), -1.0, 1.0) == 0.0  # 0 maps to the table's middle byte: h = 0 exactly
