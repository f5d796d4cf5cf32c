"""Weight-only INT8 / INT4 (`wq`, NNCF compress_weights): byte counts, reconstruction error, replay,
composition after a low-rank step, the CLI path to `eval`, and clear errors for bad input."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from edgeslim import artifact, pipeline
from edgeslim.cli import main
from edgeslim.compress.base import CompressContext, get_compressor
from edgeslim.compress.svd import LowRankLinear
from edgeslim.compress.weight_quant import decompressors
from edgeslim.core.errors import ConfigError
from edgeslim.sources import load_model
from edgeslim.core.specs import TensorSpec, example_feeds
from test_tasks import llama  # noqa: E402 (tests/ is on sys.path under pytest)

pytest.importorskip("nncf")
torch.set_num_threads(1)
WQ = get_compressor("wq")


class MLP(nn.Module):
    """128 -> 96 -> 10 MLP with random weights."""

    edgeslim_inputs = [TensorSpec("x", ("batch", 128))]

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.head = nn.Linear(128, 96), nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x)))


def mlp() -> nn.Module:
    return MLP().eval()


def _compress(model: nn.Module, **config):
    return WQ.compress(model, WQ.make_config(config), context=CompressContext(inputs=tuple(MLP.edgeslim_inputs)))


def _feeds(loaded, batch: int = 3) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in example_feeds(loaded.inputs, {**loaded.dims, "batch": batch,
                                                                              "sequence": 12}, seed=4).items()}


def test_int8_bytes_are_integer_weights_scales_and_zero_points():
    model = mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = _compress(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the caller's model untouched
    rows = {c.name: c for c in result.changes}
    assert set(rows) == {"fc", "head"} and all(c.status == "quantized" for c in rows.values())
    for name, (out, inp) in {"fc": (96, 128), "head": (10, 96)}.items():
        # uint8 weight + an fp16 scale and a uint8 zero point per output channel; the fp32 bias is kept
        assert rows[name].bytes_after == out * inp + out * 2 + out * 1 + 4 * out
        assert rows[name].bytes_before == 4 * out * inp + 4 * out
        assert rows[name].params_after == rows[name].params_before == out * inp + out
        assert rows[name].rel_error < 0.01
    assert result.resolved["bytes_after"] == sum(c.bytes_after for c in rows.values())
    assert result.resolved["size_ratio"] == pytest.approx(result.resolved["bytes_after"] / result.resolved["bytes_before"])
    assert result.model.fc.weight.dtype == torch.uint8
    x = torch.randn(4, 128)
    with torch.no_grad():
        rel = torch.linalg.norm(result.model(x) - model(x)) / torch.linalg.norm(model(x))
    assert rel < 0.02


@pytest.mark.parametrize("mode, bound", [("int8", 0.01), ("int8_sym", 0.01), ("int4", 0.15), ("int4_sym", 0.15)])
def test_dequantized_weights_are_close(mode, bound):
    """nn.Linear's weights start uniform in [-a, a]: rounding to 2^b - 1 steps over that range leaves
    an rms error of step / sqrt(12) against an rms weight of a / sqrt(3), a relative error of
    1 / (2^b - 1) (uniform quantization noise; groups and rows span slightly less than 2a)."""
    model = mlp()
    result = _compress(model, mode=mode, group_size=32, all_layers=True)
    for name, dec in decompressors(result.model).items():
        w = model.get_parameter(name)
        with torch.no_grad():
            deq = dec(result.model.get_parameter(name)).reshape(w.shape)
            err = float(torch.linalg.norm(deq - w) / torch.linalg.norm(w))
        row = next(c for c in result.changes if c.name == name.rsplit(".", 1)[0])
        assert err == pytest.approx(row.rel_error, rel=1e-5) and 0 < err < bound
        assert 0.8 < err * (2 ** (4 if mode.startswith("int4") else 8) - 1) < 1.1
        if mode.startswith("int4"):
            assert "groups of 32" in row.kind and row.bytes_after < row.bytes_before / 6
    assert result.resolved["group_size"] == (32 if mode.startswith("int4") else None)


def test_int4_keeps_the_last_layer_int8_unless_all_layers():
    default = {c.name: c.kind for c in _compress(mlp(), mode="int4", group_size=32).changes}
    assert "INT4" in default["fc"] and "INT8" in default["head"]  # NNCF's backup precision for the last layer
    assert all("INT4" in k for k in (c.kind for c in _compress(mlp(), mode="int4", group_size=32,
                                                                   all_layers=True).changes))


@pytest.mark.parametrize("config, message", [
    ({"mode": "int3"}, "'mode' must be"),
    ({"mode": "int4", "group_size": 0}, "group_size must be a positive integer or -1"),
    ({"mode": "int4", "group_size": 48}, "group_size=48 does not divide the input dimension of layer 'fc' "
                                         r"\(128 inputs; 1 layer\(s\) in all\): use a divisor of 32"),
])
def test_bad_config_is_a_config_error(config, message):
    with pytest.raises(ConfigError, match=message):
        _compress(mlp(), **config)


def test_a_model_without_linear_maps_is_refused():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ConfigError, match="linear maps .*Sequential has none"):
        WQ.compress(conv, WQ.make_config({}), context=CompressContext(inputs=(TensorSpec("x", ("batch", 3, 8, 8)),)))
    with pytest.raises(ConfigError, match="needs the model's input spec"):
        WQ.compress(mlp(), WQ.make_config({}))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_artifact_replays_exactly(mode, tmp_path):
    loaded = load_model("test_weight_quant:mlp")
    result = WQ.compress(loaded.model, WQ.make_config({"mode": mode, "group_size": 32}),
                         context=CompressContext(inputs=tuple(loaded.inputs)))
    path = artifact.save(tmp_path / "q.slim", result.model, loaded.source, [result.step_record()], loaded.inputs)
    from edgeslim.trust import Trust
    again = artifact.load(path, Trust("test_weight_quant:mlp"))
    feeds = _feeds(again, 5)
    with torch.no_grad():
        assert torch.equal(again.model(**feeds), result.model(**feeds))
    assert again.model.fc.weight.dtype == torch.uint8


def test_after_a_low_rank_step_the_inner_linears_are_quantized(tmp_path):
    steps = [{"method": "asvd", "ratio": 0.5, "calib": "random:16"}, {"method": "wq", "mode": "int4", "group_size": 8}]
    _, compressed, results, path = pipeline.compress_to_artifact("tiny-mlp", steps, tmp_path / "c.slim", quiet=True)
    names = {c.name for c in results[1].changes}
    low_rank = [n for n, m in compressed.model.named_modules() if isinstance(m, LowRankLinear)]
    assert low_rank and all({f"{n}.first", f"{n}.second"} <= names for n in low_rank)
    loaded = artifact.load(path)
    assert [s["method"] for s in loaded.steps] == ["asvd", "wq"]
    feeds = _feeds(loaded, 6)
    with torch.no_grad():
        assert torch.equal(loaded.model(**feeds), compressed.model(**feeds))


def test_cli_compress_artifact_eval_on_a_tiny_llama(in_tmp, capsys):
    folder = llama(in_tmp / "llama")
    assert main(["compress", str(folder), "-m", "wq", "--set", "mode=int4", "--set", "group_size=16",
                 "-o", "q.slim", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    step = out["steps"][0]
    assert out["bytes"]["targeted_bytes_after"] == step["resolved"]["bytes_after"] < step["resolved"]["bytes_before"] / 3
    rows = {c["name"]: c for c in step["changes"]}
    assert "hf.model.layers.0.mlp.down_proj" in rows and "INT4" in rows["hf.model.layers.0.mlp.down_proj"]["kind"]
    tied = rows["hf.model.embed_tokens"]  # the tied embedding / LM head, stored once (INT8, NNCF's backup)
    assert "INT8" in tied["kind"] and "tied to hf.lm_head" in tied["note"]
    docs = in_tmp / "docs.txt"
    docs.write_text("the quick brown fox\n\njumps over the lazy dog, again and again\n")
    assert main(["eval", "q.slim", "--data", str(docs), "--json"]) == 0
    quantized = json.loads(capsys.readouterr().out)
    assert main(["eval", str(folder), "--data", str(docs), "--json"]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert quantized["metric"] == fp32["metric"] == "perplexity"
    assert quantized["value"] != fp32["value"] and abs(quantized["value"] / fp32["value"] - 1) < 0.1


def test_export_writes_the_dequantized_model(in_tmp):
    assert main(["compress", "tiny-mlp", "-m", "wq", "-o", "q.slim"]) == 0
    assert main(["export", "q.slim", "-o", "q.onnx"]) == 0
    import onnx
    graph = onnx.load("q.onnx").graph
    assert not any(n.op_type in ("DequantizeLinear", "QuantizeLinear") for n in graph.node)
    assert all(i.data_type == onnx.TensorProto.FLOAT for i in graph.initializer)


@pytest.mark.parametrize("method", ["svd", "wq"])
def test_a_torch_step_after_wq_is_refused(method, in_tmp, capsys):
    assert main(["compress", "tiny-mlp", "-m", "wq", "-o", "q.slim"]) == 0
    capsys.readouterr()
    assert main(["compress", "q.slim", "-m", method, "-o", "again.slim"]) == 2
    assert f"{method} cannot follow the wq step, which left integer weights" in capsys.readouterr().err
    assert not (in_tmp / "again.slim").exists()
    with pytest.raises(ConfigError, match="already quantized by NNCF"):
        _compress(_compress(mlp()).model)


def test_exclude_keeps_a_layer_fp32_in_the_record_and_the_replay(tmp_path):
    loaded = load_model("test_weight_quant:mlp")
    result = WQ.compress(loaded.model, WQ.make_config({"mode": "int4", "group_size": 32, "exclude": "head"}),
                         context=CompressContext(inputs=tuple(loaded.inputs)))
    rows = {c.name: c for c in result.changes}
    assert rows["fc"].status == "quantized" and "INT4" in rows["fc"].kind
    assert rows["head"].status == "skipped" and "kept fp32 (excluded)" in rows["head"].note
    assert rows["head"].bytes_after == rows["head"].bytes_before == 4 * (96 * 10 + 10)
    assert result.resolved["fp32"] == {"head": "excluded"} and list(decompressors(result.model)) == ["fc.weight"]
    assert torch.equal(result.model.head.weight, loaded.model.head.weight)  # untouched fp32
    path = artifact.save(tmp_path / "q.slim", result.model, loaded.source, [result.step_record()], loaded.inputs)
    again = artifact.load(path, __import__("edgeslim.trust", fromlist=["Trust"]).Trust("test_weight_quant:mlp"))
    assert list(decompressors(again.model)) == ["fc.weight"] and again.model.head.weight.dtype == torch.float32
    feeds = _feeds(again, 5)
    with torch.no_grad():
        assert torch.equal(again.model(**feeds), result.model(**feeds))
    by_target = _compress(mlp(), mode="int4", group_size=32, target=["fc"])
    assert by_target.resolved["fp32"] == {"head": "not in target"}
    assert torch.equal(by_target.model.fc.weight, result.model.fc.weight)


def test_an_exclude_that_matches_nothing_is_refused():
    with pytest.raises(ConfigError, match=r"exclude='lm_head' matches no layer wq quantizes .*'\.\*lm_head'.*"
                                          r"nearest names: \['head'"):
        _compress(mlp(), exclude="lm_head")
    with pytest.raises(ConfigError, match=r"Embedding module matches target=None exclude=.\.\*."):
        _compress(mlp(), exclude=".*")


def test_cli_exclude_lm_head_keeps_the_tied_embedding_fp32(in_tmp, capsys):
    """The tiny llama ties its LM head to the input embedding: one tensor, so both stay fp32."""
    folder = llama(in_tmp / "llama")
    args = ["compress", str(folder), "-m", "wq", "--set", "mode=int4", "--set", "group_size=16", "-o", "q.slim"]
    assert main(args + ["--set", "exclude=lm_head"]) == 2  # a regex matches the whole name: hf.lm_head
    assert "nearest names: ['hf.lm_head'" in capsys.readouterr().err and not (in_tmp / "q.slim").exists()
    assert main(args + ["--set", "exclude=.*lm_head", "--json"]) == 0
    step = json.loads(capsys.readouterr().out)["steps"][0]
    rows = {c["name"]: c for c in step["changes"]}
    assert rows["hf.lm_head"]["status"] == rows["hf.model.embed_tokens"]["status"] == "skipped"
    assert "weight tied to hf.lm_head" in rows["hf.model.embed_tokens"]["note"]
    assert step["resolved"]["fp32"] == {"hf.lm_head": "excluded",
                                        "hf.model.embed_tokens": "weight tied to hf.lm_head, which stays fp32"}
    assert "INT4" in rows["hf.model.layers.0.mlp.down_proj"]["kind"]
    source, again = load_model(str(folder)), artifact.load(in_tmp / "q.slim")
    assert again.model.hf.lm_head.weight is again.model.hf.model.embed_tokens.weight
    assert torch.equal(again.model.hf.lm_head.weight, source.model.hf.lm_head.weight)
    assert not any("embed_tokens" in n or "lm_head" in n for n in decompressors(again.model))


def test_exclude_one_layer_of_a_module_list_keeps_that_layer_alone_fp32(in_tmp):
    """NNCF's op names drop ModuleList indices: the layer left out is found by the weight its op reads."""
    loaded = load_model(str(llama(in_tmp / "llama")))
    left = "hf.model.layers.1.mlp.down_proj"
    result = WQ.compress(loaded.model, WQ.make_config({"mode": "int8", "exclude": [left]}),
                         context=CompressContext(inputs=tuple(loaded.inputs)))
    quantized = set(decompressors(result.model))
    assert f"{left}.weight" not in quantized and "hf.model.layers.0.mlp.down_proj.weight" in quantized
    assert len(quantized) == 2 * 7  # every other linear map of both layers, and the tied embedding
    assert torch.equal(result.model.get_submodule(left).weight, loaded.model.get_submodule(left).weight)
