"""What a Hugging Face model is for: its task, the class that loads it, its inputs and its outputs.

A folder loads with the class its `config.json` names (`architectures`) or the task the user gives:
- causal-lm: `*ForCausalLM` / `*LMHeadModel`, output next-token logits [B, L, V];
- sequence-classification: logits [B, C];
- feature-extraction: the attention-masked mean of the last hidden state [B, H] (an encoder-decoder
  such as T5 gives its encoder only);
- image-classification: `pixel_values` [B, C, H, W] (size from the image processor config), logits;
- seq2seq: `*ForConditionalGeneration`, decoder logits [B, L', V] for given decoder inputs.
Manifests written before these names existed say embedding / classification; `canonical_task` maps them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from edgeslim.core.errors import ConfigError, SourceError
from edgeslim.core.specs import TensorSpec

TASKS = ("causal-lm", "sequence-classification", "feature-extraction", "image-classification", "seq2seq",
         "super-resolution", "generic")
LEGACY_TASKS = {"embedding": "feature-extraction", "classification": "sequence-classification"}
TEXT_SEQUENCE = 128  # default sequence length of text encoders (within the model's positions)
LM_SEQUENCE = 256  # default sequence length of causal LMs
_AUTO = {"causal-lm": "AutoModelForCausalLM", "sequence-classification": "AutoModelForSequenceClassification",
         "image-classification": "AutoModelForImageClassification", "seq2seq": "AutoModelForSeq2SeqLM",
         "feature-extraction": "AutoModel"}


def canonical_task(task: str, inputs: Sequence[TensorSpec] = ()) -> str:
    """The current name of a task, mapping the old manifest names (an old 'classification' model with
    a 4-d float input is an image classifier).

    Raises:
        ConfigError: an unknown task (the known ones are listed).
    """
    if task == "classification" and any(len(s.shape) == 4 and s.dtype.startswith("float") for s in inputs):
        return "image-classification"
    task = LEGACY_TASKS.get(task, task)
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return task


def task_from_architectures(architectures: Sequence[str] | None) -> str:
    """The task a config.json's `architectures` names (feature-extraction for a bare model)."""
    arch = (architectures or [""])[0]
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if arch.endswith("ForSequenceClassification"):
        return "sequence-classification"
    if arch.endswith("ForImageClassification"):
        return "image-classification"
    if arch.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")):
        return "seq2seq"
    return "feature-extraction"


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return hidden.mean(1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class _HeadOrPool(nn.Module):
    """A Hugging Face model as a plain module: logits for a task head (`output="logits"`), else the
    mean-pooled last hidden state (`output="mean_pool"`)."""

    def __init__(self, hf: nn.Module, output: str) -> None:
        super().__init__()
        if output not in ("logits", "mean_pool"):
            raise ConfigError(f"{type(self).__name__} output must be 'logits' or 'mean_pool', got {output!r}")
        self.hf = hf
        self.output = output


class TextModel(_HeadOrPool):
    """A Hugging Face encoder: logits, or the attention-masked mean of its tokens (an embedding)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask)
        if self.output == "logits":
            return out.logits
        return _mean_pool(out.last_hidden_state, attention_mask)


class ImageModel(_HeadOrPool):
    """A Hugging Face vision model: logits, or the mean of its tokens."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.hf(pixel_values=pixel_values)
        return out.logits if self.output == "logits" else _mean_pool(out.last_hidden_state, None)


def text_inputs(vocab_size: int) -> list[TensorSpec]:
    """Input specs of a BERT-style text model with dynamic batch and sequence."""
    return [TensorSpec("input_ids", ("batch", "sequence"), "int64", high=vocab_size),
            TensorSpec("attention_mask", ("batch", "sequence"), "int64")]


class Seq2SeqModel(nn.Module):
    """A Hugging Face encoder-decoder as a plain module: decoder logits for the given decoder inputs."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoder_input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                       use_cache=False).logits


@dataclass
class TaskModel:
    """A loaded Hugging Face model with everything the task decides."""

    model: nn.Module
    task: str
    inputs: list[TensorSpec]
    dims: dict[str, int]
    encode: Callable[[Sequence[Any]], dict[str, torch.Tensor]] | None  # texts (or RGB images) -> feeds


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's position embeddings allow (None: no limit, e.g. relative ones)."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def hf_config(model: nn.Module) -> Any:
    """The Hugging Face config inside a wrapped model (TextModel, ImageModel, Seq2SeqModel), or None."""
    hf = getattr(model, "hf", None)
    return getattr(hf, "config", None)


def lm_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token class targets of a causal LM batch: ids shifted left, -100 (ignored) at the last
    position and after padding, so cross-entropy on the logits is the LM loss."""
    targets = input_ids.roll(-1, dims=1)
    keep = attention_mask.roll(-1, dims=1).bool() & attention_mask.bool()
    keep[:, -1] = False
    return targets.masked_fill(~keep, -100)


def _tokenizer(transformers: Any, folder: Path, task: str, **kwargs: Any) -> Any:
    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                         **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise SourceError(f"cannot load the tokenizer of {folder} (task {task}): {exc}") from exc
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise SourceError(f"the tokenizer of {folder} has neither a pad nor an end-of-sequence token")
        tok.pad_token = tok.eos_token  # causal LMs (GPT-2, LLaMA) ship without one
    return tok


def text_encoder(tokenizer: Any, max_length: int, decoder_start: int | None = None
                 ) -> Callable[[Sequence[str]], dict[str, torch.Tensor]]:
    """Texts -> `input_ids`, `attention_mask` padded/truncated to max_length (and for a seq2seq model
    `decoder_input_ids`: the same ids shifted right behind the decoder start token)."""
    def encode(texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
        feeds = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if decoder_start is not None:
            ids = enc["input_ids"]
            feeds["decoder_input_ids"] = torch.cat([torch.full_like(ids[:, :1], decoder_start), ids[:, :-1]], 1)
        return feeds
    encode.tokenizer = tokenizer  # for whole-document work (perplexity windows)
    return encode


def image_size(folder: Path, config: Any) -> tuple[int, int]:
    """(height, width) the model expects: the image processor config's `size`/`crop_size`, else config.image_size."""
    proc = _processor_config(folder)
    size = proc.get("crop_size") if proc.get("do_center_crop") else proc.get("size")
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
    if isinstance(size, int):
        return size, size
    side = getattr(config, "image_size", None)
    if isinstance(side, (list, tuple)):
        return int(side[0]), int(side[1])
    if isinstance(side, int):
        return side, side
    raise SourceError(f"{folder}: no image size in preprocessor_config.json or config.json")


def _processor_config(folder: Path) -> dict[str, Any]:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"corrupt {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def pixel_encoder(height: int, width: int, mean: Sequence[float], std: Sequence[float], scale: float = 1 / 255,
                  name: str = "pixel_values") -> Callable[[Sequence[np.ndarray]], dict[str, torch.Tensor]]:
    """RGB uint8 images [H, W, 3] (grey replicated, alpha dropped) -> input `name` [N, 3, height, width]:
    bicubic resize, multiplied by `scale`, normalized by `mean`/`std` per channel."""
    from edgeslim.images import resize_bicubic

    mean_a, std_a = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)

    def encode(images: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        rgb = [np.repeat(im[..., None], 3, -1) if im.ndim == 2 else im[..., :3] for im in map(np.asarray, images)]
        out = [((resize_bicubic(im.astype(np.uint8), height, width).astype(np.float32) * scale - mean_a) / std_a)
               .transpose(2, 0, 1) for im in rgb]
        return {name: torch.from_numpy(np.stack(out).astype(np.float32))}
    return encode


def image_encoder(folder: Path, config: Any) -> Callable[[Sequence[np.ndarray]], dict[str, torch.Tensor]]:
    """`pixel_encoder` at the model's size, with the processor's `rescale_factor` (1/255) and
    `image_mean`/`image_std`."""
    proc = _processor_config(folder)
    height, width = image_size(folder, config)
    return pixel_encoder(height, width, proc.get("image_mean", [0.5] * 3), proc.get("image_std", [0.5] * 3),
                         float(proc.get("rescale_factor", 1 / 255)))


def _model_class(transformers: Any, config: Any, task: str) -> Any:
    arch = (config.architectures or [""])[0]
    if task == "feature-extraction" and arch.endswith("EncoderModel") and hasattr(transformers, arch):
        return getattr(transformers, arch)  # e.g. T5EncoderModel: the encoder alone
    return getattr(transformers, _AUTO[task])


def refuse_remote_code(folder: Path) -> None:
    """SourceError (exit 3) when a folder's config names code to import (`auto_map`): a model is data, never code."""
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json"):
        path = folder / name
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            continue  # unreadable here: the loader that reads it says why
        if isinstance(data, dict) and data.get("auto_map"):
            raise SourceError(f"{path} names custom code to run (auto_map); edgeslim never runs code from a model "
                              "folder: use a model whose architecture transformers ships")


_SPEECH_MAPS = ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "MODEL_FOR_CTC_MAPPING_NAMES",
                "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES")


