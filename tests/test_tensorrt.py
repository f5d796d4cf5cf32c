"""TensorRT engines: shape ranges from the ONNX file (always), build and run (only where TensorRT imports)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.core.errors import ConfigError, MissingDependencyError, SourceError
from edgeslim.export.tensorrt import engine_shapes, to_tensorrt
from edgeslim.runtime.session import open_session
from edgeslim.runtime.targets import load_profile


class Tagger(nn.Module):
    """Token ids -> per-token logits: two dynamic axes (batch, sequence)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids))


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.fc(x)


@pytest.fixture(scope="module")
def tagger_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("trt") / "tagger.onnx"
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    torch.onnx.export(Tagger().eval(), (torch.zeros(2, 5, dtype=torch.long),), str(path), dynamo=True,
                      external_data=False, verbose=False, input_names=["ids"],
                      dynamic_shapes={"ids": {0: batch, 1: seq}})
    return path


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("trt") / "mlp.onnx"
    torch.onnx.export(Mlp().eval(), (torch.randn(2, 16),), str(path), dynamo=True, external_data=False,
                      verbose=False, input_names=["x"], dynamic_shapes={"x": {0: "batch"}})
    return path


def test_engine_shapes_from_dynamic_dims_and_profile_batches(tagger_onnx):
    profile = load_profile("cuda-trt-fp16")  # batch [1, 8, 32, 128]
    shapes = engine_shapes(tagger_onnx, profile, {"sequence": 128, "batch": 4})
    assert shapes == {"ids": ((1, 128), (32, 128), (128, 128))}
    ranged = engine_shapes(tagger_onnx, profile.override({"batch": [2, 4]}), {"sequence": (16, 64, 128)})
    assert ranged == {"ids": ((2, 16), (4, 64), (4, 128))}


def test_engine_shapes_errors(tagger_onnx, tmp_path):
    profile = load_profile("cuda-trt-fp16")
    with pytest.raises(ConfigError, match="axis 1 is dynamic \\('sequence'\\)"):
        engine_shapes(tagger_onnx, profile)
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        engine_shapes(tagger_onnx, profile, {"sequence": (64, 16, 128)})
    with pytest.raises(SourceError, match="nothing.onnx"):
        engine_shapes(tmp_path / "nothing.onnx", profile)


def test_to_tensorrt_needs_a_tensorrt_profile(mlp_onnx, tmp_path):
    with pytest.raises(ConfigError, match="'tensorrt' profile"):
        to_tensorrt(mlp_onnx, "cpu-ort-fp32", tmp_path / "m.engine")


def test_without_tensorrt_the_error_says_how_to_install(mlp_onnx, tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        to_tensorrt(mlp_onnx, "cuda-trt-fp16", tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        open_session(tmp_path / "m.engine")


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_matches_onnxruntime(mlp_onnx, tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    profile = load_profile("cuda-trt-fp16").override({"batch": [1, 4, 8]})
    engine = to_tensorrt(mlp_onnx, profile, tmp_path / "mlp.engine", workspace_mib=256)
    assert engine.is_file() and engine.stat().st_size > 0
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    with open_session(engine, profile) as trt_s, open_session(mlp_onnx, "cpu-ort-fp32") as ort_s:
        got = next(iter(trt_s.run({"x": x}).values()))
        want = next(iter(ort_s.run({"x": x}).values()))
        np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)  # fp16 engine vs fp32
        with pytest.raises(ConfigError, match="outside the engine's optimization profile"):
            trt_s.run({"x": np.zeros((9, 16), np.float32)})


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_corrupt_engine_is_a_source_error(tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"\x00not an engine" * 64)
    with pytest.raises(SourceError, match="bad.engine"):
        open_session(bad, "cuda-trt-fp16")
