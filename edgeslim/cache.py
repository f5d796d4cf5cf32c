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
from edgeslim.core.files import OutputKind, replace_output

ENV = "EDGESLIM_CACHE"
ENTRY = OutputKind("edgeslim cache entry", True, marker="model.safetensors")  # built once, never replaced


def root() -> Path:
    """The cache folder (not created)."""
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "edgeslim").expanduser()


def entry(name: str, build: Callable[[Path], None], announce: Callable[[str], None] | None = None) -> Path:
    """The cache folder `name`, built once by `build(tmp_folder)` when it is absent.

    Raises:
        ConfigError: a name that is not a plain folder name.
    """
    if not name or Path(name).name != name or name.startswith("."):
        raise ConfigError(f"cache entry name must be a plain folder name, got {name!r}")
    path = root() / name
    if path.is_dir():
        return path
    if announce:
        announce(f"building {name} once into the cache {path} (set {ENV} to move it)")
    with replace_output(path, ENTRY) as tmp:
        tmp.mkdir()
        build(tmp)
    return path


@dataclass(frozen=True)
class CacheEntry:
    name: str
    path: Path
    size_bytes: int


def list_entries() -> list[CacheEntry]:
    """Every folder in the cache with its size on disk."""
    base = root()
    if not base.is_dir():
        return []
    return [CacheEntry(p.name, p, sum(f.stat().st_size for f in p.rglob("*") if f.is_file()))
            for p in sorted(base.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def clear(name: str | None = None) -> list[str]:
    """Remove one cache entry (or all); returns the names removed.

    Raises:
        ConfigError: `name` is not in the cache (the entries are listed).
    """
    entries = {e.name: e for e in list_entries()}
    if name is not None and name not in entries:
        raise ConfigError(f"no cache entry {name!r} in {root()}; entries: {sorted(entries) or 'none'}")
    chosen = [entries[name]] if name else list(entries.values())
    for e in chosen:
        shutil.rmtree(e.path)
    return [e.name for e in chosen]
