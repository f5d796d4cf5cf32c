"""What a loaded model is: the model, its source's identity, its inputs and task (no loading here).

The leaf every loader (sources, zoo, artifact, adapter, data) shares, so none of them imports another
for these types.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from edgeslim.core.specs import TensorSpec


@dataclass(frozen=True)
class SourceSpec:
    """The identity of a model source, recorded in every artifact's manifest."""

    kind: str  # "hf" | "factory" | "zoo" (a manifest never names an artifact: a chain records every step)
    identifier: str  # Hugging Face folder name, "pkg.mod:factory" or zoo name
    weights: str | None = None  # name of the weights file a factory source was loaded with (never re-read)
    version: str | None = None  # version of the package that provides the model
    sha256: str | None = None  # SHA-256 of the source's weights file
    files: tuple[str, ...] = ()  # small files besides weights (config, tokenizer) an artifact stores for it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"files": list(self.files)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SourceSpec":
        return cls(**{k: d.get(k) for k in ("kind", "identifier", "weights", "version", "sha256")},
                   files=tuple(d.get("files") or ()))


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
    files: dict[str, bytes] = field(default_factory=dict)  # source.files by name, stored in artifacts
