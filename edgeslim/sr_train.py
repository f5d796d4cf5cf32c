"""The ESPCN training recipe: the one that trained the shipped espcn-x2/x3/x4 (bench/train_espcn.py runs it).

Data: patches of every natural photograph that installs offline (`edgeslim.images.TRAINING`, never the
held-out ones), each image also used shrunk by `images.TRAINING_RESCALES` (multi-scale), every batch
under a random flip and 90-degree rotation (the 8 symmetries of the square). Schedule: Adam (AdamW
without weight decay), cosine decay from `lr` to lr/100, MSE on Y in [0, 1] against the HR ground
truth, as in Shi et al. 2016 (who trained on ImageNet).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

from edgeslim import artifact
from edgeslim.compress.base import CompressContext, CompressResult
from edgeslim.compress.replace import count_params
from edgeslim.compress.subpixel import ESPCNConfig, ESPCNTrainer
from edgeslim.core.files import ARTIFACT, check_output
from edgeslim.images import patch_calibration
from edgeslim.sources import load_model
from edgeslim.core.sr_models import BicubicUpsampler
from edgeslim.defaults import SR_RECIPE as RECIPE

# The shipped models' schedule (per scale): ~13 minutes of 2 CPU cores each (~26 ms/step). The held-out
# gain still rises at the end (bench/results/train_espcn.json's learning curves): longer runs gain more.


def train_espcn(scale: int, steps: int = RECIPE["steps"], seed: int = 0, count: int = RECIPE["count"],
                patch: int = RECIPE["patch"], monitor: Callable[[int, nn.Module], None] | None = None,
                **settings: Any) -> CompressResult:
    """Train ESPCN x`scale` on patches of the training photographs (ground truth; bicubic is the source).

    Args:
        count: LR/HR patch pairs drawn once from the training images (never the held-out ones).
        patch: LR patch side (the HR patch is scale * patch), 17 as in Shi et al. 2016.
        monitor: monitor(steps_done, model) after every step (learning curves).
        settings: other ESPCNConfig fields (batch_size, lr, channels, ...); RECIPE's or the config's
            defaults otherwise.

    Returns:
        The `espcn` CompressResult; its model is the trained ESPCN (eval mode).
    """
    settings = {"batch_size": RECIPE["batch_size"], "lr": RECIPE["lr"], **settings}
    config = ESPCNConfig.from_dict({**settings, "scale": scale, "steps": steps, "seed": seed})
    calib = patch_calibration(scale, count, patch=patch, seed=seed, batch_size=config.batch_size)
    return ESPCNTrainer().compress(BicubicUpsampler(scale), config, calib, context=CompressContext(monitor=monitor))


def train_espcn_artifact(scale: int, steps: int, out: str | Path, seed: int = 0,
                         monitor: Callable[[int, nn.Module], None] | None = None,
                         **settings: Any) -> tuple[CompressResult, Path]:
    """Train ESPCN for `scale` (`train_espcn`) and save it as an artifact whose source is the bicubic
    upsampler it was trained beside (the manifest records data, steps, seed and every setting)."""
    check_output(out, ARTIFACT)
    teacher = load_model(f"bicubic-x{scale}")
    result = train_espcn(scale, steps, seed=seed, monitor=monitor, **settings)
    report = {"changes": [c.to_dict() for c in result.changes],
              "params": count_params(result.model)}
    path = artifact.save(out, result.model, teacher.source, [result.step_record()], teacher.inputs, report,
                         "super-resolution", teacher.dims)
    return result, Path(path)
