"""The models users bring, per task: tiny random-weight Hugging Face folders (saved with save_pretrained)
and torch modules go through load -> compress -> artifact -> ONNX export with parity."""
import json
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from edgeslim import artifact  # noqa: E402
from edgeslim.compress.base import CalibData  # noqa: E402
from edgeslim.compress.replace import count_params, linear_view, select_linear_maps  # noqa: E402
from edgeslim.compress.svd import ASVD, SVD, LowRankLinear  # noqa: E402
from edgeslim.data import load_calibration, text_calibration  # noqa: E402
from edgeslim.core.errors import ConfigError, SourceError  # noqa: E402
from edgeslim.export.onnx import to_onnx  # noqa: E402
from edgeslim.sources import LoadedModel, SourceSpec, load_model, load_weights  # noqa: E402
from edgeslim.core.specs import TensorSpec, example_feeds  # noqa: E402
from edgeslim.tasks import canonical_task, lm_targets  # noqa: E402
from edgeslim.zoo import _tiny_tokenizer  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 90  # the tiny tokenizer's 85 symbols fit


def tokenizer(pad: bool = True):
    tok = _tiny_tokenizer()
    if not pad:  # like GPT-2 / LLaMA: an end-of-sequence token and no pad token
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, unk_token="[UNK]",
                                                   eos_token="[SEP]")
    return tok


def save(model, folder, tok=None, processor=None):
    torch.manual_seed(0)
    model.save_pretrained(folder)
    if tok is not None:
        tok.save_pretrained(folder)
    if processor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def gpt2(folder):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    return save(transformers.GPT2LMHeadModel(config), folder, tokenizer(pad=False))


def llama(folder):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=True)
    return save(transformers.LlamaForCausalLM(config), folder, tokenizer(pad=False))


def vit(folder):
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=3,
                                    id2label={0: "cat", 1: "dog", 2: "fox"}, label2id={"cat": 0, "dog": 1, "fox": 2})
    return save(transformers.ViTForImageClassification(config), folder,
                processor={"size": {"height": 16, "width": 16}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                           "rescale_factor": 1 / 255})


def t5_encoder(folder):
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2)
    return save(transformers.T5EncoderModel(config), folder, tokenizer())


def bert64(folder):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                                     id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    return save(transformers.BertForSequenceClassification(config), folder, tokenizer())


# builder, task, output shape at batch 2 (sequence = the loaded dims), targeted linear maps, kind of map
HF_CASES = {
    "gpt2-conv1d": (gpt2, "causal-lm", lambda d: (2, d["sequence"], VOCAB)),
    "llama-tied": (llama, "causal-lm", lambda d: (2, d["sequence"], VOCAB)),
    "vit": (vit, "image-classification", lambda d: (2, 3)),
    "t5-encoder": (t5_encoder, "feature-extraction", lambda d: (2, 32)),
    "bert-64-positions": (bert64, "sequence-classification", lambda d: (2, 2)),
}


def feeds_for(loaded, batch=2, **dims):
    return {k: torch.from_numpy(v) for k, v in example_feeds(loaded.inputs, {**loaded.dims, **dims, "batch": batch},
                                                              seed=0).items()}


def through_artifact(loaded, result, tmp_path, name):
    path = artifact.save(tmp_path / f"{name}.slim", result.model, loaded.source, [result.step_record()],
                         loaded.inputs, {}, loaded.task, loaded.dims, source_files=loaded.files)
    return artifact.load(path)


# dynamo export takes ~15 s per model on 2 cores: two cases in the fast suite, the rest marked slow
FAST_EXPORT = ("gpt2-conv1d", "vit")
EXPORT_CASES = [c if c in FAST_EXPORT else pytest.param(c, marks=pytest.mark.slow) for c in HF_CASES]


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_hf_task_compress_artifact_export(case, tmp_path):
    build, task, shape = HF_CASES[case]
    loaded = load_model(build(tmp_path / case))
    assert loaded.task == task
    feeds = feeds_for(loaded, sequence=min(loaded.dims.get("sequence", 0), 12) or None) \
        if "sequence" in loaded.dims else feeds_for(loaded)
    with torch.no_grad():
        before = loaded.model(**feeds)
    expected = shape(loaded.dims)
    if "sequence" in loaded.dims and len(expected) == 3:
        expected = (2, feeds["input_ids"].shape[1], VOCAB)
    assert tuple(before.shape) == expected
    calib = load_calibration("random:4", loaded, batch_size=2)
    result = ASVD().compress(loaded.model, {"ratio": 0.6, "allocation": "sensitivity"}, calib)
    assert result.changes and count_params(result.model) < count_params(loaded.model)
    reloaded = through_artifact(loaded, result, tmp_path, case)
    assert reloaded.task == task
    with torch.no_grad():
        out = reloaded.model(**feeds)
        assert tuple(out.shape) == expected
        torch.testing.assert_close(out, result.model(**feeds))
    export = to_onnx(reloaded.model, reloaded.inputs, tmp_path / f"{case}.onnx")
    assert max(export.max_abs_diff.values()) < 1e-3


