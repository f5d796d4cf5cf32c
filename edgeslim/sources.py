"""Load a model from any source: Hugging Face folder, factory + weights, zoo name or artifact.

The top of the loading modules: `load_model` dispatches to the loaders (`edgeslim.loaders`), the zoo's
table (`edgeslim.zoo`), the artifact loader (`edgeslim.artifact`, which also builds the zoo's packaged
artifacts) and the adapter attach (`edgeslim.adapter`); none of them imports this module.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from edgeslim import adapter, artifact, zoo
from edgeslim.core.errors import ConfigError, SourceError
from edgeslim.loaded import LoadedModel, SourceSpec  # noqa: F401  (re-exported: the public names)
from edgeslim.loaders import (  # noqa: F401  (re-exported: the public names)
    check_inputs, load_factory, load_hf_folder, load_weights, make_encoder, parse_inputs, read_state_dict, sr_scale)
from edgeslim.core.specs import TensorSpec
from edgeslim.tasks import TextModel, text_inputs  # noqa: F401  (re-exported: the public names)
from edgeslim.trust import Trust, is_factory_name


def load_model(source: str | os.PathLike, weights: str | None = None,
               inputs: str | Sequence[TensorSpec] | None = None, task: str | None = None,
               trust: Trust | None = None, base: str | None = None) -> LoadedModel:
    """Load a model from a source string the user gave.

    Args:
        source: a Hugging Face folder, `pkg.module:factory`, a zoo name (`edgeslim list models`),
            or an edgeslim artifact folder (`NAME.slim`).
        weights: weights file for a factory source (.safetensors, or .pt read with weights_only=True).
        inputs: inputs of a factory source, as text ("x:batch,3,32,32") or TensorSpecs.
        task: what a Hugging Face folder is loaded for (`causal-lm`, `sequence-classification`,
            `feature-extraction`, `image-classification`, `seq2seq`); default from its config.json.
        trust: the factories an artifact's manifest may name (`edgeslim.trust`); default none.
        base: for an adapter artifact, the base model's source when not the one its manifest records.

    Raises:
        SourceError: the path does not exist, the file is corrupt, a pickle would be needed, or an
            artifact names a factory the user did not allow.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir() and (path / artifact.MANIFEST).exists():
        manifest = artifact.read_manifest(path)
        if manifest.get("kind") == adapter.KIND:  # attached to its base, which may be any source
            artifact.verify(path, manifest)
            base_model = (load_model(base) if base is not None  # the user's word, else the zoo's own table
                          else artifact.load_zoo(adapter.base_source(path, manifest)))
            return adapter.attach(base_model, path, manifest)
        return artifact.load(path, trust)
    if path.is_dir():
        return load_hf_folder(path, task=task)
    if text in zoo.names():
        return artifact.load_zoo(text)
    if not path.exists() and is_factory_name(text):
        return load_factory(text, weights, inputs)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt") and path.is_file():
        read_state_dict(path)  # refuses a pickled module with the explanation
        raise SourceError(f"{path} is a weights file: pass the factory that builds the model as the source "
                          f"and this file as --weights")
    raise SourceError(f"unknown model source {text!r}: not a folder, not 'pkg.module:factory', not a zoo "
                      f"name (zoo: {', '.join(zoo.names())})")


def reference_of(item: str | Path, loaded: LoadedModel, reference: str | None = None) -> LoadedModel | None:
    """The original model `loaded` (loaded from `item`) was compressed from, for the encoder agreement:
    `reference` when the user names it, else the zoo model an artifact records; None when `item` is
    not an artifact (its agreement with itself is the baseline).

    An artifact holds no copy of its source's weights and never reads files outside itself, so the
    original of a Hugging Face folder or factory source is named by the user.

    Raises:
        ConfigError: an artifact of a non-zoo source and no `reference`.
    """
    if reference is not None:
        return load_model(reference, task=loaded.task)
    path = Path(item)
    if not (path.is_dir() and (path / "manifest.json").is_file()):
        return None
    if loaded.source.kind == "zoo":
        return artifact.load_zoo(loaded.source.identifier)  # the zoo's table, never a folder of that name
    raise ConfigError(f"{item} was made from the {loaded.source.kind} source '{loaded.source.identifier}', whose "
                      "weights the artifact does not hold: name the original with --reference SOURCE")
