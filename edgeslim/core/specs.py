"""Declarative model inputs: names, symbolic shapes and dtypes, shared by export, artifact and runtime."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from edgeslim.core.errors import ConfigError

MAX_ELEMENTS = 1 << 28  # the most elements one example input (or a size read from a manifest) may have
_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


@dataclass(frozen=True)
class TensorSpec:
    """One model input. shape holds ints (fixed) or names (dynamic: "batch", "sequence", "height").

    For integer inputs, `high` bounds the random values (vocabulary size for token ids); an input
    named like an attention mask is filled with ones.
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"
    high: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ConfigError(f"input '{self.name}': dtype {self.dtype!r} not in {sorted(_DTYPES)}")
        object.__setattr__(self, "shape", tuple(self.shape))

    def concrete_shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """Shape with each named dimension replaced from `dims` (error names the missing one)."""
        out = []
        for d in self.shape:
            if isinstance(d, str):
                if d not in dims:
                    raise ConfigError(f"input '{self.name}' needs a size for dimension '{d}'; given {dict(dims)}")
                out.append(int(dims[d]))
            else:
                out.append(int(d))
        elements = math.prod(out)
        if elements > MAX_ELEMENTS or min(out, default=1) < 1:
            raise ConfigError(f"input '{self.name}' of shape {tuple(out)} has {elements:,} elements; sizes must be "
                              f">= 1 and the total at most {MAX_ELEMENTS:,}")
        return tuple(out)

    def example(self, dims: Mapping[str, int], rng: np.random.Generator) -> np.ndarray:
        """A random array of this spec's dtype and the concrete shape for `dims`."""
        shape = self.concrete_shape(dims)
        if self.dtype.startswith("int"):
            if "mask" in self.name:
                return np.ones(shape, dtype=_DTYPES[self.dtype])
            return rng.integers(0, self.high or 2, size=shape).astype(_DTYPES[self.dtype])
        return rng.standard_normal(shape).astype(_DTYPES[self.dtype])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "high": self.high}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(name=d["name"], shape=tuple(d["shape"]), dtype=d.get("dtype", "float32"), high=d.get("high"))


def dynamic_dims(specs: Sequence[TensorSpec]) -> list[str]:
    """The named dimensions of a set of inputs, in first-seen order."""
    seen: list[str] = []
    for s in specs:
        seen += [d for d in s.shape if isinstance(d, str) and d not in seen]
    return seen


def example_feeds(specs: Sequence[TensorSpec], dims: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for every input at the given dimension sizes (reproducible by seed)."""
    rng = np.random.default_rng(seed)
    return {s.name: s.example(dims, rng) for s in specs}
