"""Retrain the ESPCN x2/x3/x4 models that ship in edgeslim/models/espcn-x{2,3,4}.slim/.

Each is trained by `edgeslim.sr_train.train_espcn` (ground-truth HR patches of the bundled
training images, never the held-out ones) and saved as an artifact whose source is the bicubic
upsampler of the same scale; the manifest records the data, steps, seed and every training setting.
Run from the repository root: `python bench/train_espcn.py [--scales 2 3 4] [--steps N]`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from edgeslim.pipeline import train_espcn_artifact

MODELS = Path(__file__).resolve().parents[1] / "edgeslim" / "models"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--steps", type=int, default=2500, help="Adam steps (batch 16) per scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine has 2 shared cores)")
    parser.add_argument("--out", type=Path, default=MODELS, help="folder for the espcn-xS.slim artifacts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for scale in args.scales:
        start = time.time()
        result, path = train_espcn_artifact(scale, args.steps, args.out / f"espcn-x{scale}.slim", args.seed)
        change = result.changes[0]
        print(f"x{scale}: {change.params_after:,} params, {args.steps} steps in {time.time() - start:.0f} s; "
              f"{change.note}; rel. error on training patches {change.rel_error:.4f} -> {path}")


if __name__ == "__main__":
    main()
