"""What every session shares: the Session protocol, BaseSession (feed checks, memory baseline) and the
checks a session makes before opening (model file present, CUDA present).

`session.py` (torch, ONNX Runtime, and `open_session`, which picks one) and `trt_session.py` (TensorRT)
both build on this module: session.py imports trt_session.py, never the other way round.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from edgeslim.core.errors import ConfigError, MissingDependencyError, SourceError
from edgeslim.runtime.memory import MemoryProbe
from edgeslim.runtime.targets import Profile


class Session(Protocol):
    """What the profiler and the export checks need from a running model."""

    inputs: list[str]  # input names, in the model's order
    profile: Profile  # the target it runs on
    device: str  # "cpu" or "cuda"
    memory_kind: str  # MemoryProbe kind that sees this session's allocations
    baseline_mem_bytes: int | None  # memory in use just before the first run (None until then)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def synchronize(self) -> None: ...

    def close(self) -> None: ...


class BaseSession:
    """Shared pieces: context manager, feed-name checks, memory baseline, no-op sync on the CPU."""

    inputs: list[str]
    profile: Profile
    device: str = "cpu"
    memory_kind: str = "rss"
    baseline_mem_bytes: int | None = None
    _required: Sequence[str] = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def synchronize(self) -> None:
        """Wait for queued device work (CUDA sessions override)."""

    def close(self) -> None:
        """Release the model (subclasses drop their handles)."""

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once on numpy feeds keyed by input name; outputs keyed by output name.

        Raises:
            ConfigError: a required input is missing or a feed name is not an input.
        """
        unknown = sorted(set(feeds) - set(self.inputs))
        missing = [n for n in self._required if n not in feeds]
        if unknown or missing:
            raise ConfigError(f"feeds do not match the model's inputs {self.inputs}: "
                              f"missing {missing}, unknown {unknown}")
        if self.baseline_mem_bytes is None:
            self.baseline_mem_bytes = MemoryProbe(self.memory_kind).current()
        return self._run(feeds)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def require_cuda(profile: Profile) -> None:
    """Raise MissingDependencyError when a CUDA profile is used where torch sees no GPU."""
    import torch

    if not torch.cuda.is_available():
        raise MissingDependencyError(f"profile '{profile.name}' runs on CUDA, but torch.cuda.is_available() is "
                                     f"False (torch {torch.__version__}): use a CPU profile or a CUDA build of torch")



def check_file(path: Path) -> None:
    if not path.is_file():
        raise SourceError(f"model file {path} does not exist" if not path.exists() else f"{path} is not a file")
