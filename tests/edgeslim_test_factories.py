"""Factories the tests name as `edgeslim_test_factories:NAME` (tests/ is on sys.path under pytest)."""
import os
from pathlib import Path

import torch
from torch import nn

CALLED = "EDGESLIM_TEST_FACTORY_CALLED"  # environment variable: the file `explode` writes when it runs


class Tiny(nn.Module):
    """16 -> 32 -> 4 MLP taking x=[batch, 16]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def tiny() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Tiny()


def explode() -> nn.Module:
    """A factory no test may ever reach through a manifest: it leaves a mark and fails."""
    Path(os.environ[CALLED]).write_text("the factory ran")
    raise RuntimeError("factory code ran")


def raises() -> nn.Module:
    raise ValueError("this factory is broken")


class Branchy(nn.Module):
    """Data-dependent control flow: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)
        self.edgeslim_inputs = [{"name": "x", "shape": ["batch", 16]}]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x) * 2
        return self.fc(x)


def branchy() -> nn.Module:
    return Branchy()
