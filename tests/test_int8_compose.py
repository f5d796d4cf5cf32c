"""INT8 after another compressor (asvd, mpo, prune): the artifact replays both steps without data,
exports to a QDQ ONNX whose ONNX Runtime output follows the replayed fp32 model within INT8 tolerance."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgeslim import artifact, pipeline
from edgeslim.compress.svd import LowRankLinear
from edgeslim.compress.tensornet import MPOLinear
from edgeslim.export.validate import agreement
from edgeslim.core.specs import example_feeds

pytest.importorskip("nncf")
torch.set_num_threads(1)
CALIB = "random:32"


def _first_step(method: str) -> dict:
    step = {"method": method, "ratio": 0.5, "calib": CALIB}
    return step | ({"cores": 2} if method == "mpo" else {})


def _structure(model: torch.nn.Module, method: str) -> bool:
    """The first step is present after replay: its layers, or (prune) fewer hidden units."""
    if method == "asvd":
        return any(isinstance(m, LowRankLinear) for m in model.modules())
    if method == "mpo":
        return any(isinstance(m, MPOLinear) for m in model.modules())
    widths = [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return widths[:2] != [64, 64]  # tiny-mlp is 16-64-64-8


@pytest.mark.parametrize("method", ["asvd", "mpo", "prune"])
def test_int8_after_another_compressor(method, tmp_path, monkeypatch):
    steps = [_first_step(method), {"method": "int8", "calib": CALIB}]
    _, compressed, results, path = pipeline.compress_to_artifact("tiny-mlp", steps, tmp_path / "c.slim", quiet=True)
    assert [r.method for r in results] == [method, "int8"]
    assert any(c.status == "quantized" for c in results[1].changes)

    def no_data(*args, **kwargs):
        raise AssertionError("an INT8 artifact must export without calibration data")
    monkeypatch.setattr(pipeline, "load_calibration", no_data)
    loaded = artifact.load(path)
    assert [s["method"] for s in loaded.steps] == [method, "int8"] and _structure(loaded.model, method)
    feeds = example_feeds(loaded.inputs, {"batch": 6}, seed=3)
    with torch.inference_mode():  # the replayed fp32 model is the compressed one, bit for bit
        np.testing.assert_array_equal(loaded.model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy(),
                                      compressed.model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy())
    info = pipeline.export_model(loaded, "onnx", tmp_path / "c.onnx", quiet=True)
    assert info["onnx_stages"] == ["int8"] and info["precision"] == "int8"
    graph = onnx.load(info["onnx"]).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    assert any(i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2 for i in graph.initializer)
    # INT8 tolerance, against the fp32 compressed model: a seeded random 16-64-64-8 MLP has small,
    # spread outputs, so 8-bit activations leave ~10-15 % relative error (SNR 17-20 dB measured);
    # a broken replay or a wrong scale gives ~100 %.
    check = agreement(info["onnx"], loaded.model, feeds)
    assert check["rel_l2"] < 0.25 and check["cosine_mean"] > 0.98, check
