"""INT8 bias correction of grouped (depthwise) convs, in graph order (compress/int8_grouped_bias.py)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edgeslim.compress.base import CompressContext, get_compressor
from edgeslim.compress.int8_grouped_bias import channel_means, correct_grouped_biases, grouped_convs
from edgeslim.compress.int8_record import probe_values
from edgeslim.core.calib import CalibData
from edgeslim.core.specs import TensorSpec
from edgeslim.export.onnx import to_onnx

nncf = pytest.importorskip("nncf")
SPEC = [TensorSpec("x", ("batch", 3, 16, 16))]


class TwoDepthwise(nn.Module):
    """Two depthwise convs in a chain (each + ReLU6) between pointwise convs: the second one's input carries
    the first one's quantization error, so its correction depends on the first one's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 1), nn.ReLU6())
        self.dw1 = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.ReLU6())
        self.dw2 = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.ReLU6())
        self.project = nn.Conv2d(12, 6, 1)
        with torch.no_grad():  # BN-folded depthwise weights: a few large taps per channel
            for conv in (self.dw1[0], self.dw2[0]):
                conv.weight.mul_(torch.rand(12, 1, 1, 1) * 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.dw2(self.dw1(self.stem(x)))).mean((2, 3))


def _setup(tmp_path):
    model = TwoDepthwise().eval()
    g = torch.Generator().manual_seed(0)
    calib = CalibData("tiny", [{"x": torch.rand(8, 3, 16, 16, generator=g) * 4} for _ in range(4)])
    return model, calib, to_onnx(model, SPEC, tmp_path / "f.onnx").path


def _biases(model) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("bias")}


def test_each_grouped_conv_ends_with_the_fp32_channel_means_in_graph_order(tmp_path):
    _, calib, path = _setup(tmp_path)
    fp32 = onnx.load(str(path))
    batches = [{"x": b["x"].numpy()} for b in calib.batches]
    quantized = nncf.quantize(fp32, nncf.Dataset(batches), subset_size=len(batches))
    before = _biases(quantized)
    convs = grouped_convs(quantized)
    assert len(convs) == 2  # the two depthwise convs; the pointwise ones are not grouped
    outs = [c.output[0] for c in convs]
    want, got = probe_values(fp32, outs, batches), probe_values(quantized, outs, batches)
    assert max(np.abs(channel_means(want[o]) - channel_means(got[o])).max() for o in outs) > 1e-3  # a shift to fix
    changes = correct_grouped_biases(fp32, quantized, batches, progress=False)
    assert sorted(changes) == sorted(c.name for c in convs) and min(changes.values()) > 0
    got = probe_values(quantized, outs, batches)
    for o in outs:  # measured one after the other: all at once, the second would carry the first's shift twice
        np.testing.assert_allclose(channel_means(got[o]), channel_means(want[o]), atol=1e-4)
    after = _biases(quantized)
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert moved == {c.input[2] for c in convs}  # ungrouped convs' biases are NNCF's, untouched


def test_compress_records_the_corrected_biases_and_the_export_replays_them(tmp_path):
    model, calib, path = _setup(tmp_path)
    comp, context = get_compressor("int8"), CompressContext(inputs=tuple(SPEC))
    on = comp.compress(model, {"sensitive_fp32": False, "stem_fp32": False}, calib, context=context).resolved
    off = comp.compress(model, {"sensitive_fp32": False, "stem_fp32": False, "grouped_bias_correction": False},
                        calib, context=context).resolved
    dw_biases = {n.input[2] for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"
                 and any(a.name == "group" and a.i > 1 for a in n.attribute)}
    assert len(dw_biases) == 2
    assert sorted(on["grouped_bias_correction"]) and "grouped_bias_correction" not in off
    assert dw_biases <= set(on["changed"]) and not dw_biases & set(off["changed"])
    comp.onnx_stage(on, path, tmp_path / "q.onnx", context)
    replayed = _biases(onnx.load(str(tmp_path / "q.onnx")))
    for name in dw_biases:
        np.testing.assert_array_equal(replayed[name], np.asarray(on["changed"][name], dtype=np.float32))