def test_causal_lms_have_pad_eos_and_positions(tmp_path):
    loaded = load_model(gpt2(tmp_path / "g"))
    assert loaded.dims["sequence"] == 64  # within n_positions, not the LM default 256
    assert loaded.encode.tokenizer.pad_token == "[SEP]"  # pad = EOS when the tokenizer has none
    batch = loaded.encode(["ab cd", "efg"])
    assert batch["input_ids"].shape == (2, 64)
    calib = load_calibration("sentences:4", loaded, batch_size=2)
    target = calib.targets[0]
    assert target.shape == batch["input_ids"].shape
    # next-token targets: shifted ids where the next position is real, -100 elsewhere
    ids, mask = calib.batches[0]["input_ids"], calib.batches[0]["attention_mask"]
    n = int(mask[0].sum())
    assert torch.equal(target[0, :n - 1], ids[0, 1:n]) and bool((target[0, n - 1:] == -100).all())
    assert torch.equal(lm_targets(ids, mask), target)
    assert load_model(bert64(tmp_path / "b")).dims["sequence"] == 64  # 64 positions: no 128 crash


def test_gpt2_conv1d_is_compressed_and_tied_head_left_alone(tmp_path):
    loaded = load_model(gpt2(tmp_path / "g"))
    chosen, skipped = select_linear_maps(loaded.model)
    kinds = {linear_view(m).kind for _, m in chosen}
    assert kinds == {"conv1d"} and len(chosen) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert list(skipped) == ["hf.lm_head"] and "tied to hf.transformer.wte.weight" in skipped["hf.lm_head"]
    result = SVD().compress(loaded.model, {"ratio": 0.5})
    rows = {c.name: c for c in result.changes}
    assert rows["hf.lm_head"].status == "skipped" and "tied to" in rows["hf.lm_head"].note
    assert {c.kind for c in result.changes if c.status != "skipped"} == {"Conv1D -> LowRankLinear"}
    assert result.resolved["skipped"] == skipped
    assert count_params(result.model) < count_params(loaded.model)


