"""The `.slim` artifact: manifest.json + weights.safetensors + report.json, reloaded by replay.

`load()` rebuilds the source model, replays each recorded step's structure without recomputing it
(no calibration data needed), loads the weights, and refuses files whose SHA-256 does not match.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from edgeslim.errors import SourceError
from edgeslim.files import atomic_path, sha256_file
from edgeslim.sources import LoadedModel, SourceSpec
from edgeslim.specs import TensorSpec
from edgeslim.tasks import canonical_task

FORMAT_VERSION = 1
MANIFEST, WEIGHTS, REPORT = "manifest.json", "weights.safetensors", "report.json"


def save(path: str | Path, model: nn.Module, source: SourceSpec, steps: Sequence[Mapping[str, Any]],
         inputs: Sequence[TensorSpec], report: Mapping[str, Any] | None = None, task: str = "generic",
         dims: Mapping[str, int] | None = None, extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write the artifact folder `path` all at once (temporary folder renamed at the end).

    Args:
        steps: one record per applied step (`CompressResult.step_record()`).
        extra_files: more files to store and hash (e.g. the Markdown report and its plot).
    """
    from edgeslim import __version__
    from safetensors.torch import save_model

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_model(model, str(tmp / WEIGHTS))
        (tmp / REPORT).write_text(json.dumps(report or {}, indent=2, default=str))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format_version": FORMAT_VERSION, "edgeslim_version": __version__, "source": source.to_dict(),
                    "task": task, "inputs": [s.to_dict() for s in inputs], "dims": dict(dims or {}),
                    "steps": [dict(s) for s in steps], "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of artifact `path`, checked for format version (files not yet verified)."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise SourceError(f"{path} is not an edgeslim artifact (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"corrupt manifest {file}: {exc}") from exc
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise SourceError(f"{file}: unknown artifact format version {version!r} (this edgeslim reads "
                          f"{FORMAT_VERSION}); re-create it with the edgeslim that reads it")
    for key in ("source", "steps", "inputs", "files"):
        if key not in manifest:
            raise SourceError(f"{file}: manifest has no '{key}'")
    return manifest


def verify(path: str | Path, manifest: Mapping[str, Any]) -> dict[str, str]:
    """Check every recorded file's SHA-256; returns {file: "ok"} or raises SourceError naming the file."""
    path = Path(path)
    status = {}
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise SourceError(f"{path}: file {name} listed in the manifest is missing")
        if sha256_file(file) != digest:
            raise SourceError(f"{path}: {name} does not match its SHA-256 in the manifest "
                              "(modified or corrupt); refusing to load it")
        status[name] = "ok"
    return status


def replay(base: nn.Module, steps: Sequence[Mapping[str, Any]]) -> nn.Module:
    """Apply each step's recorded structure to `base` (no data, no recomputation)."""
    from edgeslim.compress.base import get_compressor

    model = base
    for step in steps:
        model = get_compressor(step["method"]).replay(model, step.get("resolved", {}))
    return model


def load_source(manifest: Mapping[str, Any]) -> LoadedModel:
    """The original model an artifact's manifest names, loaded for the recorded task (with the
    manifest's source spec, inputs and task; no step applied)."""
    from edgeslim.sources import load_model

    spec = SourceSpec.from_dict(manifest["source"])
    inputs = [TensorSpec.from_dict(s) for s in manifest["inputs"]]
    recorded = manifest.get("task")
    task = canonical_task(recorded, inputs) if recorded else None
    base = load_model(spec.identifier, weights=spec.weights, inputs=inputs if spec.kind == "factory" else None,
                      task=task if spec.kind == "hf" else None)
    return dataclasses.replace(base, source=spec, inputs=inputs, task=task or base.task)


def load(path: str | Path) -> LoadedModel:
    """Rebuild the compressed model of artifact `path`.

    Raises:
        SourceError: not an artifact, unknown format version, a missing or modified file, or
            weights that do not fit the replayed structure.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_safetensors

    path = Path(path)
    manifest = read_manifest(path)
    verify(path, manifest)
    base = load_source(manifest)
    spec, inputs, task = base.source, base.inputs, base.task
    model = replay(base.model, manifest["steps"])
    try:
        load_safetensors(model, str(path / WEIGHTS), strict=True)
    except (RuntimeError, SafetensorError) as exc:
        raise SourceError(f"{path / WEIGHTS} does not fit the replayed model: {exc}") from exc
    return LoadedModel(model.eval(), spec, inputs, task, manifest.get("dims") or base.dims,
                       base.encode, list(base.steps) + list(manifest["steps"]))
