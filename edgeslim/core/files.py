"""File helpers shared by every writer: SHA-256, plain names, and outputs that replace only edgeslim's own.

Every output goes through `replace_output`: the new file or folder is written inside a temporary folder
beside the destination (its name carries the writer's PID), and only once it is complete is it renamed
in. An existing destination is replaced only when it is of the expected kind (an artifact folder with
its manifest, a file with the expected suffix); anything else is refused before any work, untouched.
Temporary folders left by a killed run are cleaned up by the next run that writes beside them.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from edgeslim.core.errors import ConfigError

TEMP_SUFFIX = ".edgeslim-tmp"
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}" + re.escape(TEMP_SUFFIX))
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,199}")
_COMMAND_START = time.time()  # this process's temps and any made after it started are never stale


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def is_plain_name(name: object) -> bool:
    """True for a plain file name: letters, digits, '.', '_', '+', '-'; no folder part, not hidden, no '..'."""
    return isinstance(name, str) and bool(_PLAIN.fullmatch(name)) and ".." not in name


def plain_stem(name: object, what: str) -> str:
    """`name` when it is a plain file-name stem, else ConfigError (exit 2) naming `what` it is."""
    if not is_plain_name(name):
        raise ConfigError(f"{what} {name!r} must be a plain file name (letters, digits, '.', '_', '+', '-'; "
                          "no folder, no '..', not starting with '.')")
    return str(name)


def safe_stem(text: str) -> str:
    """A plain file-name stem made from any text (for default output names built from a source)."""
    stem = re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip(".-") or "model"
    return re.sub(r"\.{2,}", ".", stem)[:120]


@dataclass(frozen=True)
class OutputKind:
    """What an output is, so that an existing destination is replaced only when edgeslim could have written it."""

    what: str  # shown in messages, e.g. "edgeslim artifact folder"
    folder: bool  # a folder (artifact) or a single file
    marker: str | None = None  # for a folder: the file that marks one of edgeslim's own
    suffixes: tuple[str, ...] = ()  # for a file: the suffixes an existing file to replace may have


ARTIFACT = OutputKind("edgeslim artifact folder", True, marker="manifest.json")
ONNX = OutputKind("ONNX file", False, suffixes=(".onnx",))
ONNX_DATA = OutputKind("ONNX external data file", False, suffixes=(".data",))
BUNDLE = OutputKind("edgeslim deployment bundle", True, marker="bundle.json")
ENGINE = OutputKind("TensorRT engine", False, suffixes=(".engine", ".plan"))
JSON = OutputKind("JSON file", False, suffixes=(".json",))
REPORT = OutputKind("report file", False, suffixes=(".md", ".html", ".png", ".svg", ".json"))
IMAGE = OutputKind("image file", False, suffixes=(".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp",
                                                   ".ppm", ".gif"))
HF_FOLDER = OutputKind("Hugging Face model folder", True, marker="config.json")


def _absolute(path: str | Path) -> Path:
    return Path(os.path.abspath(os.fspath(path)))


def check_output(path: str | Path, kind: OutputKind) -> Path:
    """The absolute destination `path` if edgeslim may write it, else ConfigError (nothing is touched).

    Refused: a destination that exists and is not of `kind` (a foreign folder, a file of another kind,
    a symlink), and a parent that exists but is not a folder.
    """
    path = _absolute(path)
    if not path.name or path.parent == path:
        raise ConfigError(f"output {path} is not a file or folder name")
    if path.is_symlink():
        raise ConfigError(f"output {path} is a symbolic link; edgeslim replaces only what it wrote itself")
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"cannot write {path}: {parent} is a file, not a folder")
            break
    if not path.exists():
        return path
    if kind.folder:
        if not path.is_dir():
            raise ConfigError(f"output {path} exists and is a file, not an {kind.what}; choose another -o")
        if not (path / kind.marker).is_file() or (path / kind.marker).is_symlink():
            raise ConfigError(f"output {path} exists and is not an {kind.what} (no {kind.marker}); "
                              "edgeslim replaces only what it wrote itself: choose another -o or move it away")
    else:
        if path.is_dir():
            raise ConfigError(f"output {path} is a folder, not a {kind.what}; name a file")
        if path.suffix.lower() not in kind.suffixes:
            raise ConfigError(f"output {path} exists and is not a {kind.what} ({'/'.join(kind.suffixes)}); "
                              "edgeslim replaces only what it wrote itself: choose another -o or move it away")
    return path


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's live process (or a PID we cannot ask about): leave its files alone
    return True


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Remove temporary folders of killed writers in `folder`; returns what was removed.

    A temp is stale when its writer's PID (in its name) is not a live process and it is older than the
    running command. An old output moved aside by a writer killed mid-swap is put back first when its
    destination is missing, so a kill at any moment loses neither the old output nor the new one.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    started = _COMMAND_START
    for entry in folder.iterdir():
        match = _TEMP.fullmatch(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir() or _alive(int(match["pid"])):
            continue
        try:
            if entry.stat().st_mtime >= started:
                continue
            name = match["name"]
            aside, dest = entry / f"{name}.old", folder / name
            if aside.exists() and not dest.exists() and not dest.is_symlink():
                os.rename(aside, dest)
            shutil.rmtree(entry)
            removed.append(entry)
        except OSError:
            continue  # another cleaner got there first, or it is not ours to remove
    return removed


@contextlib.contextmanager
def replace_output(path: str | Path, kind: OutputKind) -> Iterator[Path]:
    """Yield a temporary path to write the new output at; on success it replaces `path`, on error it is removed.

    The destination is checked first (`check_output`). When an old output exists it is renamed aside,
    the new one renamed in, and only then the old one deleted.

    Raises:
        ConfigError: the destination may not be replaced, or its folder cannot be created or written.
    """
    path = check_output(path, kind)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(path.parent)
        tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"
        tmp.mkdir()
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    target = tmp / path.name
    try:
        yield target
        if not target.exists():
            return
        check_output(path, kind)  # nothing foreign appeared there meanwhile
        if path.exists() and kind.folder:
            aside = tmp / f"{path.name}.old"
            os.rename(path, aside)
            try:
                os.rename(target, path)
            except OSError:
                os.rename(aside, path)
                raise
        else:
            os.replace(target, path)  # a file: atomic, the old one is never missing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
