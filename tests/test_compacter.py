"""Compacter / Compacter++ / bottleneck / LoRA / head adapters, adapter artifacts and `edgeslim train adapter`."""
import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from edgeslim import artifact, zoo
from edgeslim.adapter import attach, encode_pairs, label_set, save_adapter, train_adapter
from edgeslim.cli import main
from edgeslim.compress.base import get_compressor
from edgeslim.compress.compacter import (Adapter, LoRALinear, PHMLinear, auto_epochs, init_rule, merge_for_export,
                                         paper_param_count, state_sha256)
from edgeslim.data import read_labelled
from edgeslim.core.errors import ConfigError, SourceError
from edgeslim.sources import LoadedModel, SourceSpec, TextModel, load_model
from edgeslim.core.specs import TensorSpec

ADAPTERS = ("compacter", "compacter_pp", "bottleneck", "lora")
TINY = {"reduction": 4}  # hidden 32 -> bottleneck 8, divisible by n = 4
PAIRS = [(t, lab) for t, lab in [("good great fine", "pos"), ("bad awful poor", "neg"), ("nice good", "pos"),
                                  ("sad bad", "neg"), ("fine nice great", "pos"), ("poor sad awful", "neg")]] * 2


def settings(method: str) -> dict:
    return dict(TINY) if method in ("compacter", "compacter_pp", "bottleneck") else {}


class PooledEncoder(nn.Module):
    """nn.TransformerEncoder, mean-pooled: the plain-PyTorch case."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).mean(1)


def tiny_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return TextModel(transformers.LlamaModel(config), "mean_pool").eval()


def tiny_distilbert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.DistilBertConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=2, n_heads=2,
                                           max_position_embeddings=32)
    torch.manual_seed(0)
    return TextModel(transformers.DistilBertModel(config), "mean_pool").eval()


def text_feeds() -> dict:
    return {"input_ids": torch.randint(0, 60, (3, 10), generator=torch.Generator().manual_seed(1)),
            "attention_mask": torch.ones(3, 10, dtype=torch.long)}


def perturb(model: nn.Module) -> None:
    """Move every adapter away from its identity start (as training would)."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PHMLinear):
                m.s.copy_(torch.randn(m.s.shape, generator=gen))
            elif isinstance(m, (nn.Linear,)) and m.weight.requires_grad:
                m.weight.add_(torch.randn(m.weight.shape, generator=gen) * 0.5)
            elif isinstance(m, LoRALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=gen))


def test_phm_layer_equals_the_dense_kronecker_sum():
    torch.manual_seed(0)
    rule = init_rule(4)
    layer = PHMLinear(8, 12, rule, rank=2)
    dense = sum(torch.kron(rule[i], layer.s[i] @ layer.t[i]) for i in range(4))
    assert torch.allclose(layer.weight(), dense, atol=1e-6)
    x = torch.randn(5, 8)
    assert torch.allclose(layer(x), x @ dense.T + layer.bias, atol=1e-6)
    assert torch.allclose(layer.to_dense()(x), layer(x), atol=1e-6)


def test_n_that_does_not_divide_a_dimension_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"n=4 does not divide the in dimension 6"):
        PHMLinear(6, 8, init_rule(4))
    with pytest.raises(ConfigError, match=r"n=4 must divide .* bottleneck width 2"):
        get_compressor("compacter").compress(zoo.build("tiny-bert").model, {"reduction": 16})
    with pytest.raises(ConfigError, match="n must be at least 1, got 0"):
        get_compressor("compacter").make_config({"n": 0})


