"""ONNX export: parity in ONNX Runtime, dynamic axes, and validation that names the culprit."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgeslim.core.errors import ExportValidationError, SourceError
from edgeslim.export.onnx import onnx_inputs, to_onnx
from edgeslim.export.validate import check_parity
from edgeslim.sources import load_model
from edgeslim.core.specs import TensorSpec, example_feeds


def test_mlp_parity_and_dynamic_batch(tmp_path):
    loaded = load_model("tiny-mlp")
    res = to_onnx(loaded.model, loaded.inputs, tmp_path / "m.onnx")
    assert res.path.is_file() and res.file_bytes == res.path.stat().st_size
    assert len(res.checks) == 2 and all(c.ok for c in res.checks)  # two batch sizes validated
    x = np.random.default_rng(0).standard_normal((7, 16)).astype(np.float32)
    out = ort.InferenceSession(str(res.path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, loaded.model(x=torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    assert onnx_inputs(res.path) == [TensorSpec("x", ("batch", 16))]


def test_export_leaves_the_model_mode_and_the_onnx_logger_as_they_were(tmp_path):
    import logging
    loaded = load_model("tiny-mlp")
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    loaded.model.train()
    to_onnx(loaded.model, loaded.inputs, tmp_path / "m.onnx")
    assert loaded.model.training and logger.level == level


def test_text_model_dynamic_batch_and_sequence(tmp_path):
    loaded = load_model("tiny-bert")
    res = to_onnx(loaded.model, loaded.inputs, tmp_path / "bert.onnx")
    feeds = example_feeds(loaded.inputs, {"batch": 3, "sequence": 11}, seed=4) | {}
    feeds["input_ids"] %= 120
    rows = check_parity(res.path, loaded.model, feeds)
    assert rows[0].onnx_shape == (3, 32)
    assert [s.shape for s in onnx_inputs(res.path)] == [("batch", "sequence"), ("batch", "sequence")]


class Drifting(nn.Module):
    """Its eager output changes after tracing (a Python-side counter), like a layer that exports wrongly."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.register_buffer("k", torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        self.calls += 1
        return x * (self.k * self.calls)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.block = Drifting()
        self.post = nn.Linear(4, 2)

    def forward(self, x):
        return self.post(self.block(self.pre(x)))


def test_divergence_is_reported_with_module_and_nothing_written(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(ExportValidationError) as err:
        to_onnx(Net(), [TensorSpec("x", ("batch", 4))], tmp_path / "net.onnx")
    msg = str(err.value)
    assert "output" in msg and "FAIL" in msg and "max|diff|" in msg
    assert "first diverging module: block" in msg and str(tmp_path / "net.onnx") in msg and ".tmp" not in msg
    assert not (tmp_path / "net.onnx").exists() and list(tmp_path.iterdir()) == []


def test_corrupt_onnx_file(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(SourceError):
        check_parity(tmp_path / "bad.onnx", nn.Identity(), {"x": np.zeros((1, 1), np.float32)})
    with pytest.raises(SourceError, match="cannot read ONNX"):
        onnx_inputs(tmp_path / "bad.onnx")
