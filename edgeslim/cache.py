"""The local cache of large derived models (converted or fine-tuned), outside the repository.

Root: `$EDGESLIM_CACHE`, else `~/.cache/edgeslim`. Each entry is one folder written all at once
(temporary folder renamed in), so an interrupted conversion leaves nothing half-written.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeslim.core.errors import ConfigError
from edgeslim.core.files import OutputKind, owned_folder, replace_output

ENV = "EDGESLIM_CACHE"
ENTRY = OutputKind("edgeslim cache entry", True, marker="model.safetensors")  # built once, never replaced
EXPORT = OutputKind("edgeslim cached export", True, marker="model.onnx")  # an artifact's export, by its hash


def root() -> Path:
    """The cache folder (not created)."""
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "edgeslim").expanduser()


def entry(name: str, build: Callable[[Path], None], announce: Callable[[str], None] | None = None,
          kind: OutputKind = ENTRY) -> Path:
    """The cache folder `name`, built once by `build(tmp_folder)` when it is absent (or not whole: a folder
    of that name edgeslim did not write, or that changed since, is refused by replace_output).

    Raises:
        ConfigError: a name that is not a plain folder name.
    """
    if not name or Path(name).name != name or name.startswith("."):
        raise ConfigError(f"cache entry name must be a plain folder name, got {name!r}")
    path = root() / name
    if path.is_dir() and owned_folder(path, kind) is None:
        return path
    if announce:
        announce(f"building {name} once into the cache {path} (set {ENV} to move it)")
    with replace_output(path, kind) as tmp:
        tmp.mkdir()
        build(tmp)
    return path


@dataclass(frozen=True)
class CacheEntry:
    name: str
    path: Path
    size_bytes: int


def list_entries() -> list[CacheEntry]:
    """Every folder in the cache that edgeslim wrote (its ownership record matches), with its size on disk."""
    base = root()
    if not base.is_dir():
        return []
    return [CacheEntry(p.name, p, sum(f.stat().st_size for f in p.rglob("*") if f.is_file()))
            for p in sorted(base.iterdir())
            if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
            and (owned_folder(p, ENTRY) is None or owned_folder(p, EXPORT) is None)]


def clear(name: str | None = None) -> list[str]:
    """Remove one cache entry (or all); returns the names removed. Only folders edgeslim wrote, whole and
    unchanged, are entries: anything else in the cache folder is left alone.

    Raises:
        ConfigError: `name` is not an entry (the entries are listed; a folder edgeslim did not write says so).
    """
    entries = {e.name: e for e in list_entries()}
    if name is not None and name not in entries:
        path = root() / name
        why = owned_folder(path, ENTRY) if path.is_dir() and not path.is_symlink() else None
        raise ConfigError(f"no cache entry {name!r} in {root()}" + (f" ({path} {why}: left alone)" if why else "")
                          + f"; entries: {sorted(entries) or 'none'}")
    chosen = [entries[name]] if name else list(entries.values())
    for e in chosen:
        shutil.rmtree(e.path)
    return [e.name for e in chosen]


def keep_newest(prefix: str, count: int) -> list[str]:
    """Remove the entries named `prefix`* beyond the `count` most recently used (edgeslim's own only); their names."""
    chosen = sorted((e for e in list_entries() if e.name.startswith(prefix)), key=lambda e: e.path.stat().st_mtime,
                    reverse=True)[count:]
    for e in chosen:
        shutil.rmtree(e.path)
    return [e.name for e in chosen]