def test_conv1d_lossless_and_fisher_layout():
    from edgeslim.compress.base import StatsRequest
    from edgeslim.compress.statistics import collect_stats
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs, weight stored 4 x 6
    nn.init.normal_(conv.bias)
    view = linear_view(conv)
    assert view.kind == "conv1d" and tuple(view.weight.shape) == (6, 4)
    x = torch.randn(3, 5, 4)
    torch.testing.assert_close(LowRankLinear.from_conv1d(conv, 4)(x), conv(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="Conv1D"):
        LowRankLinear.from_conv1d(nn.Linear(4, 6), 2)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = conv

        def forward(self, x):
            return self.c(x)

    calib = CalibData("t", [{"x": torch.randn(2, 4)}], [torch.randn(2, 6)])
    stats = collect_stats(M(), calib, ["c"], StatsRequest(input_moments=True, fisher=True), progress=False)
    assert tuple(stats.fisher["c"].shape) == (6, 4) and tuple(stats.second_moment("c").shape) == (4, 4)


def test_tied_llama_head_left_alone_and_params_never_grow(tmp_path):
    loaded = load_model(llama(tmp_path / "l"))
    before = count_params(loaded.model)
    for ratio in (0.3, 0.9, 1.0):
        result = SVD().compress(loaded.model, {"ratio": ratio})
        assert "hf.lm_head" in result.resolved["skipped"]
        assert count_params(result.model) <= before


class TiedLM(nn.Module):
    """Embedding and output head sharing one weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(torch.relu(self.mid(self.embed(x))))


def test_tied_weights_files_saved_either_way_load(tmp_path):
    from safetensors.torch import save_model

    torch.manual_seed(0)
    source = TiedLM()
    save_model(source, str(tmp_path / "w.safetensors"))  # keeps one name of the tied pair
    torch.save(source.state_dict(), tmp_path / "w.pt")  # keeps both
    x = torch.randint(0, 50, (2, 5))
    for file in ("w.safetensors", "w.pt"):
        torch.manual_seed(1)
        model = TiedLM()
        load_weights(model, tmp_path / file)
        assert model.head.weight is model.embed.weight
        torch.testing.assert_close(model(x), source(x))
    result = SVD().compress(source, {"ratio": 0.5})
    assert "head" in result.resolved["skipped"] and count_params(result.model) <= count_params(source)
    torch.save({"mid.weight": torch.zeros(16, 16)}, tmp_path / "bad.pt")
    with pytest.raises(SourceError, match="missing"):
        load_weights(TiedLM(), tmp_path / "bad.pt")


class MHAModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(h + self.ffn(h)).mean(1)


class EncoderModel(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=48, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(x)).mean(1)


@pytest.mark.parametrize("cls,skipped", [(MHAModel, {"attn.out_proj"}),
                                         (EncoderModel, {"encoder.layers.0.self_attn.out_proj",
                                                         "encoder.layers.1.self_attn.out_proj"})])
def test_torch_attention_modules(cls, skipped, tmp_path, monkeypatch):
    import edgeslim.zoo as zoo

    inputs = [TensorSpec("x", ("batch", "sequence", 16))]
    monkeypatch.setattr(zoo, "names", lambda: ["attn-test"])  # the artifact's source, rebuilt by load
    monkeypatch.setattr(zoo, "entry", lambda name: zoo.ZooEntry(name, "test model"))
    monkeypatch.setitem(zoo.BUILDERS, "attn-test", lambda: LoadedModel(cls().eval(), SourceSpec("zoo", "attn-test"), inputs))
    torch.manual_seed(0)
    model = cls().eval()
    loaded = LoadedModel(model, SourceSpec("zoo", "attn-test"), inputs, "generic", {"batch": 2, "sequence": 6})
    x = torch.randn(2, 6, 16)
    result = SVD().compress(model, {"ratio": 0.5})
    assert set(result.resolved["skipped"]) == skipped and result.changes
    with torch.inference_mode():  # (TransformerEncoderLayer's fused path reads LowRankLinear.weight)
        assert result.model(x=x).shape == model(x=x).shape
    reloaded = through_artifact(loaded, result, tmp_path, cls.__name__)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(x=x), result.model(x=x))
    export = to_onnx(reloaded.model, inputs, tmp_path / "m.onnx")
    assert max(export.max_abs_diff.values()) < 1e-4


def test_fast_path_of_transformer_encoder_matches_the_slow_one():
    torch.manual_seed(0)
    model = EncoderModel().eval()
    compressed = SVD().compress(model, {"ratio": 0.5}).model
    x = torch.randn(2, 6, 16)
    with torch.inference_mode():
        fast = compressed(x)
    with torch.no_grad():
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = compressed(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)


def test_task_option_and_legacy_names(tmp_path):
    folder = llama(tmp_path / "l")
    embed = load_model(folder, task="feature-extraction")
    assert embed.task == "feature-extraction"
    with torch.no_grad():
        assert embed.model(**embed.encode(["ab"])).shape == (1, 32)
    with pytest.raises(ConfigError, match="unknown task"):
        load_model(folder, task="translation")
    assert canonical_task("embedding") == "feature-extraction"
    assert canonical_task("classification") == "sequence-classification"
    assert canonical_task("classification", [TensorSpec("x", ("batch", 3, 8, 8))]) == "image-classification"
    assert canonical_task("super-resolution") == "super-resolution"


def test_t5_seq2seq_and_its_encoder_only(tmp_path):
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                                   decoder_start_token_id=0)
    folder = save(transformers.T5ForConditionalGeneration(config), tmp_path / "t5", tokenizer())
    seq = load_model(folder)
    assert seq.task == "seq2seq" and [s.name for s in seq.inputs][-1] == "decoder_input_ids"
    with torch.no_grad():
        assert seq.model(**seq.encode(["ab cd"])).shape == (1, seq.dims["sequence"], VOCAB)
    enc = load_model(folder, task="feature-extraction")  # the encoder alone: no decoder layers to compress
    names = [n for n, _ in select_linear_maps(enc.model)[0]]
    assert names and not any("decoder" in n for n in names)


def test_bbc_labels_only_for_a_head_with_its_classes(tmp_path):
    loaded = load_model(bert64(tmp_path / "b"))  # 2 labels
    texts, labels = ["ab", "cd", "ef", "gh"], [0, 1, 2, 3]
    assert text_calibration("t", texts, loaded, 2, labels, num_classes=5).targets is None  # distils
    assert text_calibration("t", texts, loaded, 2, [0, 1, 1, 0], num_classes=2).targets is not None
