"""The Compressor protocol, its result types, the shared budget config and the one registry."""
from __future__ import annotations

import copy
import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import torch
from torch import nn

from edgeslim.errors import ConfigError

# Compressor families shipped with edgeslim: importing one registers its compressors.
FAMILY_MODULES = ("svd", "subpixel", "train", "compacter")


@dataclass(frozen=True)
class ConfigBase:
    """Base of every compressor config: frozen, validated, unknown keys are errors."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ConfigBase":
        """Build the config from a mapping (recipe step, CLI options, manifest).

        Raises:
            ConfigError: a key is not a field of this config (the allowed ones are listed).
        """
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; allowed: {allowed}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of the fields (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _check_targets(value: Any, key: str) -> None:
    if value is None or isinstance(value, str):
        return
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return
    raise ConfigError(f"'{key}' must be a regex string or a list of module names, got {value!r}")


@dataclass(frozen=True)
class BudgetConfig(ConfigBase):
    """Budget forms shared by every low-rank / tensor / pruning compressor.

    Exactly one of ratio, rank or energy is set; when none is, ratio=0.5.
    """

    ratio: float | None = None  # kept fraction of the targeted layers' parameters, in (0, 1]
    rank: int | None = None  # fixed rank / bond dimension / kept channels for every layer
    energy: float | None = None  # kept fraction of (weighted) spectral energy per layer, in (0, 1]
    allocation: str = "uniform"  # "uniform": same ratio per layer; "sensitivity": global greedy
    align: int = 1  # ranks rounded down to a multiple of this (8 for CPU SIMD, 16/32 tensor cores)
    target: str | list[str] | None = None  # regex (fullmatch) or list of names / dotted suffixes
    exclude: str | list[str] | None = None  # same forms; removed from the selection

    def __post_init__(self) -> None:
        set_forms = [k for k in ("ratio", "rank", "energy") if getattr(self, k) is not None]
        if len(set_forms) > 1:
            raise ConfigError(f"give one budget form, not {set_forms} (ratio, rank or energy)")
        if not set_forms:
            object.__setattr__(self, "ratio", 0.5)
        if self.ratio is not None and not 0.0 < float(self.ratio) <= 1.0:
            raise ConfigError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.energy is not None and not 0.0 < float(self.energy) <= 1.0:
            raise ConfigError(f"energy must be in (0, 1], got {self.energy}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if self.allocation not in ("uniform", "sensitivity"):
            raise ConfigError(f"allocation must be 'uniform' or 'sensitivity', got {self.allocation!r}")
        if isinstance(self.align, bool) or not isinstance(self.align, int) or self.align < 1:
            raise ConfigError(f"align must be a positive integer, got {self.align!r}")
        _check_targets(self.target, "target")
        _check_targets(self.exclude, "exclude")
        for key in ("target", "exclude"):  # lists become tuples so the config stays hashable
            if isinstance(getattr(self, key), list):
                object.__setattr__(self, key, tuple(getattr(self, key)))


@dataclass
class CalibData:
    """Calibration / training data for a compressor: keyword-input batches for `model(**batch)`.

    targets holds one tensor per batch for the task loss (class labels, high-resolution images);
    None means the compressor distils against the original model's outputs.
    """

    name: str
    batches: Sequence[dict[str, torch.Tensor]]
    targets: Sequence[torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if not len(self.batches):
            raise ConfigError(f"calibration data '{self.name}' has no batches")
        if self.targets is not None and len(self.targets) != len(self.batches):
            raise ConfigError(f"calibration data '{self.name}': {len(self.targets)} targets for {len(self.batches)} batches")

    def __iter__(self) -> Iterator[tuple[int, dict[str, torch.Tensor], torch.Tensor | None]]:
        for i, batch in enumerate(self.batches):
            yield i, batch, None if self.targets is None else self.targets[i]


@dataclass
class LayerChange:
    """One replaced module: what it was, what it became, at what cost in accuracy."""

    name: str
    kind: str  # e.g. "Linear -> LowRankLinear"
    params_before: int
    params_after: int
    rank: int | None = None  # rank, bond dimension or kept channels
    rel_error: float | None = None  # relative (weighted) reconstruction error of the layer
    sensitivity: float | None = None  # task-loss or output change this layer alone causes
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CompressResult:
    """What a compressor returns: the new model, one row per change, and every decision made."""

    model: nn.Module
    method: str
    config: dict[str, Any]
    changes: list[LayerChange] = field(default_factory=list)
    resolved: dict[str, Any] = field(default_factory=dict)  # enough to replay without data

    @property
    def params_before(self) -> int:
        return sum(c.params_before for c in self.changes)

    @property
    def params_after(self) -> int:
        return sum(c.params_after for c in self.changes)

    def step_record(self) -> dict[str, Any]:
        """The manifest entry for this step."""
        return {"method": self.method, "config": self.config, "resolved": self.resolved,
                "changes": [c.to_dict() for c in self.changes]}


class Compressor:
    """Protocol of a compressor family member.

    Subclasses set `name` and `Config` and implement `compress` and `replay`:
    - `compress(model, config, calib=None, inplace=False) -> CompressResult` decides and applies;
      the caller's model is left untouched unless inplace=True.
    - `replay(model, resolved) -> nn.Module` applies the recorded structure without data (weights
      are loaded afterwards by the artifact).
    """

    name: ClassVar[str]
    Config: ClassVar[type[ConfigBase]]
    needs_calibration: ClassVar[bool] = False  # True when calib is mandatory
    distils: ClassVar[bool] = False  # True: without targets, train toward the ORIGINAL model's outputs

    def make_config(self, data: Mapping[str, Any] | ConfigBase | None = None) -> ConfigBase:
        if isinstance(data, ConfigBase):
            if not isinstance(data, self.Config):
                raise ConfigError(f"{self.name} takes a {self.Config.__name__}, got {type(data).__name__}")
            return data
        return self.Config.from_dict(data or {})

    def compress(self, model: nn.Module, config: ConfigBase, calib: CalibData | None = None,
                 inplace: bool = False) -> CompressResult:
        raise NotImplementedError

    def replay(self, model: nn.Module, resolved: Mapping[str, Any]) -> nn.Module:
        raise NotImplementedError


def working_copy(model: nn.Module, inplace: bool) -> nn.Module:
    """The model a compressor may modify: the caller's own when inplace, else a deep copy."""
    return model if inplace else copy.deepcopy(model)


_REGISTRY: dict[str, type[Compressor]] = {}


def register(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator adding a compressor to the registry; a second use of a name is an error."""
    key = cls.name
    if key in _REGISTRY and _REGISTRY[key] is not cls:
        raise ValueError(f"compressor name '{key}' registered twice: {_REGISTRY[key].__module__} and {cls.__module__}")
    _REGISTRY[key] = cls
    return cls


def _load_families() -> None:
    for mod in FAMILY_MODULES:
        importlib.import_module(f"edgeslim.compress.{mod}")


def get_compressor(name: str) -> Compressor:
    """An instance of the registered compressor `name`.

    Raises:
        ConfigError: no compressor of that name (the registered names are listed).
    """
    _load_families()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown compressor '{name}'; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]()


def list_compressors() -> dict[str, type[Compressor]]:
    """Registered compressors by name."""
    _load_families()
    return dict(sorted(_REGISTRY.items()))
