"""A board's address, `ssh://[user@]host[:port][?python=PATH]`, checked before anything runs: nothing in it
can become a shell word or an option on either side (runtime/remote.py carries it)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from edgeslim.core.errors import ConfigError

SCHEME = "ssh"
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]+\]")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_PATH = re.compile(r"[A-Za-z0-9_./+-]{1,255}")


@dataclass(frozen=True)
class Device:
    """One board's address, checked: nothing in it can become a shell word on either side."""

    host: str
    user: str | None = None
    port: int | None = None
    python: str = "python3"

    @property
    def address(self) -> str:
        who = f"{self.user}@" if self.user else ""
        return f"{SCHEME}://{who}{self.host}" + (f":{self.port}" if self.port else "")

    def __str__(self) -> str:
        return self.address


def parse_device(text: str, python: str | None = None) -> Device:
    """`ssh://[user@]host[:port][?python=PATH]` as a Device (`python` overrides the query's).

    Raises:
        ConfigError: another scheme, or a host, user, port or Python path with characters outside the
            plain set (shell metacharacters, spaces, options), or an unknown query key.
    """
    where = f"--device {text!r}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if parts.scheme != SCHEME or not parts.hostname:
        raise ConfigError(f"{where}: a device is an address ssh://[user@]host[:port][?python=PATH]")
    host = parts.netloc.rpartition("@")[2]
    host = host[:host.rindex("]") + 1] if host.startswith("[") else host.partition(":")[0]
    user = parts.username
    if not _HOST.fullmatch(host) or (user is not None and not _USER.fullmatch(user)) or parts.password is not None:
        raise ConfigError(f"{where}: the host and user may hold only letters, digits and . _ - (no password in the "
                          "address: use your SSH agent or --identity KEY)")
    if parts.path not in ("", "/") or parts.fragment:
        raise ConfigError(f"{where}: an address has no path; name the device's Python with ?python=PATH")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"python"})
    if unknown or any(len(v) != 1 for v in query.values()):
        raise ConfigError(f"{where}: unknown or repeated query key(s) {unknown or sorted(query)}; allowed: ['python']")
    python = python or query.get("python", ["python3"])[0]
    if not _PATH.fullmatch(python) or python.startswith("-"):
        raise ConfigError(f"{where}: the device's Python must be a plain path (letters, digits, _ . / + -), got {python!r}")
    return Device(host=host, user=user, port=port, python=python)
