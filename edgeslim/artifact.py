"""The `.slim` artifact: manifest.json + weights.safetensors + report.json, reloaded by replay.

`load()` rebuilds the source model, replays each recorded step's structure without recomputing it
(no calibration data needed), loads the weights, and refuses files whose SHA-256 does not match.

An artifact is data, never code. The manifest is checked field by field before use; every file the
loader reads is listed in it and hash-checked; file names are plain names inside the folder (no
`..`, no absolute paths, no symlinks). The source is a zoo name (resolved only through the zoo's own
table), a Hugging Face model rebuilt from the config and tokenizer files stored in the artifact, or a
`pkg.mod:factory` that is imported only when the user allows it (`edgeslim.trust.Trust`). A chained
artifact (made by compressing an artifact) records every step from the original source.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from edgeslim.core.errors import ConfigError, EdgeslimError, SourceError
from edgeslim.core.files import ARTIFACT, OWNER, is_plain_name, replace_output, sha256_file
from edgeslim import zoo
from edgeslim.loaded import LoadedModel, SourceSpec
from edgeslim.loaders import check_inputs, load_factory, load_hf_folder
from edgeslim.core.specs import MAX_ELEMENTS, TensorSpec
from edgeslim.tasks import canonical_task
from edgeslim.trust import Trust, is_factory_name

FORMAT_VERSION = 2  # 2: every read file listed, plain names, sources stored or trusted, chained steps
MANIFEST, WEIGHTS, REPORT = "manifest.json", "weights.safetensors", "report.json"
SOURCE_PREFIX = "source."  # an "hf" source's config and tokenizer files are stored as source.NAME
SOURCE_KINDS = ("zoo", "factory", "hf")
MAX_MANIFEST_BYTES = 16 << 20
MAX_LOAD_ELEMENTS = 1 << 22  # elements of one example input at the recorded dims (the load's forward pass)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def save(path: str | Path, model: nn.Module, source: SourceSpec, steps: Sequence[Mapping[str, Any]],
         inputs: Sequence[TensorSpec], report: Mapping[str, Any] | None = None, task: str = "generic",
         dims: Mapping[str, int] | None = None, extra_files: Mapping[str, bytes] | None = None,
         source_files: Mapping[str, bytes] | None = None, only: Sequence[str] | None = None,
         manifest_extra: Mapping[str, Any] | None = None) -> Path:
    """Write the artifact folder `path` all at once (temporary folder renamed in at the end).

    The model is run once on example inputs of `inputs` first, so an input spec that does not fit the
    model never reaches an artifact.

    Args:
        steps: every step applied since `source` (`CompressResult.step_record()`), oldest first.
        extra_files: more files to store and hash (e.g. the Markdown report and its plot).
        source_files: the small files an "hf" source needs besides weights (`LoadedModel.files`).
        only: store just these parameters (an adapter artifact: adapters and head, not the base).
        manifest_extra: more manifest keys (an adapter artifact's "kind" and base identity).

    Raises:
        ConfigError: a file name that is not plain, an unknown source kind, a model that does not run on
            `inputs`, or an output path that may not be replaced (`edgeslim.core.files.check_output`).
    """
    from edgeslim import __version__
    from safetensors.torch import save_file, save_model

    source_files = dict(source_files or {})
    extra = dict(extra_files or {})
    reserved = {MANIFEST, WEIGHTS, REPORT}
    for name in list(extra) + list(source_files):
        if not is_plain_name(name) or name in reserved or name.startswith(SOURCE_PREFIX):
            raise ConfigError(f"artifact file name {name!r} is not a plain file name of its own")
    if source.kind not in SOURCE_KINDS:
        raise ConfigError(f"an artifact's source is one of {SOURCE_KINDS}, got {source.kind!r}")
    if source.kind == "hf" and "config.json" not in source_files:
        raise ConfigError("an artifact of a Hugging Face source needs the folder's config.json "
                          "(pass source_files=loaded.files)")
    source = dataclasses.replace(source, files=tuple(sorted(source_files)))
    check_inputs(model, inputs, dims or {}, "the model to save")
    with replace_output(path, ARTIFACT) as tmp:
        tmp.mkdir()
        if only is None:
            save_model(model, str(tmp / WEIGHTS))
        else:
            wanted = set(only)
            save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if n in wanted},
                      str(tmp / WEIGHTS))
        (tmp / REPORT).write_text(json.dumps(report or {}, indent=2, default=str))
        for name, data in extra.items():
            (tmp / name).write_bytes(data)
        for name, data in source_files.items():
            (tmp / f"{SOURCE_PREFIX}{name}").write_bytes(data)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format_version": FORMAT_VERSION, "edgeslim_version": __version__, "source": source.to_dict(),
                    "task": task, "inputs": [s.to_dict() for s in inputs], "dims": dict(dims or {}),
                    "steps": [dict(s) for s in steps], "files": files, **dict(manifest_extra or {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # a value that is not JSON is a bug
    return Path(path)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The checked manifest of artifact `path` (a format-1 one migrated in memory; files not yet verified).

    Raises:
        SourceError: not an artifact, not valid JSON, an unknown format version, or a field of the
            wrong type or value (the message names it).
    """
    path = Path(path)
    file = path / MANIFEST
    if file.is_symlink():
        raise SourceError(f"{file} is a symbolic link; an artifact's files must be plain files inside it")
    if not file.is_file():
        raise SourceError(f"{path} is not an edgeslim artifact (no {MANIFEST})")
    if file.stat().st_size > MAX_MANIFEST_BYTES:
        raise SourceError(f"corrupt manifest {file}: larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        manifest = json.loads(file.read_bytes())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SourceError(f"corrupt manifest {file}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise SourceError(f"corrupt manifest {file}: not a JSON object")
    version = manifest.get("format_version")
    if version == 1 and not isinstance(version, bool):
        manifest = _migrate_v1(manifest, file)
    elif version != FORMAT_VERSION or isinstance(version, bool):
        raise SourceError(f"{file}: unknown artifact format version {version!r} (this edgeslim reads "
                          f"{FORMAT_VERSION} and migrates 1); re-create it with the edgeslim that reads it")
    check_manifest(manifest, file)
    return manifest


def _migrate_v1(manifest: dict[str, Any], file: Path) -> dict[str, Any]:
    """A format-1 manifest as format 2, when that is safe (zoo and factory sources); else SourceError."""
    src = manifest.get("source")
    if not isinstance(src, dict):
        raise SourceError(f"corrupt manifest {file}: 'source' must be a JSON object")
    kind, weights = src.get("kind"), src.get("weights")
    if kind == "zoo":  # format 1 stored the package version of zoo models in 'weights'
        src = {**src, "weights": None, "version": src.get("version") or weights}
    elif kind == "factory":  # the weights file is never re-read: the artifact holds every tensor
        src = {**src, "weights": Path(weights).name if isinstance(weights, str) else None}
    else:
        raise SourceError(f"{file}: this format-1 artifact depends on files outside itself (source {kind!r} "
                          f"{src.get('identifier')!r}); re-create it from that source with this edgeslim "
                          "(edgeslim compress SOURCE -m METHOD -o NEW.slim), which stores what it needs")
    warnings.warn(f"{file.parent}: format-1 artifact read as format {FORMAT_VERSION}; re-create it to update it")
    return {**manifest, "format_version": FORMAT_VERSION, "source": {**src, "files": []}, "migrated_from": 1}


def _require(ok: bool, file: Path, what: str) -> None:
    if not ok:
        raise SourceError(f"corrupt manifest {file}: {what}")


def _count(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_ELEMENTS


def check_manifest(manifest: Mapping[str, Any], file: Path) -> None:
    """Check every field the loader and `inspect` use: JSON types, plain file names, required files.

    Raises:
        SourceError: the first field that is missing or wrong, by name.
    """
    kinds = {"source": dict, "task": str, "inputs": list, "dims": dict, "steps": list, "files": dict}
    for key, kind in kinds.items():
        _require(isinstance(manifest.get(key), kind), file, f"'{key}' must be a JSON {_JSON[kind]}")
    src = manifest["source"]
    _require(src.get("kind") in SOURCE_KINDS, file, f"source kind {src.get('kind')!r} is not one of {SOURCE_KINDS}")
    _require(isinstance(src.get("identifier"), str) and bool(src["identifier"]), file, "source has no identifier")
    for key in ("weights", "version", "sha256"):
        _require(src.get(key) is None or isinstance(src[key], str), file, f"source '{key}' must be a string or null")
    if src["kind"] == "zoo":
        _require(src["identifier"] in zoo.names(), file,
                 f"unknown zoo model {src['identifier']!r} (available: {', '.join(zoo.names())})")
    if src["kind"] == "factory":
        _require(is_factory_name(src["identifier"]), file, f"factory {src['identifier']!r} is not pkg.mod:factory")
    source_files = src.get("files", [])
    _require(isinstance(source_files, list) and all(is_plain_name(n) for n in source_files), file,
             "source 'files' must be a list of plain file names")
    for i, spec in enumerate(manifest["inputs"]):
        _require(isinstance(spec, dict), file, f"input {i} must be a JSON object")
        shape = spec.get("shape")
        _require(isinstance(spec.get("name"), str) and spec["name"].isidentifier(), file, f"input {i} has no valid name")
        _require(isinstance(shape, list) and all(_count(d, 1) or (isinstance(d, str) and d.isidentifier())
                                                 for d in shape), file, f"input {i} shape {shape!r} is not a list of sizes and names")
        _require(math.prod(d for d in shape if isinstance(d, int)) <= MAX_ELEMENTS, file,
                 f"input {i} shape {shape!r} has more than {MAX_ELEMENTS:,} elements")
        _require(isinstance(spec.get("dtype"), str), file, f"input {i} 'dtype' must be a string")
        _require(spec.get("high") is None or _count(spec["high"], 1), file, f"input {i} 'high' must be a positive integer")
        try:
            TensorSpec.from_dict(spec)
        except ConfigError as exc:
            raise SourceError(f"corrupt manifest {file}: {exc}") from exc
    for name, size in manifest["dims"].items():
        _require(_count(size, 1), file, f"dim {name!r} must be a positive integer, got {size!r}")
    for spec in manifest["inputs"]:  # load runs the model once at these sizes: bounded before any weight is read
        shape = [manifest["dims"].get(d, 1) if isinstance(d, str) else d for d in spec["shape"]]
        _require(math.prod(shape) <= MAX_LOAD_ELEMENTS, file,
                 f"input {spec['name']!r} at the recorded dims {shape} has {math.prod(shape):,} elements, over the "
                 f"{MAX_LOAD_ELEMENTS:,} a load may allocate")
    for i, step in enumerate(manifest["steps"], 1):
        _require(isinstance(step, dict) and isinstance(step.get("method"), str), file, f"step {i} has no 'method'")
        _require(isinstance(step.get("config"), dict), file, f"step {i} 'config' must be a JSON object")
        _require(isinstance(step.get("resolved", {}), dict), file, f"step {i} 'resolved' must be a JSON object")
        changes = step.get("changes", [])
        _require(isinstance(changes, list) and all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and _count(c.get("params_before"))
            and _count(c.get("params_after")) for c in changes),
            file, f"step {i} 'changes' must be a list of rows with a name, params_before and params_after")
    files = manifest["files"]
    for name, digest in files.items():
        _require(is_plain_name(name) and name != MANIFEST, file,
                 f"file name {name!r} is not a plain name inside the artifact")
        _require(isinstance(digest, str) and bool(_SHA256.fullmatch(digest)), file, f"{name}: not a SHA-256 hex digest")
    for needed in [WEIGHTS] + [f"{SOURCE_PREFIX}{n}" for n in source_files]:
        _require(needed in files, file, f"{needed} is read by the loader but not listed in 'files'")
    if src["kind"] == "hf":
        _require("config.json" in source_files, file, "a Hugging Face source needs its stored config.json")


_JSON = {dict: "object", str: "string", list: "array"}


def verify(path: str | Path, manifest: Mapping[str, Any]) -> dict[str, str]:
    """Check every listed file's SHA-256; returns {file: "ok"} or raises SourceError naming the file."""
    path = Path(path)
    status = {}
    unlisted = sorted(p.name for p in path.iterdir() if p.name not in (*manifest["files"], MANIFEST, OWNER))
    if unlisted:
        raise SourceError(f"{path} holds files its manifest does not list ({', '.join(unlisted[:5])}); an artifact "
                          "is exactly the files it lists: refusing to load it")
    for name, digest in manifest["files"].items():
        file = path / name
        if file.is_symlink():
            raise SourceError(f"{path}: {name} is a symbolic link; an artifact's files must be plain files inside it")
        if not file.is_file():
            raise SourceError(f"{path}: file {name} listed in the manifest is missing")
        if sha256_file(file) != digest:
            raise SourceError(f"{path}: {name} does not match its SHA-256 in the manifest "
                              "(modified or corrupt); refusing to load it")
        status[name] = "ok"
    return status


def replay(base: nn.Module, steps: Sequence[Mapping[str, Any]], inputs: Sequence[TensorSpec],
           where: str = "artifact") -> nn.Module:
    """Apply each step's recorded structure to `base` (no data, no recomputation).

    Raises:
        SourceError: a step names an unknown method, its `resolved` has a schema its compressor does
            not read, or its recorded decisions do not apply.
    """
    from edgeslim.compress.base import get_compressor

    model = base
    for i, step in enumerate(steps, 1):
        try:
            comp, resolved = get_compressor(step["method"]), step.get("resolved", {})
        except EdgeslimError as exc:
            raise SourceError(f"{where}: step {i}: {exc}") from exc
        schema = resolved.get("schema", 1)  # artifacts written before schemas were recorded are schema 1
        if schema != comp.schema:
            raise SourceError(f"{where}: step {i} ({comp.name}) was written with resolved schema {schema!r}; this "
                              f"edgeslim's {comp.name} reads schema {comp.schema}")
        try:
            model = comp.replay(model, resolved, inputs)
        except (EdgeslimError, TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError,
                MemoryError) as exc:  # decisions read from a file: any misfit is a corrupt artifact
            raise SourceError(f"{where}: step {i} ({comp.name}) cannot be replayed from its recorded "
                              f"decisions: {' '.join(str(exc).split())[:300]}") from exc
    return model


def _base(path: Path, spec: SourceSpec, inputs: list[TensorSpec], trust: Trust, task: str) -> LoadedModel:
    """The source model an artifact's steps start from (an "hf" one for the recorded `task`), built
    without reading anything outside `path`."""
    if spec.kind == "zoo":
        return load_zoo(spec.identifier)  # the zoo's own table only: never a path or a module
    if spec.kind == "factory":
        trust.allow_factory(spec.identifier, str(path))
        return load_factory(spec.identifier, None, inputs)  # the artifact holds every tensor
    with tempfile.TemporaryDirectory(prefix="edgeslim-hf-") as tmp:
        for name in spec.files:
            shutil.copyfile(path / f"{SOURCE_PREFIX}{name}", Path(tmp) / name)
        return load_hf_folder(tmp, spec.version, "hf", spec.identifier, task=task, weights=False)


def load_zoo(name: str) -> LoadedModel:
    """Zoo model `name`: built by its entry, or, for a model edgeslim trains itself, loaded from the
    artifact shipped inside the package and recorded as the zoo model (its own steps folded in).

    Raises:
        SourceError: an unknown name, or a packaged artifact missing from this install.
    """
    entry = zoo.entry(name)
    if entry.shipped is None:
        return zoo.build(name)
    if not entry.shipped.is_dir():
        raise SourceError(f"the packaged model '{name}' is missing from this install ({entry.shipped}); "
                          f"retrain it with: python bench/train_espcn.py")
    loaded = load(entry.shipped)
    return dataclasses.replace(loaded, steps=[], source=SourceSpec(
        "zoo", name, version=zoo.edgeslim_version(), sha256=sha256_file(entry.shipped / WEIGHTS)))


def load(path: str | Path, trust: Trust | None = None) -> LoadedModel:
    """Rebuild the compressed model of artifact `path`.

    An adapter artifact (manifest kind "adapter") needs its base, which may be any source:
    `edgeslim.sources.load_model` loads and attaches it.

    Args:
        trust: the factories the user allows the manifest to name (default: none).

    Raises:
        SourceError: not an artifact, a corrupt manifest, an unknown format version, a missing or
            modified file, a factory source the user did not allow, weights that do not fit the
            replayed structure, or an adapter artifact.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_safetensors

    path = Path(path)
    manifest = read_manifest(path)
    verify(path, manifest)
    if manifest.get("kind") == "adapter":
        raise SourceError(f"{path} is an adapter artifact, which needs its base: load it with "
                          "edgeslim.sources.load_model(path, base=...) (or the edgeslim command, --base)")
    spec = SourceSpec.from_dict(manifest["source"])
    inputs = [TensorSpec.from_dict(s) for s in manifest["inputs"]]
    try:
        task = canonical_task(manifest["task"], inputs)  # old task names map to the current ones
    except ConfigError as exc:
        raise SourceError(f"{path / MANIFEST}: {exc}") from exc
    base = _base(path, spec, inputs, trust or Trust(), task)
    model = replay(base.model, manifest["steps"], inputs, str(path))
    try:
        load_safetensors(model, str(path / WEIGHTS), strict=True)
    except (RuntimeError, SafetensorError) as exc:
        hint = (" (format 1 recorded only the last step of an artifact made from another artifact: "
                "re-create it)" if manifest.get("migrated_from") == 1 else "")
        raise SourceError(f"{path / WEIGHTS} does not fit the replayed model{hint}: "
                          f"{' '.join(str(exc).split())[:400]}") from exc
    dims = dict(manifest["dims"]) or base.dims
    try:  # the input spec is the manifest's word too: one forward pass proves it fits the model
        check_inputs(model.eval(), inputs, dims, f"artifact {path}")
    except ConfigError as exc:
        raise SourceError(f"{path / MANIFEST}: 'inputs' do not fit the model: {exc}") from exc
    return LoadedModel(model.eval(), spec, inputs, task, dims,
                       base.encode, list(manifest["steps"]), base.files)
