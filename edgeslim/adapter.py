"""Task adapters on a frozen base: train on the user's labelled texts, save only the adapter, attach it.

An adapter artifact holds the adapter weights and the task head only (a few hundred KB for MiniLM),
plus the base's identity: its source (kind, identifier, version, file SHA-256) and the SHA-256 of
its state dict. It needs its base present: the zoo model its manifest names, or a source the user names
(`--base`); a factory or a folder named only by the file is never loaded (the trust rules). A base whose weights differ from the one trained on is refused.
"""
from __future__ import annotations

from collections import Counter

import copy
import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from edgeslim import artifact
from edgeslim.core.calib import CalibData
from edgeslim.compress.base import CompressResult, get_compressor
from edgeslim.compress.compacter import METHODS, state_sha256
from edgeslim.core.errors import ConfigError, SourceError
from edgeslim.evaluate import classification_metrics
from edgeslim.loaded import LoadedModel

KIND = "adapter"


def label_set(pairs: Sequence[tuple[str, str | int]]) -> list[str | int]:
    """The sorted distinct labels of the training pairs (the head's classes, stored in the artifact)."""
    return sorted({y for _, y in pairs})


def encode_pairs(loaded: LoadedModel, pairs: Sequence[tuple[str, str | int]], labels: Sequence[str | int],
                 batch_size: int, name: str) -> CalibData:
    """Tokenized batches and class-index targets; a label outside `labels` is an error naming it."""
    if loaded.encode is None:
        raise ConfigError(f"{loaded.source.identifier} has no tokenizer: adapters train on text models")
    index = {y: i for i, y in enumerate(labels)}
    unknown = sorted({str(y) for _, y in pairs if y not in index})
    if unknown:
        raise ConfigError(f"{name}: label(s) {unknown[:5]} are not among the training labels {list(labels)}")
    chunks = [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]
    return CalibData(name, [loaded.encode([t for t, _ in c]) for c in chunks],
                     [torch.tensor([index[y] for _, y in c]) for c in chunks])


@torch.inference_mode()
def evaluate(model: torch.nn.Module, data: CalibData) -> dict[str, float]:
    """Accuracy and macro-F1 of a classifier over labelled batches (edgeslim.evaluate.classification_metrics)."""
    model.eval()
    pred, gold = [], []
    for _, batch, target in data:
        pred += model(**batch).argmax(-1).tolist()
        gold += target.tolist()
    return classification_metrics(pred, gold) | {"samples": len(gold)}


def trainable_count(result: CompressResult) -> int:
    return sum(p.numel() for n, p in result.model.named_parameters() if n in set(result.resolved["trainable"]))


def save_adapter(path: str | Path, result: CompressResult, base: LoadedModel,
                 report: Mapping[str, Any] | None = None) -> Path:
    """Write an adapter artifact: the trainable parameters only, and the base's identity."""
    extra = {"kind": KIND, "base_sha256": result.resolved["base_sha256"], "labels": result.resolved.get("head", {}).get("labels")}
    return artifact.save(path, result.model, base.source, [result.step_record()], base.inputs, report,
                         "sequence-classification", base.dims, source_files=getattr(base, "files", None),
                         only=result.resolved["trainable"], manifest_extra=extra)