def test_shared_slow_weights_are_one_parameter_and_counts_match_the_paper():
    model = get_compressor("compacter").compress(zoo.build("tiny-bert").model, {**TINY, "train_layer_norms": False})
    phm = [m for m in model.model.modules() if isinstance(m, PHMLinear)]
    assert len(phm) == 2 * 2 * 2  # 2 blocks x (attention, FFN) x (down, up)
    assert all(m.rule is model.model.phm_rule for m in phm)
    names = [n for n, p in model.model.named_parameters() if p is model.model.phm_rule]
    assert names == ["phm_rule"]
    added = sum(p.numel() for p in model.model.parameters() if p.requires_grad)
    assert added == paper_param_count("compacter", blocks=2, width=32, bottleneck=8, n=4) == 4 ** 3 + 4 * (2 * 40 + 40)
    pp = get_compressor("compacter_pp").compress(zoo.build("tiny-bert").model, {**TINY, "train_layer_norms": False})
    assert sum(p.numel() for p in pp.model.parameters() if p.requires_grad) == paper_param_count(
        "compacter_pp", blocks=2, width=32, bottleneck=8, n=4)


@pytest.mark.parametrize("build", ["tiny-bert", "distilbert", "llama", "torch"])
@pytest.mark.parametrize("method", ADAPTERS)
def test_adapters_start_as_the_identity_and_then_change_the_output(method, build):
    if build == "tiny-bert":
        base, feeds = zoo.build("tiny-bert").model, text_feeds()
    elif build in ("distilbert", "llama"):
        base, feeds = (tiny_llama if build == "llama" else tiny_distilbert)(), text_feeds()
    else:
        torch.manual_seed(0)
        base, feeds = PooledEncoder().eval(), {"x": torch.randn(3, 7, 16)}
    config = dict(settings(method), reduction=4) if method != "lora" else {}
    if method == "lora" and build == "torch":
        config = {"target": r".*linear[12]"}
    result = get_compressor(method).compress(base, config)
    with torch.inference_mode():
        before = base(**feeds)
        assert torch.equal(result.model(**feeds), before)  # lossless at initialisation
    perturb(result.model)
    with torch.inference_mode():  # eval + no grad: nn.TransformerEncoder's fused path must not skip them
        assert not torch.allclose(result.model(**feeds), before, atol=1e-4)
        assert torch.allclose(merge_for_export(result.model)(**feeds), result.model(**feeds), atol=1e-5)


def test_training_changes_only_the_adapters_and_head():
    loaded = zoo.build("tiny-bert")
    original = copy.deepcopy(loaded.model.state_dict())
    data = encode_pairs(loaded, PAIRS, label_set(PAIRS), 4, "toy")
    for method in ("compacter", "lora"):
        result = get_compressor(method).compress(loaded.model, {**settings(method), "labels": ["neg", "pos"]}, data)
        trainable = set(result.resolved["trainable"])
        params = dict(result.model.named_parameters())
        for name, value in original.items():  # base names gain the "base." prefix and ".inner" at a site
            adapted = next(n for n in params if n.replace(".inner.", ".") == f"base.{name}")
            if adapted in trainable:
                continue
            assert torch.equal(params[adapted], value), adapted
        assert not torch.equal(params["head.weight"], torch.zeros_like(params["head.weight"]))
        epochs = result.resolved["train"]["epochs"]  # the default: enough passes for about AUTO_STEPS steps
        assert epochs == auto_epochs(len(data.batches)) == 40 and result.resolved["train"]["steps"] == 3 * epochs
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in original.items())  # caller's model untouched


def test_lora_merges_exactly():
    torch.manual_seed(0)
    lora = LoRALinear.from_linear(nn.Linear(12, 10), rank=3, alpha=6.0)
    nn.init.normal_(lora.lora_b)
    x = torch.randn(4, 12)
    assert torch.allclose(lora.merge()(x), lora(x), atol=1e-5)
    with pytest.raises(ConfigError, match="exceeds"):
        LoRALinear.from_linear(nn.Linear(4, 4), rank=5, alpha=1.0)


