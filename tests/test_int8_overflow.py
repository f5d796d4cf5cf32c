"""INT8 weights are 7-bit where the target CPU needs it (NNCF's overflow fix on every Conv/MatMul): x86 CPUs without VNNI
multiply uint8 x int8 with vpmaddubsw, whose int16 pair sums saturate on full 8-bit weights; int8
activation quantizers become uint8 so ORT fuses every Conv between two of them."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeslim import pipeline

pytest.importorskip("nncf")


def _int8_weights(path) -> list[np.ndarray]:
    graph = onnx.load(str(path)).graph
    return [numpy_helper.to_array(i) for i in graph.initializer
            if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]


@pytest.mark.parametrize("fix", ["enable", "disable"])
def test_weight_range_follows_overflow_fix(fix, tmp_path):
    steps = [{"method": "asvd", "ratio": 0.5, "calib": "random:32"},
             {"method": "int8", "calib": "random:32", "overflow_fix": fix}]
    loaded, _, results, path = pipeline.compress_to_artifact("tiny-mlp", steps, tmp_path / "q.slim", quiet=True)
    assert results[1].resolved["nncf"]["overflow_fix"] == fix
    from edgeslim import artifact
    info = pipeline.export_model(artifact.load(path), "onnx", tmp_path / "q.onnx", quiet=True)
    weights = _int8_weights(info["onnx"])
    assert len(weights) >= 3  # every factor of every layer, and the dense head
    peak = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    # 7 bits: within [-64, 64]; 8 bits: every per-channel quantizer reaches +-127 on its largest weight
    assert (peak <= 64) if fix != "disable" else (peak >= 127), peak


def test_unknown_overflow_fix_is_refused():
    from edgeslim.compress.base import get_compressor
    from edgeslim.core.errors import ConfigError
    with pytest.raises(ConfigError, match="overflow_fix"):
        get_compressor("int8").make_config({"overflow_fix": "sometimes"})


def test_int8_activations_become_uint8_losslessly():
    """A Conv between a uint8 and an int8 quantizer is not fused by ORT; the int8 zero point + 128 gives
    the same values as uint8, and the recorded types follow."""
    from onnx import TensorProto, helper
    from edgeslim.compress.int8_chains import unsigned_activations
    inits = [numpy_helper.from_array(np.full((2, 2, 1, 1), 100, np.int8), "w"),
             numpy_helper.from_array(np.array(0.01, np.float32), "ws"), numpy_helper.from_array(np.array(0, np.int8), "wz"),
             numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(-3, np.int8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"]),
             helper.make_node("Conv", ["xd", "wd"], ["c"]),
             helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.graph.value_info.extend([helper.make_tensor_value_info("z", TensorProto.INT8, [])])  # as NNCF records it
    import onnxruntime as ort
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 3)).astype(np.float32) * 5

    def run(m):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the Q/DQ arithmetic itself
        return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    before = run(model)
    assert unsigned_activations(model) == 1
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert arrays["z"].dtype == np.uint8 and int(arrays["z"]) == 125 and arrays["wz"].dtype == np.int8  # weights stay
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    np.testing.assert_array_equal(run(model), before)


@pytest.mark.parametrize("features, fix", [(("avx2",), "enable"), (("avx2", "avx512_vnni"), "disable"),
                                           (("avx2", "avx_vnni"), "disable"), (("avx2", "amx_int8"), "disable"),
                                           ((), "enable"), (None, "enable")])
def test_auto_overflow_fix_follows_the_cpu(features, fix):
    from edgeslim.compress.quantize import resolve_overflow_fix
    assert resolve_overflow_fix("auto", features) == fix
    assert resolve_overflow_fix("first_layer", features) == "first_layer"  # a setting the user wrote is kept


@pytest.mark.parametrize("cpu, other, fix", [(("avx2",), ("avx2", "avx512_vnni", "amx_int8"), "enable"),
                                             (("avx2", "avx512_vnni", "amx_int8"), ("avx2",), "disable")])
def test_default_overflow_fix_is_the_compressing_cpus_and_replays_anywhere(cpu, other, fix, tmp_path, monkeypatch):
    """Whatever CPU runs the tests: the INT8 features are set, the default follows them into the record, and
    an export on a CPU with the other features rebuilds the recorded weights, not its own choice."""
    from edgeslim import artifact
    from edgeslim.runtime import machine
    monkeypatch.setattr(machine, "int8_features", lambda: cpu)
    steps = [{"method": "asvd", "ratio": 0.5, "calib": "random:32"}, {"method": "int8", "calib": "random:32"}]
    _, _, results, path = pipeline.compress_to_artifact("tiny-mlp", steps, tmp_path / "q.slim", quiet=True)
    resolved = results[1].resolved
    assert resolved["nncf"]["overflow_fix"] == fix and resolved["overflow_fix_for"] == list(cpu)
    monkeypatch.setattr(machine, "int8_features", lambda: other)
    info = pipeline.export_model(artifact.load(path), "onnx", tmp_path / "q.onnx", quiet=True)
    peak = max(int(np.abs(w.astype(np.int32)).max()) for w in _int8_weights(info["onnx"]))
    assert (peak <= 64) if fix == "enable" else (peak >= 127), peak


def test_a_record_with_an_unknown_overflow_fix_is_refused():
    from edgeslim.compress.int8_record import check_record
    from edgeslim.core.errors import SourceError
    record = {"opset": 20, "activations": {}, "changed": {}, "nncf": {"overflow_fix": "auto"}}
    with pytest.raises(SourceError, match="overflow fix 'auto'"):
        check_record(record, "test")
    check_record(record | {"nncf": {"overflow_fix": "disable"}}, "test")


@pytest.mark.parametrize("cpu, warned", [(("avx2",), True), (("avx2", "avx512_vnni"), False)])
def test_profile_int8_warns_once_on_a_cpu_without_vnni(cpu, warned, in_tmp, monkeypatch):
    """`profile --profile cpu-ort-int8` refuses nothing on AVX2 but says, once, what INT8 can give there and
    which compute ops ORT keeps in fp32 (tiny-mlp's last Gemm: ORT fuses no QDQ Gemm without an output Q)."""
    from edgeslim.cli import main
    from edgeslim.runtime import machine
    assert main(["compress", "tiny-mlp", "-m", "int8", "--calib", "random:32", "-o", "a.slim"]) == 0
    monkeypatch.setattr(machine, "int8_features", lambda: cpu)
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a warning raised per batch would show twice
        assert main(["profile", "a.slim", "--profile", "cpu-ort-int8", "--batch", "1,2", "--iters", "3"]) == 0
    lines = [str(w.message) for w in caught if "VNNI/AMX" in str(w.message)]
    if not warned:
        assert lines == []
        return
    assert len(lines) == 1 and "at most about 2x fp32" in lines[0], lines
    assert "ops that stay fp32: 1: " in lines[0] and "(Gemm: its input is dequantized but not fused)" in lines[0]
