"""The defaults the command line shows and the library uses, as plain values that import nothing, so
`edgeslim --help` and `edgeslim list ...` start without torch."""
from __future__ import annotations

from pathlib import Path

DEFAULT_PROFILE = "cpu-ort-fp32"  # the target `run` and `compress` decide for when none is named
DEFAULT_OUT = Path("edgeslim-out")  # where outputs go without -o
TILE = 640  # LR tile side for models that declare their receptive radius (`halo`): bounded memory
# ESPCN training (edgeslim/sr_train.py): steps, batch size, learning rate, patches drawn, patch side
SR_RECIPE = {"steps": 30000, "batch_size": 32, "lr": 1e-3, "count": 32768, "patch": 17}
