"""Build a model from one kind of source: a Hugging Face folder, or a `pkg.mod:factory` and its weights file.

The loaders `edgeslim.sources.load_model` (any source), the zoo and the artifact loader share; no
pickles ever (safetensors, or torch.load(weights_only=True)).
"""
from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from edgeslim.core.errors import ConfigError, SourceError
from edgeslim.core.files import sha256_file
from edgeslim.loaded import LoadedModel, SourceSpec
from edgeslim.core.specs import TensorSpec
from edgeslim.tasks import load_task_model, text_encoder


def make_encoder(tokenizer: Any, max_length: int = 128) -> Callable[[Sequence[str]], dict[str, torch.Tensor]]:
    """Texts -> padded/truncated `input_ids` and `attention_mask` tensors."""
    return text_encoder(tokenizer, max_length)


# Small files a Hugging Face model needs besides its weights; an artifact of an "hf" source stores them.
HF_SOURCE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "preprocessor_config.json",
                   "processor_config.json")


def load_hf_folder(folder: str | Path, version: str | None = None, kind: str = "hf",
                   identifier: str | None = None, task: str | None = None, weights: bool = True) -> LoadedModel:
    """Load a Hugging Face model folder offline (safetensors only) for `task` (edgeslim/tasks.py).

    Without a task, the one the config's `architectures` names: a `*ForCausalLM` gives next-token
    logits, a `*ForSequenceClassification` class logits, a bare encoder the attention-masked mean of
    its last hidden state (feature-extraction), a vision model `pixel_values` inputs. An "hf" source
    records the folder's name and its weights' SHA-256 and keeps its small files (config, tokenizer)
    so an artifact made from it loads without the folder.

    Args:
        weights: False builds the architecture from config.json alone (an artifact supplies the weights).
    """
    from edgeslim.noise import quiet_transformers

    quiet_transformers()
    folder = Path(folder)
    weights_file = folder / "model.safetensors"
    if not (folder / "config.json").is_file():
        raise SourceError(f"{folder} is not a Hugging Face model folder (no config.json)")
    if weights and not weights_file.is_file():
        raise SourceError(f"{folder} has no model.safetensors; edgeslim loads only safetensors weights "
                          "(re-save with model.save_pretrained(folder, safe_serialization=True))")
    loaded = load_task_model(folder, task, weights=weights)
    files = {n: (folder / n).read_bytes() for n in HF_SOURCE_FILES if (folder / n).is_file()} if kind == "hf" else {}
    spec = SourceSpec(kind, identifier or folder.resolve().name, None, version,
                      sha256_file(weights_file) if weights else None, tuple(files))
    return LoadedModel(loaded.model, spec, loaded.inputs, loaded.task, loaded.dims, loaded.encode, files=files)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


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
        if "can still be loaded" not in str(exc):  # torch's words for a real pickle of Python objects
            raise SourceError(f"cannot read weights file {path}: not a torch state dict") from exc
        raise SourceError(
            f"{path} holds pickled Python objects (a whole saved module?), which edgeslim refuses to "
            "unpickle because loading it could run arbitrary code. Save the weights instead: "
            "torch.save(model.state_dict(), 'weights.pt') or safetensors.torch.save_model(model, "
            "'weights.safetensors'), and pass the factory that builds the model.") from exc
    except Exception as exc:  # torch.load raises RuntimeError, EOFError, IndexError, ... on a foreign file
        raise SourceError(f"cannot read weights file {path} (corrupt or not a torch file): {_one_line(exc)}") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SourceError(f"{path} is not a state dict of tensors (got {type(obj).__name__})")
    return dict(obj)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a weights file into `model` strictly, with an error naming missing/unexpected/mismatched keys.

    A tied parameter (an LM head sharing the input embedding) may appear under any one of its names:
    safetensors.torch.save_model keeps one, a torch state dict keeps all.
    """
    from edgeslim.compress.replace import tied_parameters

    state = read_state_dict(path)
    own = model.state_dict()
    tied = tied_parameters(model)
    missing = sorted(k for k in set(own) - set(state) if not any(t in state for t in tied.get(k, ())))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise SourceError(f"weights {path} do not fit the model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}")
    model.load_state_dict(state, strict=not tied)  # every key was checked above


def parse_inputs(text: str) -> list[TensorSpec]:
    """Parse an input description "x:batch,3,224,224[:float32];mask:batch,sequence:int64".

    A dimension is a positive integer (fixed) or a name (dynamic: "batch", "sequence", ...).
    """
    specs = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or not parts[0].strip().isidentifier() or not parts[1].strip():
            raise ConfigError(f"input {item!r}: expected NAME:DIM,DIM,...[:DTYPE], e.g. 'x:batch,3,224,224'")
        dims: list[int | str] = []
        for d in (d.strip() for d in parts[1].split(",")):
            if d.isdigit() and int(d) > 0:
                dims.append(int(d))
            elif d.isidentifier():
                dims.append(d)
            else:
                raise ConfigError(f"input {item!r}: dimension {d!r} is neither a positive integer nor a name")
        specs.append(TensorSpec(parts[0].strip(), tuple(dims), parts[2].strip() if len(parts) == 3 else "float32"))
    if not specs:
        raise ConfigError(f"--input {text!r} names no input; expected NAME:DIM,DIM,...[:DTYPE]")
    return specs


INPUT_HINT = "give the right shapes with --input 'x:batch,3,224,224'"


def check_inputs(model: nn.Module, inputs: Sequence[TensorSpec], dims: Mapping[str, int], what: str,
                 hint: str = INPUT_HINT) -> None:
    """Run one forward pass on example inputs so a wrong input spec fails now, not in a saved artifact.

    Named dimensions take their size from `dims` (batch 1), others 8.

    Raises:
        ConfigError: the model does not run on inputs of that spec (the model's own error is quoted).
    """
    from edgeslim.core.specs import dynamic_dims, example_feeds

    sizes = {d: 8 for d in dynamic_dims(inputs)} | dict(dims) | {"batch": 1}
    feeds = {k: torch.from_numpy(v) for k, v in example_feeds(inputs, sizes, seed=0).items()}
    try:
        with torch.inference_mode():
            model(**feeds)
    except Exception as exc:  # the user's model may raise anything on inputs it does not take
        shown = "; ".join(f"{s.name}[{', '.join(map(str, s.shape))}] {s.dtype}" for s in inputs)
        raise ConfigError(f"{what} does not run on its inputs {shown}: {_one_line(exc)} ({hint})") from exc


def load_factory(target: str, weights: str | None, inputs: str | Sequence[TensorSpec] | None) -> LoadedModel:
    """Build `pkg.mod:factory()` and load its weights file (safetensors or weights-only torch file).

    Only for a factory the user named (command line, recipe) or allowed (`edgeslim.trust.Trust`).
    """
    mod_name, _, fn_name = target.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except Exception as exc:  # ImportError, AttributeError, or whatever the module raises on import
        raise SourceError(f"cannot import factory '{target}': {_one_line(exc)}") from exc
    try:
        model = factory()
    except Exception as exc:  # the user's code
        raise SourceError(f"factory '{target}' raised {_one_line(exc)}") from exc
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
        try:
            specs = [s if isinstance(s, TensorSpec) else TensorSpec.from_dict(s) for s in declared]
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"factory '{target}': its edgeslim_inputs are not input specs: {_one_line(exc)}") from exc
    else:
        raise ConfigError(f"factory '{target}': say the model's inputs, e.g. --input 'x:batch,3,224,224' "
                          "(or set an `edgeslim_inputs` list on the module)")
    check_inputs(model.eval(), specs, {}, f"factory '{target}'")
    version = _package_version(mod_name.split(".")[0])
    return LoadedModel(model.eval(), SourceSpec("factory", target, Path(weights).name if weights else None, version, sha),
                       specs, "generic", {"batch": 1})


def _package_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


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
