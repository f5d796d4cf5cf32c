"""Load a model from any source: Hugging Face folder, factory + weights, zoo name or artifact."""
from __future__ import annotations

import importlib
import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from edgeslim.errors import ConfigError, SourceError, require
from edgeslim.files import sha256_file
from edgeslim.specs import TensorSpec

TASKS = ("embedding", "classification", "super-resolution", "generic")


@dataclass(frozen=True)
class SourceSpec:
    """The identity of a model source, recorded in every artifact's manifest."""

    kind: str  # "hf" | "factory" | "zoo" | "artifact"
    identifier: str  # folder path, "pkg.mod:factory", zoo name or artifact path
    weights: str | None = None  # weights file for a factory source
    version: str | None = None  # version of the package that provides the model
    sha256: str | None = None  # SHA-256 of the weights file

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SourceSpec":
        return cls(**{k: d.get(k) for k in ("kind", "identifier", "weights", "version", "sha256")})


@dataclass
class LoadedModel:
    """A model ready to compress/export: eval mode, called as `model(**feeds)`, returns one tensor."""

    model: nn.Module
    source: SourceSpec
    inputs: list[TensorSpec]
    task: str = "generic"
    dims: dict[str, int] = field(default_factory=lambda: {"batch": 1})  # default sizes of named dims
    encode: Callable[[Sequence[str]], dict[str, torch.Tensor]] | None = None  # texts -> feeds
    steps: list[dict[str, Any]] = field(default_factory=list)  # steps already applied (artifacts)


class TextModel(nn.Module):
    """A Hugging Face encoder as a plain module: logits for a task head, else mean-pooled embedding."""

    def __init__(self, hf: nn.Module, output: str) -> None:
        super().__init__()
        if output not in ("logits", "mean_pool"):
            raise ConfigError(f"TextModel output must be 'logits' or 'mean_pool', got {output!r}")
        self.hf = hf
        self.output = output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask)
        if self.output == "logits":
            return out.logits
        hidden = out.last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def text_inputs(vocab_size: int) -> list[TensorSpec]:
    """Input specs of a BERT-style text model with dynamic batch and sequence."""
    return [TensorSpec("input_ids", ("batch", "sequence"), "int64", high=vocab_size),
            TensorSpec("attention_mask", ("batch", "sequence"), "int64")]


def make_encoder(tokenizer: Any, max_length: int = 128) -> Callable[[Sequence[str]], dict[str, torch.Tensor]]:
    """Texts -> padded/truncated `input_ids` and `attention_mask` tensors."""
    def encode(texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    return encode


def load_hf_folder(folder: str | Path, version: str | None = None, kind: str = "hf",
                   identifier: str | None = None) -> LoadedModel:
    """Load a Hugging Face model folder offline (safetensors only).

    A `*ForSequenceClassification` folder gives logits (task "classification"); any other encoder
    gives the attention-masked mean of its last hidden state (task "embedding").
    """
    transformers = require("transformers", "data", "Hugging Face model folders")
    folder = Path(folder)
    weights = folder / "model.safetensors"
    if not (folder / "config.json").is_file():
        raise SourceError(f"{folder} is not a Hugging Face model folder (no config.json)")
    if not weights.is_file():
        raise SourceError(f"{folder} has no model.safetensors; edgeslim loads only safetensors weights "
                          "(re-save with model.save_pretrained(folder, safe_serialization=True))")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        classify = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
        auto = transformers.AutoModelForSequenceClassification if classify else transformers.AutoModel
        hf = auto.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot load the Hugging Face folder {folder}: {exc}") from exc
    model = TextModel(hf, "logits" if classify else "mean_pool").eval()
    spec = SourceSpec(kind, identifier or str(folder.resolve()), None, version, sha256_file(weights))
    return LoadedModel(model, spec, text_inputs(config.vocab_size), "classification" if classify else "embedding",
                       {"batch": 8, "sequence": 128}, make_encoder(tokenizer))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or a .pt/.pth/.bin state dict read with weights_only=True.

    Raises:
        SourceError: missing or corrupt file, or a pickled object (a full module) that is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError or OSError
            raise SourceError(f"corrupt safetensors file {path}: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise SourceError(
            f"{path} holds pickled Python objects (a whole saved module?), which edgeslim refuses to "
            "unpickle because loading it could run arbitrary code. Save the weights instead: "
            "torch.save(model.state_dict(), 'weights.pt') or safetensors.torch.save_model(model, "
            "'weights.safetensors'), and pass the factory that builds the model.") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise SourceError(f"cannot read weights file {path} (corrupt or not a torch file): {exc}") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SourceError(f"{path} is not a state dict of tensors (got {type(obj).__name__})")
    return dict(obj)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a weights file into `model` strictly, with an error naming missing/unexpected/mismatched keys."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise SourceError(f"weights {path} do not fit the model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}")
    model.load_state_dict(state, strict=True)


