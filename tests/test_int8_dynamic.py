"""Dynamic INT8 activations (compress/int8_dynamic.py): chosen for transformers where the CPU has a VNNI/AMX
dot product, replayed from settings only, int8 weights per output channel, close to fp32."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeslim import artifact, pipeline
from edgeslim.compress.int8_dynamic import weight_error
from edgeslim.compress.quantize import dynamic_mode_wins
from edgeslim.runtime import machine

pytest.importorskip("nncf")
VNNI, AVX2 = ("avx2", "avx512_vnni", "amx_int8"), ("avx2",)


@pytest.mark.parametrize("model_type, features, wins", [("transformer", VNNI, True), ("transformer", AVX2, False),
                                                        ("transformer", None, False), ("generic", VNNI, False)])
def test_auto_picks_dynamic_for_transformers_on_vnni(model_type, features, wins):
    assert dynamic_mode_wins(model_type, features) is wins


def _ops(path) -> dict[str, int]:
    ops: dict[str, int] = {}
    for n in onnx.load(str(path)).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


@pytest.mark.parametrize("cpu, mode, peak", [(VNNI, "dynamic", 127), (AVX2, "static", None)])
def test_transformer_mode_follows_the_cpu_and_replays_without_data(cpu, mode, peak, tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "int8_features", lambda: cpu)
    steps = [{"method": "int8", "calib": "random:8"}]
    _, _, results, path = pipeline.compress_to_artifact("tiny-bert", steps, tmp_path / "q.slim", quiet=True)
    resolved = results[0].resolved
    assert resolved["activations_mode"] == mode
    monkeypatch.setattr(machine, "int8_features", lambda: AVX2 if cpu == VNNI else VNNI)  # replay elsewhere
    import edgeslim.data as data

    def no_data(*args, **kwargs):
        raise AssertionError("replay must not load calibration data")
    monkeypatch.setattr(data, "load_calibration", no_data)
    info = pipeline.export_model(artifact.load(path), "onnx", tmp_path / "q.onnx", quiet=True)
    ops = _ops(info["onnx"])
    if mode == "static":
        assert "MatMulInteger" not in ops and ops.get("QuantizeLinear", 0) > 0
        return
    rows = results[0].changes
    matmuls = [r for r in rows if r.kind.startswith("MatMul")]
    assert ops["MatMulInteger"] + 3 * ops["QAttention"] == sum(r.status == "quantized" for r in matmuls) > 0
    assert sum("QAttention" in r.kind for r in matmuls) == 3 * ops["QAttention"] > 0  # q, k, v of each layer
    assert ops["DynamicQuantizeLinear"] > 0 and "QuantizeLinear" not in ops and "Gather" in ops  # embeddings fp32
    assert resolved["dynamic"]["reduce_range"] is False and resolved["calibration_rel_l2"] < 0.05
    weights = [numpy_helper.to_array(i) for i in onnx.load(str(info["onnx"])).graph.initializer
               if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert weights and all(int(np.abs(w.astype(np.int32)).max(axis=0).min()) == peak for w in weights)  # per column
    assert info["agreement"]["rel_l2"] < 0.05


def test_weight_error_is_that_of_per_column_int8():
    w = np.array([[1.0, 0.01], [-0.5, 0.02], [0.26, -0.04]])
    # column 0: step 1/127, -0.5 -> -64 steps (half to even), 0.26 -> 33; column 1: step 0.04/127, 0.01 -> 32, 0.02 -> 64
    lost = [0, -0.5 + 64 / 127, 0.26 - 33 / 127, 0.01 - 32 * 0.04 / 127, 0.02 - 64 * 0.04 / 127, 0]
    assert weight_error(w, False) == pytest.approx(np.linalg.norm(lost) / np.linalg.norm(w), rel=1e-9)
    assert weight_error(w, True) > weight_error(w, False) > 0


def test_a_dynamic_record_with_unknown_ops_is_refused(tmp_path):
    from edgeslim.compress.base import CompressContext, get_compressor
    from edgeslim.core.errors import SourceError
    record = {"activations_mode": "dynamic", "dynamic": {"op_types": ["Conv", "Attention"], "per_channel": True,
                                                         "reduce_range": False, "ignored": []}}
    with pytest.raises(SourceError, match="dynamic record"):
        get_compressor("int8").onnx_stage(record, tmp_path / "in.onnx", tmp_path / "out.onnx", CompressContext())


def test_the_dynamic_stage_is_quiet(tmp_path, caplog):
    """ORT's advice to pre-process (a root-logger warning) stays off a quiet command's stderr."""
    import logging
    from edgeslim.compress.int8_dynamic import dynamic_record, quantize_dynamic_graph
    from edgeslim.export.onnx import to_onnx
    from edgeslim.sources import load_model
    loaded = load_model("tiny-bert")
    fp32 = to_onnx(loaded.model, loaded.inputs, tmp_path / "f.onnx").path
    with caplog.at_level(logging.WARNING):
        quantize_dynamic_graph(dynamic_record("disable", ()), fp32, tmp_path / "q.onnx")
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
