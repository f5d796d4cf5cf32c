"""Refactors keep decisions: each family's resolved decisions and outputs on tiny models, recorded.

GOLDEN was written by the code before the architecture step of issue 35 (commit fe62c48: the
sensitivity profile through a run-time subclass, per-family configs; the mpo distilled-healing case
by 446f48e, which matched fe62c48 on every other case, before healing was shared); the refactored
code must make the same decisions (ranks, bonds, kept channels) and compute the same outputs. The
demo checks the same on MiniLM: fe62c48 and the refactored code write bit-identical weights. The prune cases gained
the `skipped` record of issue 40 (fc3 left whole, its channels reach the output) and an empty `gqa` record (no
grouped-query attention in an MLP): the same decisions. Regenerate only for
an intended change of behaviour: `python tests/test_equivalence.py` rewrites tests/golden_decisions.json.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from edgeslim.compress.base import get_compressor
from edgeslim.core.calib import CalibData

torch.set_num_threads(1)


class MLP(nn.Module):
    """24 -> 48 -> 48 -> 8 with generic (full-rank) random weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(24, 48), nn.Linear(48, 48), nn.Linear(48, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def calib(targets: bool) -> CalibData:
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(16, 24, generator=g)} for _ in range(3)]
    return CalibData("tiny", batches, [torch.randint(0, 8, (16,), generator=g) for _ in batches] if targets else None)


CASES = {  # name: (method, config, calibration: None | "free" | "labels")
    "svd-uniform": ("svd", {"ratio": 0.5}, None),
    "svd-sensitivity": ("svd", {"ratio": 0.5, "allocation": "sensitivity"}, None),
    "svd-loss": ("svd", {"ratio": 0.5, "allocation": "loss"}, "free"),
    "svd-rank": ("svd", {"rank": 5, "align": 4}, None),
    "fwsvd-auto": ("fwsvd", {"ratio": 0.5}, "labels"),
    "fwsvd-loss": ("fwsvd", {"ratio": 0.4, "allocation": "loss", "profile_batches": 2}, "labels"),
    "asvd-whiten": ("asvd", {"ratio": 0.5}, "free"),
    "asvd-scale": ("asvd", {"ratio": 0.5, "mode": "scale"}, "free"),
    "asvd-kfac-loss": ("asvd", {"ratio": 0.5, "mode": "kfac", "draws": 2, "allocation": "loss"}, "free"),
    "mpo-profiled": ("mpo", {"ratio": 0.5, "cores": 2, "profile_batches": 2}, "free"),
    "mpo-sensitivity-healed": ("mpo", {"ratio": 0.5, "cores": 2, "allocation": "sensitivity", "heal_steps": 2,
                                       "heal_lr": 1e-3, "profile_batches": 1}, "labels"),
    "mpo-healed-distilled": ("mpo", {"ratio": 0.5, "cores": 2, "heal_steps": 3, "heal_lr": 1e-3, "profile_batches": 1},
                             "free"),
    "mpo-uniform": ("mpo", {"ratio": 0.6, "cores": 2}, None),
    "prune-healed": ("prune", {"ratio": 0.5, "heal_steps": 2, "heal_lr": 1e-3}, "free"),
    "prune-taylor": ("prune", {"ratio": 0.5, "criterion": "taylor", "allocation": "uniform"}, "labels"),
}
DROP = {"seconds", "schema"}  # wall time; the layout version


def decisions(resolved: dict) -> dict:
    """The resolved decisions without wall times, floats rounded (JSON-comparable)."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if k not in DROP}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, float):
            return float(f"{v:.6g}")
        return v
    return json.loads(json.dumps(clean(resolved)))


def run(name: str) -> dict:
    method, config, data = CASES[name]
    model = MLP().eval()
    comp = get_compressor(method)
    result = comp.compress(model, comp.make_config(config), None if data is None else calib(data == "labels"))
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = result.model.eval()(x)
    return {"resolved": decisions(result.resolved), "output_sum": float(out.double().sum()),
            "output_norm": float(out.double().norm())}


GOLDEN_FILE = Path(__file__).with_name("golden_decisions.json")
GOLDEN: dict[str, dict] = json.loads(GOLDEN_FILE.read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_decisions_and_outputs_as_before_the_refactor(name):
    got, want = run(name), GOLDEN[name]
    assert got["resolved"] == want["resolved"]
    for key in ("output_sum", "output_norm"):
        assert math.isclose(got[key], want[key], rel_tol=1e-5, abs_tol=1e-6), key


if __name__ == "__main__":
    GOLDEN_FILE.write_text(json.dumps({name: run(name) for name in sorted(CASES)}, indent=1) + "\n")
