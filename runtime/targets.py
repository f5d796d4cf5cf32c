"""Target profiles: TOML data files checked against one table of allowed keys and values.

A profile says how a model is run (runtime, provider, precision, threads, device), at which batch
sizes it is profiled, which shape multiple suits the hardware (`align`), and the hardware's peak
compute and memory bandwidth for the roofline. Shipped profiles live in `edgeslim.profiles`
(profiles/*.toml); a user's own profile is any TOML file with the same keys. The table of allowed
keys follows ModelOpt's `deployment_table` (modelopt/torch/_deploy/_runtime/ort_client.py): an
unknown key or value is rejected with the allowed ones listed.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from edgeslim.core.errors import ConfigError

# The one table of allowed keys: key -> (type, allowed values or None for any value of that type).
# Defaults live only on the Profile dataclass below.
ALLOWED: dict[str, tuple[type, tuple[Any, ...] | None]] = {
    "description": (str, None),
    "device": (str, ("cpu", "cuda")),
    "runtime": (str, ("torch", "onnxruntime", "tensorrt")),
    "provider": (str, ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider")),
    "precision": (str, ("fp32", "fp16", "int8")),
    "threads": (int, None),
    "batch": (list, None),
    "align": (int, None),
    "peak_gflops": (float, None),
    "mem_gbps": (float, None),
    "workspace_mib": (int, None),
    "remote": (bool, None),
    "ram_gb": (float, None),
    "address": (str, None),
    "python": (str, None),
}
UPPER = {"threads": 1024, "align": 1024, "workspace_mib": 1 << 20}  # beyond any device: a typo or a hostile file
REQUIRED = ("device", "runtime", "precision", "peak_gflops", "mem_gbps")
_PROVIDER_DEVICE = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


@dataclass(frozen=True)
class Profile:
    """One deployment target, read from TOML; every field is checked in __post_init__."""

    name: str  # file stem, e.g. "cpu-ort-fp32"
    device: str  # "cpu" or "cuda": what a session needs
    runtime: str  # "torch" | "onnxruntime" | "tensorrt"
    precision: str  # "fp32" | "fp16" | "int8" (for onnxruntime/int8 the model file must be quantized)
    peak_gflops: float  # practical peak compute (GFLOP/s) at this precision, for the roofline
    mem_gbps: float  # memory bandwidth (GB/s), for the roofline
    description: str = ""  # one line shown by `edgeslim list profiles`
    provider: str | None = None  # ONNX Runtime execution provider (onnxruntime only)
    threads: int = 0  # intra-op threads; 0 = the runtime's default
    batch: tuple[int, ...] = (1,)  # batch sizes a profiling sweep runs
    align: int = 1  # multiple that ranks / channel counts are rounded to (8 for SIMD, 16/32 tensor cores)
    workspace_mib: int = 1024  # TensorRT builder workspace limit
    remote: bool = False  # a board that is not the machine at hand: latency is predicted, peaks are published
    ram_gb: float | None = None  # the board's RAM, for the "does it fit" check
    address: str | None = None  # ssh://[user@]host[:port] of the board: profiling then measures there
    python: str | None = None  # the board's Python (default: the one its login shell finds)

    def __post_init__(self) -> None:
        for key, value in self.to_dict().items():
            _check_value(self.name, key, value)
        object.__setattr__(self, "batch", tuple(int(b) for b in self.batch))
        object.__setattr__(self, "peak_gflops", float(self.peak_gflops))
        object.__setattr__(self, "mem_gbps", float(self.mem_gbps))
        if self.ram_gb is not None:
            object.__setattr__(self, "ram_gb", float(self.ram_gb))
        self._check_combination()

    def _check_combination(self) -> None:
        where = f"profile '{self.name}'"
        if self.runtime == "onnxruntime" and self.provider is None:
            raise ConfigError(f"{where}: runtime 'onnxruntime' needs a provider, one of {list(_PROVIDER_DEVICE)}")
        if self.runtime != "onnxruntime" and self.provider is not None:
            raise ConfigError(f"{where}: 'provider' applies to runtime 'onnxruntime' only, not '{self.runtime}'")
        if self.provider is not None and _PROVIDER_DEVICE[self.provider] != self.device:
            raise ConfigError(f"{where}: provider {self.provider} runs on '{_PROVIDER_DEVICE[self.provider]}', "
                              f"but device is '{self.device}'")
        if self.runtime == "tensorrt" and self.device != "cuda":
            raise ConfigError(f"{where}: runtime 'tensorrt' needs device 'cuda'")
        if self.runtime == "torch" and self.precision == "int8":
            raise ConfigError(f"{where}: runtime 'torch' runs fp32 or fp16; int8 runs through onnxruntime "
                              "on a quantized ONNX model")
        if self.runtime == "torch" and self.precision == "fp16" and self.device != "cuda":
            raise ConfigError(f"{where}: fp16 with runtime 'torch' needs device 'cuda'")
        if self.address is not None:
            from edgeslim.runtime.address import parse_device

            parse_device(self.address, self.python)  # a bad address is refused when the profile is read
            if self.runtime != "onnxruntime":
                raise ConfigError(f"{where}: a board at an address runs runtime 'onnxruntime', not '{self.runtime}'")

    def to_dict(self) -> dict[str, Any]:
        """All keys except the name, as they would be written in TOML (None values dropped)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}
        d["batch"] = list(d["batch"])
        return {k: v for k, v in d.items() if v is not None}

    def override(self, changes: Mapping[str, Any]) -> "Profile":
        """A copy with some keys changed (e.g. a recipe's `batch = [1, 8]`), checked like a file.

        Raises:
            ConfigError: unknown key or bad value, listing the allowed ones.
        """
        _check_keys(self.name, changes)
        if "batch" in changes:
            changes = {**changes, "batch": tuple(changes["batch"])}
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> "Profile":
        """Build and check a profile from parsed TOML; unknown or missing keys raise ConfigError."""
        _check_keys(name, data)
        missing = [k for k in REQUIRED if k not in data and not (k == "device" and "address" in data)]
        if missing:
            raise ConfigError(f"profile '{name}': missing key(s) {missing}; required: {list(REQUIRED)}")
        fields = dict(data)
        if str(fields.get("device", "")).startswith("ssh://"):  # `device = "ssh://..."`: the board's address
            fields["address"] = fields.pop("device")
            fields["device"] = _PROVIDER_DEVICE.get(fields.get("provider"), "cpu")
        if "batch" in fields:
            _check_value(name, "batch", fields["batch"])
            fields["batch"] = tuple(fields["batch"])
        return cls(name=name, **fields)