def parse_inputs(text: str) -> list[TensorSpec]:
    """Parse an input description "x:batch,3,224,224[:float32];mask:batch,sequence:int64"."""
    specs = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or not parts[1]:
            raise ConfigError(f"input {item!r}: expected NAME:DIM,DIM,...[:DTYPE]")
        dims = tuple(int(d) if d.strip().isdigit() else d.strip() for d in parts[1].split(","))
        specs.append(TensorSpec(parts[0], dims, parts[2] if len(parts) == 3 else "float32"))
    return specs


def load_factory(target: str, weights: str | None, inputs: str | Sequence[TensorSpec] | None) -> LoadedModel:
    """Build `pkg.mod:factory()` and load its weights file (safetensors or weights-only torch file)."""
    mod_name, _, fn_name = target.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise SourceError(f"cannot import factory '{target}': {exc}") from exc
    model = factory()
    if not isinstance(model, nn.Module):
        raise SourceError(f"factory '{target}' returned {type(model).__name__}, not a torch.nn.Module")
    sha = None
    if weights:
        load_weights(model, weights)
        sha = sha256_file(weights)
    declared = getattr(model, "edgeslim_inputs", None)
    if inputs:
        specs = parse_inputs(inputs) if isinstance(inputs, str) else list(inputs)
    elif declared:
        specs = [s if isinstance(s, TensorSpec) else TensorSpec.from_dict(s) for s in declared]
    else:
        raise ConfigError(f"factory '{target}': say the model's inputs, e.g. --input 'x:batch,3,224,224' "
                          "(or set an `edgeslim_inputs` list on the module)")
    version = _package_version(mod_name.split(".")[0])
    return LoadedModel(model.eval(), SourceSpec("factory", target, str(weights) if weights else None, version, sha),
                       specs, "generic", {"batch": 1})


def _package_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def load_model(source: str | os.PathLike, weights: str | None = None,
               inputs: str | Sequence[TensorSpec] | None = None, base: str | None = None) -> LoadedModel:
    """Load a model from a source string.

    Args:
        source: a Hugging Face folder, `pkg.module:factory`, a zoo name (`edgeslim list models`),
            or an edgeslim artifact folder (`NAME.slim`).
        weights: weights file for a factory source (.safetensors, or .pt read with weights_only=True).
        inputs: inputs of a factory source, as text ("x:batch,3,32,32") or TensorSpecs.
        base: for an adapter artifact, the base model's source when not the one its manifest records.

    Raises:
        SourceError: the path does not exist, the file is corrupt, or a pickle would be needed.
    """
    from edgeslim import zoo

    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir() and (path / "manifest.json").is_file():
        from edgeslim import artifact
        return artifact.load(path, base)
    if path.is_dir():
        return load_hf_folder(path)
    if text in zoo.names():
        return zoo.build(text)
    if ":" in text and not path.exists() and all(p.isidentifier() for p in text.partition(":")[0].split(".")):
        return load_factory(text, weights, inputs)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt") and path.is_file():
        read_state_dict(path)  # refuses a pickled module with the explanation
        raise SourceError(f"{path} is a weights file: pass the factory that builds the model as the source "
                          f"and this file as --weights")
    raise SourceError(f"unknown model source {text!r}: not a folder, not 'pkg.module:factory', not a zoo "
                      f"name (zoo: {', '.join(zoo.names())})")


def sr_scale(model: nn.Module) -> int:
    """Upscaling factor of a super-resolution model `model(x=[B, 1, H, W])`, found by probing an 8x8 input."""
    try:
        with torch.inference_mode():
            out = model(x=torch.zeros(1, 1, 8, 8))
    except (TypeError, RuntimeError) as exc:
        raise ConfigError(f"not a super-resolution model taking x=[B, 1, H, W]: {exc}") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[-1] % 8 or out.shape[-1] < 8:
        raise ConfigError(f"not a super-resolution model: 8x8 input gave output shape {tuple(out.shape)}")
    return out.shape[-1] // 8
