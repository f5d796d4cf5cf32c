"""Calibration / training data handed to compressors: a shared leaf every package may import."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from edgeslim.core.errors import ConfigError


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

    def head(self, n: int) -> "CalibData":
        """The first `n` batches (and their targets), under the same name."""
        return CalibData(self.name, self.batches[:n], None if self.targets is None else self.targets[:n])

    def __iter__(self) -> Iterator[tuple[int, dict[str, torch.Tensor], torch.Tensor | None]]:
        for i, batch in enumerate(self.batches):
            yield i, batch, None if self.targets is None else self.targets[i]
