"""File helpers shared by every writer: SHA-256, plain names, and outputs that replace only edgeslim's own.

Every output goes through `replace_output`: the new file or folder is written inside a temporary folder
beside the destination (its name carries the writer's PID), and only once it is complete is it renamed
in. An existing destination is replaced only when edgeslim wrote it: a folder holds edgeslim's ownership
record (OWNER: its id, the SHA-256 of its manifest, and the files written, with none added since); a file
has the expected suffix and, for the kinds users also keep (images, reports, JSON), the bytes edgeslim
recorded in the folder's LEDGER. Anything else is refused before any work, untouched.
Temporary folders left by a killed run are cleaned up by the next run that writes beside them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from edgeslim.core.errors import ConfigError, SourceError

T = TypeVar("T")
MAX_TEXT_BYTES = 16 << 20  # a recipe, profile, table or config: far below this
MAX_DATA_BYTES = 1 << 30  # a calibration or eval data file read whole

TEMP_SUFFIX = ".edgeslim-tmp"
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}" + re.escape(TEMP_SUFFIX))
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,199}")
_COMMAND_START = time.time()  # this process's temps and any made after it started are never stale


def file_key(path: str | Path) -> tuple[str, int, int]:
    """(resolved path, size, modification time in ns): what a cache of facts read from a file is keyed by,
    so it is read again once the file changes."""
    st = Path(path).stat()
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


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


def read_bounded(path: str | Path, what: str, max_bytes: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a user's file, read only when it is a regular file of at most `max_bytes`.

    Raises:
        SourceError: missing, not a regular file (a device such as /dev/zero, a FIFO, a folder), larger than
            `max_bytes`, or unreadable; the message names `what` it is.
    """
    path = Path(path)
    try:
        if not path.exists():
            raise SourceError(f"{what} not found: {path}")
        if not path.is_file():
            raise SourceError(f"{what} {path} is not a regular file")
        size = path.stat().st_size
        if size > max_bytes:
            raise SourceError(f"{what} {path} is {size:,} bytes, over the {max_bytes:,}-byte limit for it")
        return path.read_bytes()[:max_bytes]
    except OSError as exc:
        raise SourceError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def parse_file(path: str | Path, what: str, fmt: str, parse: Callable[[str], T], max_bytes: int = MAX_TEXT_BYTES) -> T:
    """`parse` applied to the UTF-8 text of a user's file (`read_bounded`).

    Raises:
        SourceError: the file cannot be read (see `read_bounded`).
        ConfigError: its text is not UTF-8 or not valid `fmt` (a nesting too deep included).
    """
    raw = read_bounded(path, what, max_bytes)
    try:
        return parse(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSON and TOML decode errors are ValueErrors
        detail = "nested too deeply" if isinstance(exc, RecursionError) else " ".join(str(exc).split())[:200]
        raise ConfigError(f"{path}: not valid {fmt}: {detail}") from exc


def safe_stem(text: str) -> str:
    """A plain file-name stem made from any text (for default output names built from a source)."""
    stem = re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip(".-") or "model"
    return re.sub(r"\.{2,}", ".", stem)[:120]


@dataclass(frozen=True)
class OutputKind:
    """What an output is, so that an existing destination is replaced only when edgeslim could have written it."""

    what: str  # shown in messages, e.g. "edgeslim artifact folder"
    folder: bool  # a folder (artifact) or a single file
    marker: str | None = None  # for a folder: the file whose SHA-256 is its id in the ownership record (OWNER)
    suffixes: tuple[str, ...] = ()  # for a file: the suffixes an existing file to replace may have
    proven: bool = False  # for a file: replaced only when the folder's LEDGER shows edgeslim wrote these bytes


ARTIFACT = OutputKind("edgeslim artifact folder", True, marker="manifest.json")
ONNX = OutputKind("ONNX file", False, suffixes=(".onnx",))
ONNX_DATA = OutputKind("ONNX external data file", False, suffixes=(".data",))
BUNDLE = OutputKind("edgeslim deployment bundle", True, marker="bundle.json")
ENGINE = OutputKind("TensorRT engine", False, suffixes=(".engine", ".plan"))
JSON = OutputKind("JSON file", False, suffixes=(".json",), proven=True)
REPORT = OutputKind("report file", False, suffixes=(".md", ".html", ".png", ".svg", ".json"), proven=True)
IMAGE = OutputKind("image file", False, suffixes=(".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp",
                                                   ".ppm", ".gif"), proven=True)
HF_FOLDER = OutputKind("Hugging Face model folder", True, marker="config.json")


OWNER = ".edgeslim-owner.json"  # inside every folder edgeslim writes: its id and the files it wrote there
LEDGER = ".edgeslim-outputs.json"  # beside the proven files edgeslim writes: name -> SHA-256 of what it wrote


def _absolute(path: str | Path) -> Path:
    if not os.fspath(path).strip():
        raise ConfigError("output path is empty; name a file or folder (or leave -o out for the default)")
    return Path(os.path.abspath(os.fspath(path)))


def _files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.name != OWNER)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError, RecursionError):
        return None


