"""`edgeslim eval`: perplexity, accuracy + macro-F1, cosine agreement, Y-PSNR/SSIM; the labelled-data parser."""
import json
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from edgeslim.cli import main  # noqa: E402
from edgeslim.compress.svd import SVD  # noqa: E402
from edgeslim.data import read_labelled  # noqa: E402
from edgeslim.core.errors import ConfigError, SourceError  # noqa: E402
from edgeslim.evaluate import classification_metrics, evaluate, perplexity  # noqa: E402
from edgeslim.images import write_image  # noqa: E402
from edgeslim.sources import load_model  # noqa: E402
from test_tasks import bert64, llama, vit  # noqa: E402


def test_perplexity_is_exp_of_the_mean_next_token_loss(tmp_path):
    loaded = load_model(llama(tmp_path / "l"))
    tok = loaded.encode.tokenizer
    text = "the quick brown fox jumps over the lazy dog"
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        logits = loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    expected = math.exp(float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])))
    ppl, tokens = perplexity(loaded.model, tok, [text], window=512, progress=False)
    assert tokens == ids.shape[1] - 1 and ppl == pytest.approx(expected, rel=1e-5)
    # windows shorter than the text: every token after the first is still scored exactly once
    ppl_w, tokens_w = perplexity(loaded.model, tok, [text, "ab"], window=8, progress=False)
    assert tokens_w == tokens + 1 and math.isfinite(ppl_w)


@pytest.mark.slow  # a causal-LM export: ~15 s; the fast suite exports GPT-2 in test_tasks.py
def test_eval_causal_lm_file_and_onnx(tmp_path):
    folder = llama(tmp_path / "l")
    docs = tmp_path / "docs.txt"
    docs.write_text("the quick brown fox\n\njumps over the lazy dog, again and again\n")
    loaded = load_model(folder)
    result = evaluate(loaded, str(docs), progress=False)
    assert result.metric == "perplexity" and result.samples == 2 and result.value > 1
    compressed = SVD().compress(loaded.model, {"ratio": 0.5}).model
    from edgeslim.export.onnx import to_onnx
    to_onnx(compressed, loaded.inputs, tmp_path / "c.onnx")
    onnx = evaluate(loaded, str(docs), onnx=tmp_path / "c.onnx", progress=False)
    loaded.model = compressed
    torch_result = evaluate(loaded, str(docs), progress=False)
    assert onnx.value == pytest.approx(torch_result.value, rel=1e-4)


def test_read_labelled_jsonl_csv_and_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ab", "label": "pos"}\n\n{"text": "cd", "label": "neg"}\n')
    assert read_labelled(tmp_path / "a.jsonl") == [("ab", "pos"), ("cd", "neg")]
    (tmp_path / "b.csv").write_text('text,label\n"a, b",2\ncd,0\n')
    assert read_labelled(tmp_path / "b.csv") == [("a, b", 2), ("cd", 0)]
    (tmp_path / "bad.jsonl").write_text('{"text": "ab", "label": 0}\n{"text": "ab"\n')
    with pytest.raises(SourceError, match="line 2: not valid JSON"):
        read_labelled(tmp_path / "bad.jsonl")
    (tmp_path / "nolabel.jsonl").write_text('{"text": "ab"}\n')
    with pytest.raises(SourceError, match="line 1: expected"):
        read_labelled(tmp_path / "nolabel.jsonl")
    (tmp_path / "bad.csv").write_text("sentence,label\nab,1\n")
    with pytest.raises(SourceError, match="header needs columns 'text' and 'label'"):
        read_labelled(tmp_path / "bad.csv")


def test_classification_metrics():
    m = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1])
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_eval_text_classifier_with_label_names(tmp_path):
    folder = bert64(tmp_path / "b")
    names = ["neg", "pos"]  # its id2label
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": names[i % 2]}) + "\n" for i, t in enumerate("abcdef")))
    result = evaluate(load_model(folder), str(data), progress=False)
    assert result.metric == "accuracy" and result.samples == 6 and 0 <= result.value <= 1
    assert set(result.metrics) == {"accuracy", "macro_f1"}
    data.write_text(json.dumps({"text": "a", "label": "nope"}) + "\n")
    with pytest.raises(ConfigError, match="'nope' is not one of the model's classes"):
        evaluate(load_model(folder), str(data), progress=False)


def test_eval_image_folder_and_encoder_agreement(tmp_path, capsys):
    folder = vit(tmp_path / "v")
    rng = np.random.default_rng(0)
    for cls in ("cat", "fox"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            write_image(tmp_path / "imgs" / cls / f"{i}.png", rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    result = evaluate(load_model(folder), str(tmp_path / "imgs"), progress=False)
    assert result.samples == 4 and result.task == "image-classification"
    assert main(["eval", "tiny-bert", "--data", "sentences", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metric"] == "cosine_mean" and out["value"] == pytest.approx(1.0)
    assert out["reference"].startswith("itself (tiny-bert")  # alone, an encoder is its own baseline: said so
    assert main(["eval", "tiny-bert", "--data", "sentences"]) == 0
    assert "against itself (tiny-bert: the baseline" in capsys.readouterr().out


def test_eval_super_resolution_and_unknown_data(tmp_path, capsys):
    from edgeslim.images import load_bundled
    write_image(tmp_path / "hr.png", load_bundled("astronaut")[:96, :96])
    assert main(["eval", "bicubic-x2", "--data", str(tmp_path / "hr.png")]) == 0
    line = capsys.readouterr().out
    assert "psnr_y" in line and "ssim_y" in line
    assert main(["eval", "tiny-mlp", "--data", "sentences"]) == 2  # generic task: no metric
