"""wq in the file: a causal LM's cache graph keeps its int4/int8 weights as MatMulNBits (export/nbits.py),
agrees with the fake-quantized torch model, is about 4.5 bits per weight, and replays from the artifact."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("nncf")

from edgeslim.cli import main  # noqa: E402
from edgeslim.export.nbits import QuantizedMatrix, block_size, lower_matmul_nbits, nbits_tensors  # noqa: E402
from tiny_lm import llama_folder  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return llama_folder(tmp_path_factory.mktemp("nbits") / "tiny-llama", hidden=128, positions=192)


def weight_bytes(path) -> int:
    return sum(len(i.raw_data) for i in onnx.load(str(path)).graph.initializer)


def export(item, out, capsys):
    assert main(["export", str(item), "--kv-cache", "-o", str(out), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_int4_and_int8_files(folder, tmp_path, capsys):
    fp32 = export(folder, tmp_path / "fp32.onnx", capsys)
    assert fp32["matmul_nbits"] == 0
    sizes = {}
    for mode in ("int4", "int8"):
        slim = tmp_path / f"{mode}.slim"
        assert main(["compress", str(folder), "-m", "wq", "--set", f"mode={mode}", "--set", "group_size=32",
                     "-o", str(slim), "--json"]) == 0
        capsys.readouterr()
        info = export(slim, tmp_path / f"{mode}.onnx", capsys)  # the artifact replays with no data
        assert info["matmul_nbits"] == 2 * 7 + 1  # q k v o gate up down per layer, and the tied head
        assert info["greedy_prompts_equal"] == 3 and max(info["max_abs_diff"].values()) < 1e-4
        ops = {n.op_type for n in onnx.load(info["onnx"]).graph.node}
        assert "MatMulNBits" in ops
        sizes[mode] = weight_bytes(info["onnx"])
    base = weight_bytes(fp32["onnx"])
    # int4 g32: 4 bits + a 32-bit scale and a 4-bit zero point per 32 weights (the tied head/embedding
    # is int8, NNCF's default); int8: 8 bits + per-row scale
    assert sizes["int4"] / base < 0.30
    assert 0.25 < sizes["int8"] / base < 0.30
    # int8 activations: exact at accuracy level 0 first, then checked at the looser tolerance
    out = tmp_path / "int4-acc4.onnx"
    assert main(["export", str(tmp_path / "int4.slim"), "--kv-cache", "--nbits-accuracy", "4", "-o", str(out),
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert any("accuracy_level 4" in n for n in info["export_notes"])
    from edgeslim.export import kv_cache
    from edgeslim.lm_profile import cache_graph_file

    def levels_of(graph):
        return {a.i for n in onnx.load(str(graph)).graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                if a.name == "accuracy_level"}
    assert levels_of(out) == {4}
    with cache_graph_file(str(tmp_path / "int4.slim"), quiet=True) as graph:  # what generate / profile of a .slim run
        assert levels_of(graph) == {4}
    with pytest.MonkeyPatch.context() as patch:  # int8 activations drifting too far: level 0, with a warning
        patch.setattr(kv_cache, "ACTIVATION_REL", -1.0)
        with pytest.warns(RuntimeWarning, match="accuracy level 0"), \
                cache_graph_file(str(tmp_path / "int4.slim"), quiet=True) as graph:
            assert levels_of(graph) == {0}
        # `export --nbits-accuracy 4` itself refuses the drift: an export error, no file
        refused = tmp_path / "int4-drifting.onnx"
        assert main(["export", str(tmp_path / "int4.slim"), "--kv-cache", "--nbits-accuracy", "4", "-o",
                     str(refused)]) == 5
        assert "with int8 activations" in capsys.readouterr().err and not refused.exists()
    assert main(["export", str(folder), "--nbits-accuracy", "4", "-o", str(tmp_path / "x.onnx")]) == 2
    # generate runs the int4 file
    assert main(["generate", str(tmp_path / "int4.onnx"), "--prompt", "abc", "-n", "5", "--raw", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 5


def test_factored_then_int4_quantizes_both_factors(folder, tmp_path, capsys):
    svd = tmp_path / "svd.slim"
    assert main(["compress", str(folder), "-m", "svd", "--rank", "32", "--target", r".*layers\.\d+\..*proj",
                 "-o", str(svd), "--json"]) == 0
    wq = tmp_path / "svd-wq.slim"
    assert main(["compress", str(svd), "-m", "wq", "--set", "mode=int4", "--set", "group_size=32", "-o", str(wq),
                 "--json"]) == 0
    capsys.readouterr()
    info = export(wq, tmp_path / "svd-wq.onnx", capsys)
    assert info["matmul_nbits"] == 2 * 7 * 2 + 1
    names = {i.name for i in onnx.load(info["onnx"]).graph.initializer}
    # q, k and v's first factors read the same input: one MatMulNBits; each second factor its own
    assert {"hf_model_layers_0_self_attn_q_proj_first_weight_merged_q", "hf_model_layers_0_self_attn_q_proj_second_weight_q",
            "hf_model_layers_0_self_attn_k_proj_second_weight_q"} <= names
    assert info["greedy_prompts_equal"] == 3


def test_layout_and_packing():
    # per channel over 1536 inputs: blocks of 128 (ORT's kernels stop there), the scale repeated
    assert [block_size(g) for g in (32, 128, 576, 1536, 256, 24, 8)] == [32, 128, 64, 128, 128, None, None]
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (3, 64)).astype(np.uint8)
    zero = rng.integers(0, 16, (3, 2)).astype(np.uint8)
    scale = rng.random((3, 2)).astype(np.float32)
    dense = (q.reshape(3, 2, 32) - zero[..., None].astype(np.float32)) * scale[..., None]
    m = QuantizedMatrix("w", dense.reshape(3, 64).astype(np.float32), q, scale, zero, 4)
    b, s, z, block = nbits_tensors(m)
    assert block == 32 and b.shape == (3, 2, 16) and s.shape == (6,) and z.shape == (3,)
    assert b[0, 0, 0] == q[0, 0] | (q[0, 1] << 4)  # low nibble first
    assert z[0] == zero[0, 0] | (zero[0, 1] << 4)
    # a lone MatMul against the dense weight, lowered, computes x @ W^T
    from onnx import helper, numpy_helper, TensorProto
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "wt"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(np.ascontiguousarray(m.dense.T), "wt")])
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"nbits-{os.getpid()}.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)
    try:
        report = lower_matmul_nbits(path, [m])
        assert report.matmuls == 1 and not report.unmatched
        import onnxruntime as ort
        x = rng.standard_normal((2, 64)).astype(np.float32)
        y = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_allclose(y, x @ m.dense.T, rtol=1e-5, atol=1e-5)
    finally:
        os.unlink(path)


@pytest.mark.parametrize("bits", [8, 4])
def test_per_channel_weight_over_many_inputs(bits, tmp_path):
    """A per-channel scale over K = 1536 inputs (SmolLM2's down projection) computes x @ W^T in ORT: the scale is
    repeated over blocks ORT's kernels take (an 8-bit block of 512 did not)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(3)
    n, k = 8, 1536
    q = rng.integers(0, 2 ** bits, (n, k)).astype(np.uint8)
    zero = rng.integers(0, 2 ** bits, (n, 1)).astype(np.uint8)
    scale = (rng.random((n, 1)) * 0.01).astype(np.float32)
    dense = ((q.astype(np.float32) - zero) * scale).astype(np.float32)
    m = QuantizedMatrix("w", dense, q, scale, zero, bits)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "wt"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
                              [numpy_helper.from_array(np.ascontiguousarray(dense.T), "wt")])
    path = tmp_path / "pc.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    assert lower_matmul_nbits(path, [m]).matmuls == 1
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ dense.T, rtol=1e-4, atol=1e-4 * float(np.abs(x @ dense.T).max()))
