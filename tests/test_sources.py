"""Model sources: factory + weights, refused pickles, Hugging Face folders, zoo, clear errors."""
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from edgeslim.core.errors import ConfigError, SourceError
from edgeslim.sources import load_model, parse_inputs, sr_scale
from edgeslim.core.specs import TensorSpec

FACTORY = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
    def forward(self, x):
        return self.fc(x)

def build():
    return Net()

def build_declared():
    net = Net()
    net.edgeslim_inputs = [{"name": "x", "shape": ["batch", 6]}]
    return net
'''


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "userpkg_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userpkg_factory"
    sys.modules.pop("userpkg_factory", None)



def test_factory_with_safetensors_and_state_dict(tmp_path, factory):
    import userpkg_factory as f
    net = f.build()
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    x = torch.randn(2, 6)
    for weights in ("w.safetensors", "w.pt"):
        loaded = load_model(f"{factory}:build", weights=str(tmp_path / weights), inputs="x:batch,6")
        assert torch.equal(loaded.model(x=x), net(x))
        assert loaded.source.kind == "factory" and len(loaded.source.sha256) == 64
        assert loaded.inputs == [TensorSpec("x", ("batch", 6))]


def test_pickled_module_is_refused_with_explanation(tmp_path, factory):
    import userpkg_factory as f
    torch.save(f.build(), tmp_path / "whole.pt")
    with pytest.raises(SourceError, match="refuses to unpickle.*state_dict"):
        load_model(f"{factory}:build", weights=str(tmp_path / "whole.pt"), inputs="x:batch,6")
    with pytest.raises(SourceError, match="refuses to unpickle"):
        load_model(str(tmp_path / "whole.pt"))


def test_weights_that_do_not_fit(tmp_path, factory):
    save_file({"fc.weight": torch.zeros(3, 5), "fc.bias": torch.zeros(3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(SourceError, match=r"shape mismatches.*fc.weight"):
        load_model(f"{factory}:build", weights=str(tmp_path / "bad.safetensors"), inputs="x:batch,6")


def test_corrupt_and_missing_files(tmp_path, factory):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(SourceError, match="corrupt safetensors"):
        load_model(f"{factory}:build", weights=str(tmp_path / "junk.safetensors"), inputs="x:batch,6")
    with pytest.raises(SourceError, match="weights file not found"):
        load_model(f"{factory}:build", weights=str(tmp_path / "nope.pt"), inputs="x:batch,6")


def test_factory_inputs_declared_or_required(factory):
    assert load_model(f"{factory}:build_declared").inputs[0].shape == ("batch", 6)
    with pytest.raises(ConfigError, match="say the model's inputs"):
        load_model(f"{factory}:build")
    with pytest.raises(SourceError, match="cannot import factory"):
        load_model(f"{factory}:nothing", inputs="x:batch,6")


def test_unknown_source_lists_zoo():
    with pytest.raises(SourceError, match="zoo: .*tiny-mlp"):
        load_model("no-such-model")


def test_every_zoo_name_is_built_or_shipped():
    """catalog.ZOO (what `list models` prints, torch-free) and zoo.BUILDERS name the same models."""
    from edgeslim import catalog, zoo
    assert set(zoo.BUILDERS) == {n for n, e in catalog.ZOO.items() if e.shipped is None}
    with pytest.raises(SourceError, match="ships as an artifact"):
        zoo.build("espcn-x2")


def test_parse_inputs():
    specs = parse_inputs("ids:batch,sequence:int64; x:batch,3,8,8")
    assert specs == [TensorSpec("ids", ("batch", "sequence"), "int64"), TensorSpec("x", ("batch", 3, 8, 8))]
    with pytest.raises(ConfigError, match="NAME:DIM"):
        parse_inputs("x")


def _hf_folder(tmp_path, classify: bool):
    transformers = pytest.importorskip("transformers")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tok = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, num_labels=3)
    torch.manual_seed(0)
    cls = transformers.BertForSequenceClassification if classify else transformers.BertModel
    folder = tmp_path / ("cls" if classify else "enc")
    cls(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("classify", [True, False])
def test_hugging_face_folder(tmp_path, classify):
    folder = _hf_folder(tmp_path, classify)
    loaded = load_model(str(folder))
    feeds = loaded.encode(["the cat sat", "on the mat"])
    out = loaded.model(**feeds)
    assert loaded.task == ("sequence-classification" if classify else "feature-extraction")
    assert out.shape == ((2, 3) if classify else (2, 16))
    assert [s.name for s in loaded.inputs] == ["input_ids", "attention_mask"]


def test_hugging_face_folder_without_safetensors(tmp_path):
    folder = _hf_folder(tmp_path, False)
    (folder / "model.safetensors").unlink()
    with pytest.raises(SourceError, match="only safetensors"):
        load_model(str(folder))


def test_zoo_models_and_sr_scale():
    assert load_model("tiny-bert").task == "feature-extraction"
    assert sr_scale(load_model("bicubic-x3").model) == 3
    with pytest.raises(ConfigError, match="not a super-resolution model"):
        sr_scale(nn.Conv2d(1, 1, 3, padding=1))
