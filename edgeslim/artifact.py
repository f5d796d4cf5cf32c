"""The `.slim` artifact: manifest.json + weights.safetensors + report.json, reloaded by replay.

`load()` rebuilds the source model, replays each recorded step's structure without recomputing it
(no calibration data needed), loads the weights, and refuses files whose SHA-256 does not match.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from edgeslim.errors import SourceError
from edgeslim.files import atomic_path, sha256_file
from edgeslim.sources import LoadedModel, SourceSpec
from edgeslim.specs import TensorSpec

FORMAT_VERSION = 1
MANIFEST, WEIGHTS, REPORT = "manifest.json", "weights.safetensors", "report.json"


def save(path: str | Path, model: nn.Module, source: SourceSpec, steps: Sequence[Mapping[str, Any]],
         inputs: Sequence[TensorSpec], report: Mapping[str, Any] | None = None, task: str = "generic",
         dims: Mapping[str, int] | None = None, extra_files: Mapping[str, bytes] | None = None,
         only: Sequence[str] | None = None, manifest_extra: Mapping[str, Any] | None = None) -> Path:
    """Write the artifact folder `path` all at once (temporary folder renamed at the end).

    Args:
        steps: one record per applied step (`CompressResult.step_record()`).
        extra_files: more files to store and hash (e.g. the Markdown report and its plot).
        only: store just these parameters (an adapter artifact: adapters and head, not the base).
        manifest_extra: more manifest keys (an adapter artifact's "kind" and base identity).
    """
    from edgeslim import __version__
    from safetensors.torch import save_file, save_model

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        if only is None:
            save_model(model, str(tmp / WEIGHTS))
        else:
            wanted = set(only)
            save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if n in wanted},
                      str(tmp / WEIGHTS))
        (tmp / REPORT).write_text(json.dumps(report or {}, indent=2, default=str))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format_version": FORMAT_VERSION, "edgeslim_version": __version__, "source": source.to_dict(),
                    "task": task, "inputs": [s.to_dict() for s in inputs], "dims": dict(dims or {}),
                    "steps": [dict(s) for s in steps], "files": files, **dict(manifest_extra or {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # a value that is not JSON is a bug
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


def replay(base: nn.Module, steps: Sequence[Mapping[str, Any]], inputs: Sequence[TensorSpec]) -> nn.Module:
    """Apply each step's recorded structure to `base` (no data, no recomputation).

    Raises:
        SourceError: a step's `resolved` has a schema its compressor does not read.
    """
    from edgeslim.compress.base import get_compressor

    model = base
    for i, step in enumerate(steps):
        comp, resolved = get_compressor(step["method"]), step.get("resolved", {})
        schema = resolved.get("schema", 1)  # artifacts written before schemas were recorded are schema 1
        if schema != comp.schema:
            raise SourceError(f"step {i + 1} ({comp.name}) was written with resolved schema {schema!r}; this "
                              f"edgeslim's {comp.name} reads schema {comp.schema}")
        model = comp.replay(model, resolved, inputs)
    return model


def load(path: str | Path, base: str | None = None) -> LoadedModel:
    """Rebuild the compressed model of artifact `path`.

    An adapter artifact (manifest kind "adapter") is attached to its base: `base` (a source the
    user names) or the zoo model / folder its manifest records, checked by SHA-256.

    Raises:
        SourceError: not an artifact, unknown format version, a missing or modified file, or
            weights that do not fit the replayed structure.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_safetensors

    from edgeslim.sources import load_model

    path = Path(path)
    manifest = read_manifest(path)
    verify(path, manifest)
    if manifest.get("kind") == "adapter":
        from edgeslim.adapter import load_adapter
        return load_adapter(path, manifest, base)
    spec = SourceSpec.from_dict(manifest["source"])
    inputs = [TensorSpec.from_dict(s) for s in manifest["inputs"]]
    base = load_model(spec.identifier, weights=spec.weights, inputs=inputs if spec.kind == "factory" else None)
    model = replay(base.model, manifest["steps"], inputs)
    try:
        load_safetensors(model, str(path / WEIGHTS), strict=True)
    except (RuntimeError, SafetensorError) as exc:
        raise SourceError(f"{path / WEIGHTS} does not fit the replayed model: {exc}") from exc
    return LoadedModel(model.eval(), spec, inputs, manifest.get("task", base.task), manifest.get("dims") or base.dims,
                       base.encode, list(base.steps) + list(manifest["steps"]))