def attach(base: LoadedModel, path: str | Path, manifest: Mapping[str, Any] | None = None) -> LoadedModel:
    """The base with the adapter of artifact `path` attached; the base itself is not changed.

    The frozen tensors stay shared with `base.model` (several adapters on one base cost one base in
    memory); the trained ones (adapters, head, any trained norms) are the artifact's own.

    Raises:
        SourceError: the base's weights differ from the ones the adapter was trained on, or the
            stored tensors do not fit the adapter's recorded structure.
    """
    path = Path(path)
    if manifest is None:
        manifest = artifact.read_manifest(path)
        artifact.verify(path, manifest)
    if manifest.get("kind") != KIND:
        raise SourceError(f"{path} is not an adapter artifact (its manifest has no kind 'adapter')")
    step = manifest["steps"][-1] if isinstance(manifest["steps"], list) and manifest["steps"] else {}
    if not isinstance(step, dict) or step.get("method") not in METHODS:
        raise SourceError(f"{path}: the manifest's last step is not an adapter method {sorted(METHODS)}")
    found = state_sha256(base.model)
    if found != manifest.get("base_sha256"):
        src = manifest["source"]
        raise SourceError(f"{path} was trained on base {src.get('kind')} '{src.get('identifier')}' (state SHA-256 "
                          f"{str(manifest.get('base_sha256'))[:16]}...); the base given ({base.source.identifier}) "
                          f"has {found[:16]}...: attach it to the base it was trained on (--base)")
    shared = {id(t): t for t in base.model.state_dict(keep_vars=True).values()}
    try:
        model = get_compressor(step["method"]).replay(copy.deepcopy(base.model, memo=dict(shared)), step["resolved"])
    except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a manifest is data: say it is malformed
        raise SourceError(f"{path}: the adapter step in the manifest is malformed ({type(exc).__name__}: {exc})") from exc
    try:
        tensors = load_file(str(path / artifact.WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise SourceError(f"{path / artifact.WEIGHTS}: corrupt safetensors file: {exc}") from exc
    params = dict(model.named_parameters())
    expected = set(step["resolved"].get("trainable", []))
    if set(tensors) != expected or any(params[k].shape != t.shape for k, t in tensors.items() if k in params):
        raise SourceError(f"{path / artifact.WEIGHTS} does not fit the adapter's structure: missing "
                          f"{sorted(expected - set(tensors))[:5]}, unexpected {sorted(set(tensors) - expected)[:5]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if id(params[name]) in shared:  # a trained base tensor (a norm): its own storage, not the base's
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner), attr, torch.nn.Parameter(tensor.clone(), requires_grad=False))
            else:  # in place: the shared PHM rule stays one object
                params[name].copy_(tensor)
    labels = manifest.get("labels")
    return dataclasses.replace(base, model=model.eval(), task="sequence-classification" if labels else base.task,
                               steps=list(base.steps) + [dict(step)])


def base_source(path: str | Path, manifest: Mapping[str, Any]) -> str:
    """The zoo name of the base an adapter artifact records, to build from the zoo's own table
    (`edgeslim.artifact.load_zoo`), never looked up as a folder of that name in the current directory;
    a base the user names (`--base`) is loaded instead of this. `attach` then checks the base's weights by hash.

    Raises:
        SourceError: the manifest names a factory or a folder, which an artifact never loads.
    """
    src = manifest["source"]
    if src.get("kind") != "zoo" or not isinstance(src.get("identifier"), str):
        what = "names code to run" if src.get("kind") == "factory" else "is read from outside the artifact"
        raise SourceError(f"{path} is an adapter for the {src.get('kind')} base '{src.get('identifier')}', which "
                          f"{what}: an artifact never does that; pass the base yourself with --base SOURCE")
    return src["identifier"]


def train_adapter(base: LoadedModel, train: Sequence[tuple[str, str | int]], out: str | Path, method: str = "compacter",
                  settings: Mapping[str, Any] | None = None, test: Sequence[tuple[str, str | int]] | None = None,
                  batch_size: int = 16, data_name: str = "train") -> dict[str, Any]:
    """Train adapter `method` on labelled pairs over the frozen `base` (`edgeslim.sources.load_model`),
    save the adapter artifact.

    Returns a summary: trainable parameters (count, fraction of the model), artifact bytes, labels,
    and the accuracy and macro-F1 on `test` when given.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown adapter method '{method}'; choose one of {sorted(METHODS)}")
    labels = label_set(train)
    comp = get_compressor(method)
    config = comp.make_config({**dict(settings or {}), "labels": labels})
    data = encode_pairs(base, list(train), labels, batch_size, data_name)
    result = comp.compress(base.model, config, data)
    total = sum(p.numel() for p in result.model.parameters())
    summary: dict[str, Any] = {"method": method, "labels": labels, "trainable_params": trainable_count(result),
                               "total_params": total, "train": result.resolved.get("train")}
    summary["trainable_fraction"] = summary["trainable_params"] / total
    if test is not None:
        summary["eval"] = evaluate(result.model, encode_pairs(base, list(test), labels, batch_size, "eval"))
        chance = max(Counter(label for _, label in test).values()) / len(test)  # always guessing the commonest
        if summary["eval"]["accuracy"] <= chance:
            import warnings

            warnings.warn(f"held-out accuracy {summary['eval']['accuracy']:.3f} is at chance (always answering the "
                          f"commonest label scores {chance:.3f}): more data, more epochs (--epochs) or another "
                          "method", stacklevel=2)
    path = save_adapter(out, result, base, summary)
    summary["artifact"] = str(path)
    summary["artifact_bytes"] = sum(f.stat().st_size for f in Path(path).iterdir())
    summary["weights_bytes"] = (Path(path) / artifact.WEIGHTS).stat().st_size
    return summary