def write_owner(folder: Path, kind: OutputKind) -> None:
    """Record in `folder` that edgeslim wrote it: the id (SHA-256 of its `kind.marker` file) and its files."""
    (folder / OWNER).write_text(json.dumps({"id": sha256_file(folder / kind.marker), "files": _files_in(folder)}))


def owned_folder(path: Path, kind: OutputKind) -> str | None:
    """None when folder `path` is one edgeslim wrote as `kind` and holds only what it wrote, else why not."""
    record = _read_json(path / OWNER)
    marker = path / kind.marker
    if not isinstance(record, dict) or not marker.is_file() or marker.is_symlink() \
            or record.get("id") != sha256_file(marker):
        return f"is not an {kind.what} written by edgeslim (no matching {OWNER})"
    extra = sorted(set(_files_in(path)) - set(record.get("files") or []))
    return f"holds files edgeslim did not write ({', '.join(extra[:5])})" if extra else None


def _record_file(path: Path) -> None:
    ledger = path.parent / LEDGER
    written = _read_json(ledger)
    written = written if isinstance(written, dict) else {}
    written[path.name] = sha256_file(path)
    tmp = ledger.with_name(f"{LEDGER}.{os.getpid()}{TEMP_SUFFIX}")
    tmp.write_text(json.dumps(written, indent=0, sort_keys=True))
    os.replace(tmp, ledger)


def _written_here(path: Path) -> bool:
    written = _read_json(path.parent / LEDGER)
    return isinstance(written, dict) and written.get(path.name) == sha256_file(path)


def check_not_input(out: str | Path, source: str | Path) -> None:
    """Refuse (exit 2) an output that is the input, lies inside it, or holds it (a parent folder of it)."""
    src = Path(source).expanduser()
    if not src.exists():
        return
    src, dest = src.resolve(), _absolute(Path(out).expanduser()).resolve()
    if dest == src or src in dest.parents or dest in src.parents:
        raise ConfigError(f"output {out} is the input {source} (or inside it, or a folder holding it); "
                          "write the result elsewhere")


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
        why = owned_folder(path, kind)
        if why:
            raise ConfigError(f"output {path} exists and {why}; edgeslim replaces only what it wrote itself: "
                              "choose another -o or move it away")
    else:
        if path.is_dir():
            raise ConfigError(f"output {path} is a folder, not a {kind.what}; name a file")
        if path.suffix.lower() not in kind.suffixes:
            raise ConfigError(f"output {path} exists and is not a {kind.what} ({'/'.join(kind.suffixes)}); "
                              "edgeslim replaces only what it wrote itself: choose another -o or move it away")
        if kind.proven and not _written_here(path):
            raise ConfigError(f"output {path} exists and was not written by edgeslim (or changed since; see "
                              f"{LEDGER}); edgeslim replaces only what it wrote itself: choose another -o")
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
        if kind.folder:
            write_owner(target, kind)
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
            if kind.proven:
                _record_file(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