def _check_keys(name: str, data: Mapping[str, Any]) -> None:
    unknown = sorted(set(data) - set(ALLOWED))
    if unknown:
        raise ConfigError(f"profile '{name}': unknown key(s) {unknown}; allowed keys: {sorted(ALLOWED)}")


def _check_value(name: str, key: str, value: Any) -> None:
    kind, allowed = ALLOWED[key]
    where = f"profile '{name}': key '{key}'"
    if key in ("provider", "ram_gb", "address", "python") and value is None:
        return
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if key == "batch":
        if not isinstance(value, (list, tuple)) or not value or not all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in value):
            raise ConfigError(f"{where} must be a non-empty list of positive integers, got {value!r}")
        return
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{where} must be of type {kind.__name__}, got {value!r}")
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{where} has value {value!r}; allowed values: {list(allowed)}")
    if kind is int and (value < 0 or (key == "align" and value < 1)):
        raise ConfigError(f"{where} must be {'>= 1' if key == 'align' else '>= 0'}, got {value}")
    if kind is int and value > UPPER.get(key, value):
        raise ConfigError(f"{where} must be <= {UPPER[key]}, got {value}")
    if kind is float and not 0 < value < math.inf:
        raise ConfigError(f"{where} must be a finite number > 0, got {value}")


def _read_toml(name: str, text: str, origin: str) -> Profile:
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"profile file {origin} is not valid TOML: {exc or 'nested too deeply'}") from exc
    return Profile.from_dict(name, data)


def _shipped() -> dict[str, Any]:
    root = importlib.resources.files("edgeslim.profiles")
    return {p.name[:-len(".toml")]: p for p in root.iterdir() if p.name.endswith(".toml")}


def user_profiles_dir() -> Path:
    """The user's own profiles (`device probe --save NAME`): $EDGESLIM_CONFIG_DIR/profiles, else
    ~/.config/edgeslim/profiles."""
    root = os.environ.get("EDGESLIM_CONFIG_DIR")
    return (Path(root) if root else Path.home() / ".config" / "edgeslim") / "profiles"


def _saved() -> dict[str, Path]:
    folder = user_profiles_dir()
    return {p.stem: p for p in folder.glob("*.toml")} if folder.is_dir() else {}


def list_profiles() -> dict[str, Profile]:
    """Every shipped profile by name, then the user's saved ones, loaded and checked."""
    found = {name: _read_toml(name, p.read_text(encoding="utf-8"), name + ".toml")
             for name, p in sorted(_shipped().items())}
    for name, path in sorted(_saved().items()):
        found.setdefault(name, _read_toml(name, path.read_text(encoding="utf-8"), str(path)))
    return found


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name (e.g. "cpu-ort-fp32") or a user's TOML file by path.

    Raises:
        ConfigError: unknown name (the shipped names are listed), unknown key or value.
        SourceError: the path does not exist or cannot be read.
    """
    text_form = str(name_or_path)
    if isinstance(name_or_path, Path) or text_form.endswith(".toml") or "/" in text_form or "\\" in text_form:
        from edgeslim.core.files import read_bounded
        path = Path(name_or_path)
        try:
            text = read_bounded(path, "profile file").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"profile file {path} is not UTF-8 text: {exc}") from exc
        return _read_toml(path.stem, text, str(path))
    shipped = _shipped()
    if text_form not in shipped and text_form in _saved():
        path = _saved()[text_form]
        return _read_toml(text_form, path.read_text(encoding="utf-8"), str(path))
    if text_form not in shipped:
        saved = sorted(_saved())
        raise ConfigError(f"unknown profile '{text_form}'; shipped profiles: {sorted(shipped)}"
                          + (f", saved: {saved}" if saved else "") + " (or give the path of a .toml file)")
    return _read_toml(text_form, shipped[text_form].read_text(encoding="utf-8"), text_form + ".toml")