def test_adapted_model_exports_to_onnx_with_parity(tmp_path):
    from edgeslim.export.onnx import to_onnx
    torch.manual_seed(0)
    result = get_compressor("compacter").compress(PooledEncoder().eval(), {"reduction": 4})
    perturb(result.model)
    inputs = [TensorSpec("x", ("batch", "sequence", 16))]
    for model in (result.model, merge_for_export(result.model)):
        exported = to_onnx(model, inputs, tmp_path / "m.onnx")
        assert max(exported.max_abs_diff.values()) < 1e-4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two adapters trained on the tiny BERT and saved: (base, [(result-model, path)])."""
    folder = tmp_path_factory.mktemp("adapters")
    out = []
    for method, seed in (("compacter", 0), ("bottleneck", 1)):
        summary = train_adapter(load_model("tiny-bert"), PAIRS, folder / f"{method}.slim", method,
                                {**TINY, "seed": seed, "epochs": 2}, PAIRS, batch_size=4)
        out.append((summary, Path(summary["artifact"])))
    return out


def test_adapter_artifact_round_trip_and_size(trained):
    summary, path = trained[0]
    loaded = load_model(path)
    manifest = artifact.read_manifest(path)
    from safetensors.torch import load_file
    stored = load_file(str(path / "weights.safetensors"))
    assert set(stored) == set(manifest["steps"][-1]["resolved"]["trainable"])
    assert not any(k.startswith("base.hf.embeddings.word") for k in stored)  # never the base's weights
    assert summary["trainable_params"] == sum(t.numel() for t in stored.values())
    assert manifest["kind"] == "adapter" and manifest["labels"] == ["neg", "pos"]
    assert manifest["base_sha256"] == state_sha256(zoo.build("tiny-bert").model)
    again = load_model(path)
    feeds = text_feeds()
    with torch.inference_mode():
        assert torch.equal(loaded.model(**feeds), again.model(**feeds))
        logits = loaded.model(**loaded.encode([t for t, _ in PAIRS]))
    accuracy = float((logits.argmax(-1) == torch.tensor([1 if y == "pos" else 0 for _, y in PAIRS])).double().mean())
    assert accuracy == pytest.approx(summary["eval"]["accuracy"])  # the saved adapter gives the trained figures


def test_a_different_base_is_refused(trained):
    _, path = trained[0]
    other = zoo.build("tiny-bert")
    with torch.no_grad():
        other.model.hf.embeddings.word_embeddings.weight[0, 0] += 1.0
    with pytest.raises(SourceError, match="was trained on base zoo 'tiny-bert'"):
        attach(other, path)


def test_several_adapters_share_one_base(trained):
    base = zoo.build("tiny-bert")
    frozen = base.model.hf.encoder.layer[0].attention.self.query.weight
    a, b = (attach(base, path) for _, path in trained)
    for loaded in (a, b):
        assert loaded.model.base.hf.encoder.layer[0].attention.self.query.weight is frozen
        ln = loaded.model.base.hf.encoder.layer[0].output.LayerNorm.weight  # trained: its own tensor
        assert ln is not base.model.hf.encoder.layer[0].output.LayerNorm.weight
    feeds = text_feeds()
    with torch.inference_mode():
        assert not torch.allclose(a.model(**feeds), b.model(**feeds))


def test_a_factory_base_named_by_the_file_is_never_loaded(trained, tmp_path):
    summary, path = trained[0]
    base = zoo.build("tiny-bert")
    base.source = SourceSpec("factory", "os:system")  # what a hostile manifest could name
    result = get_compressor("compacter").compress(base.model, {**TINY, "labels": ["neg", "pos"]},
                                                  encode_pairs(base, PAIRS, ["neg", "pos"], 4, "toy"))
    hostile = save_adapter(tmp_path / "hostile.slim", result, base)
    with pytest.raises(SourceError, match="names code to run: an artifact never does that; pass the base yourself"):
        load_model(hostile)
    assert load_model(hostile, base="tiny-bert").task == "sequence-classification"  # the user names it: fine


def test_a_recorded_zoo_base_is_never_a_folder_of_that_name(trained, in_tmp):
    _, path = trained[0]
    decoy = in_tmp / "tiny-bert"  # a folder in the current directory named like the zoo base
    decoy.mkdir()
    (decoy / "config.json").write_text('{"model_type": "bert", "auto_map": {"AutoModel": "evil.Model"}}')
    loaded = load_model(path)
    assert loaded.source.kind == "zoo" and loaded.task == "sequence-classification"


@pytest.mark.parametrize("content, message", [
    ('{"text": "a", "label": "x"}\n\n{"text": "b" "label": 1}\n', r"line 3: not valid JSON"),
    ('{"text": "a", "label": "x"}\n{"text": "b"}\n', r"line 2: expected an object with 'text' and 'label'"),
    ('{"text": "a", "label": true}\n', r"line 1: 'label' must be a string or an integer"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": 2}\n', r"labels mix strings and integers"),
])
def test_jsonl_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(SourceError, match=message):
        read_labelled(path)


def test_csv_reading_and_errors_name_the_line(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text('text,label\n"hello, world",1\nbye,0\n')
    assert read_labelled(good) == [("hello, world", 1), ("bye", 0)]
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhello,1\nbye,0,extra\n")
    with pytest.raises(SourceError, match=r"bad.csv, line 3"):
        read_labelled(bad)
    header = tmp_path / "header.csv"
    header.write_text("sentence,label\nhello,1\n")
    with pytest.raises(SourceError, match=r"line 1: the header needs columns 'text' and 'label'"):
        read_labelled(header)


def test_cli_trains_an_adapter_from_jsonl(in_tmp, capsys):
    with open("train.jsonl", "w") as fh:
        for text, label in PAIRS:
            fh.write(json.dumps({"text": text, "label": label}) + "\n")
    code = main(["train", "adapter", "tiny-bert", "--data", "train.jsonl", "--eval", "train.jsonl", "-m",
                 "compacter_pp", "--set", "reduction=4", "--epochs", "2", "-o", "task.slim"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "trainable parameters" in out and "macro-F1" in out and "adapter artifact: task.slim" in out
    assert artifact.read_manifest("task.slim")["labels"] == ["neg", "pos"]
    assert main(["train", "adapter", "tiny-bert", "--data", "missing.jsonl", "-o", "x.slim"]) == 3


@pytest.mark.slow
def test_benchmark_quick_mode_runs_end_to_end(tmp_path):
    path = Path(__file__).parents[1] / "bench" / "compacter_minilm.py"
    spec = importlib.util.spec_from_file_location("compacter_minilm", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in json.loads((tmp_path / "compacter_minilm.json").read_text())["rows"]}
    assert set(rows) == {"full", "head", "bottleneck", "lora", "compacter", "compacter_pp"}
    for method in ("compacter", "compacter_pp", "bottleneck", "lora"):
        assert rows[method]["adapter_params"] == rows[method]["paper_formula_params"]
        assert rows[method]["unmerged_max_abs_diff"] < 1e-4


def test_a_malformed_adapter_manifest_is_a_source_error(trained, tmp_path):
    import shutil
    _, path = trained[0]
    copy_path = tmp_path / "tampered.slim"
    shutil.copytree(path, copy_path)
    manifest = json.loads((copy_path / "manifest.json").read_text())
    manifest["steps"][-1]["resolved"]["sites"][0]["name"] = "hf.no.such.module"
    (copy_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SourceError, match="adapter step in the manifest is malformed"):
        load_model(copy_path)


def test_artifact_load_sends_an_adapter_artifact_to_load_model(trained):
    _, path = trained[0]
    with pytest.raises(SourceError, match=r"adapter artifact, which needs its base: load it with edgeslim.sources.load_model"):
        artifact.load(path)


def test_default_epochs_follow_the_data_size():
    assert [auto_epochs(n) for n in (1, 2, 3, 60, 120, 500)] == [60, 60, 40, 2, 1, 1]  # 20 lines in batches of 16: 2
    assert get_compressor("lora").make_config({"epochs": 2}).epochs == 2  # the user's number wins


def test_held_out_accuracy_at_chance_is_warned(tmp_path, monkeypatch):
    from edgeslim import adapter

    monkeypatch.setattr(adapter, "evaluate", lambda model, data: {"accuracy": 0.5, "macro_f1": 0.33})
    with pytest.warns(UserWarning, match="held-out accuracy 0.500 is at chance .* commonest label scores 0.500"):
        train_adapter(load_model("tiny-bert"), PAIRS, tmp_path / "a.slim", "head", {"epochs": 1}, PAIRS, batch_size=4)