def refuse_speech(transformers: Any, config: Any, folder: Path) -> None:
    """ConfigError for a speech model (Whisper, wav2vec2, ...): its inputs are audio features
    (`input_features` / `input_values`), which no task here feeds; refused before any weight is read."""
    from transformers.models.auto import modeling_auto

    kind = getattr(config, "model_type", None)
    if any(kind in getattr(modeling_auto, name, {}) for name in _SPEECH_MAPS):
        raise ConfigError(f"{folder} is a speech model ({kind}: audio features in, not text or pixels); edgeslim's "
                          f"tasks do not feed audio yet, so it is not loaded")


def load_task_model(folder: Path, task: str | None = None, weights: bool = True) -> TaskModel:
    """Load a Hugging Face folder for `task` (default: the one its config's `architectures` names).

    `weights=False` builds the architecture from config.json alone (an artifact supplies the weights).

    Raises:
        ConfigError: an unknown task, or one this model has no head for.
        SourceError: the folder, its weights or its tokenizer cannot be loaded.
    """
    from edgeslim.core.errors import require

    transformers = require("transformers", "data", "Hugging Face model folders")
    refuse_remote_code(folder)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {folder / 'config.json'}: {exc}") from exc
    refuse_speech(transformers, config, folder)
    task = canonical_task(task) if task else task_from_architectures(config.architectures)
    if task not in _AUTO:
        raise ConfigError(f"task {task!r} is not a Hugging Face task; use one of {', '.join(_AUTO)}")
    if hasattr(config, "use_cache"):
        config.use_cache = False  # plain logits, no key/value cache in the outputs or the ONNX graph
    auto = _model_class(transformers, config, task)
    try:
        hf = (auto.from_pretrained(folder, config=config, local_files_only=True, use_safetensors=True,
                                   trust_remote_code=False) if weights
              else auto.from_config(config, trust_remote_code=False) if hasattr(auto, "from_config")
              else auto(config))  # Auto* or a class
    except ValueError as exc:
        raise ConfigError(f"{folder} cannot be loaded for task {task!r}: {str(exc).splitlines()[0]}") from exc
    except Exception as exc:  # transformers and safetensors raise many classes for a bad folder
        raise SourceError(f"cannot load the Hugging Face folder {folder}: "
                          f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
    hf.eval()
    if task == "feature-extraction" and getattr(config, "is_encoder_decoder", False):
        hf = hf.get_encoder()  # a seq2seq model's encoder: no random or unused decoder
    return _wrap(hf, folder, config, task, transformers)


def _wrap(hf: nn.Module, folder: Path, config: Any, task: str, transformers: Any) -> TaskModel:
    output = "mean_pool" if task == "feature-extraction" else "logits"
    if getattr(hf, "main_input_name", "input_ids") == "pixel_values":
        height, width = image_size(folder, config)
        channels = int(getattr(config, "num_channels", 3))
        return TaskModel(ImageModel(hf, output).eval(), task,
                         [TensorSpec("pixel_values", ("batch", channels, height, width))], {"batch": 8},
                         image_encoder(folder, config))
    if task == "image-classification":
        raise ConfigError(f"{folder}: task image-classification needs a vision model (pixel_values input)")
    positions = max_positions(config)
    length = LM_SEQUENCE if task == "causal-lm" else TEXT_SEQUENCE
    length = min(length, positions) if positions else length
    tok = _tokenizer(transformers, folder, task)
    vocab = int(getattr(config, "vocab_size", None) or len(tok))
    if task == "seq2seq":
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else tok.pad_token_id
        inputs = text_inputs(vocab) + [TensorSpec("decoder_input_ids", ("batch", "decoder_sequence"), "int64",
                                                  high=vocab)]
        return TaskModel(Seq2SeqModel(hf).eval(), task, inputs,
                         {"batch": 8, "sequence": length, "decoder_sequence": length},
                         text_encoder(tok, length, int(start)))
    return TaskModel(TextModel(hf, output).eval(), task, text_inputs(vocab), {"batch": 8, "sequence": length},
                     text_encoder(tok, length))
