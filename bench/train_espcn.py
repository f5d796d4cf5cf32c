"""Retrain the ESPCN x2/x3/x4 models that ship in edgeslim/models/espcn-x{2,3,4}.slim/ (the one recipe).

Each is trained by `edgeslim.sr_train.train_espcn` (RECIPE there: patches of every natural photograph
that installs offline, multi-scale copies, flips and 90-degree rotations, Adam with cosine decay;
never the held-out images) and saved as an artifact whose source is the bicubic upsampler of the
same scale; the manifest records the data, steps, seed and every training setting. A learning curve
(mean held-out Y-PSNR gain over bicubic vs training time; monitoring only, never model selection) goes
to bench/results/train_espcn.json (one section per scale, merged) and train_espcn_curve.png.

Run from the repository root, one scale per invocation under the heavy-work lock:
    flock /work/bench.lock python bench/train_espcn.py --scales 3
`--quick` trains a few steps into a temporary folder (the test of this script).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgeslim import images
from edgeslim.runtime.machine import machine_info
from edgeslim.sr_train import RECIPE, train_espcn_artifact

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "edgeslim" / "models"
RESULTS = ROOT / "bench" / "results"
GOALS_DB = {2: 1.6, 3: 1.2, 4: 0.9}  # issue 25: mean held-out gain over bicubic


class Curve:
    """Held-out gain every `every` steps, timed without the time spent evaluating."""

    def __init__(self, scale: int, every: int):
        self.scale, self.every, self.points = scale, every, []
        self.start, self.eval_seconds = time.perf_counter(), 0.0

    def __call__(self, step: int, model: torch.nn.Module) -> None:
        if step % self.every:
            return
        t = time.perf_counter()
        was_training = model.training
        gain = images.held_out_gain(model.eval(), self.scale)
        model.train(was_training)
        self.points.append({"step": step, "train_seconds": t - self.start - self.eval_seconds, "gain_db": gain})
        self.eval_seconds += time.perf_counter() - t
        print(f"x{self.scale} step {step}: held-out gain {gain:+.3f} dB", flush=True)


def steps_for(scale: int, minutes: float, batch_size: int, patch: int) -> tuple[int, float]:
    """Steps that fill `minutes` of training on this machine now (timed on a throwaway model), and ms/step."""
    from edgeslim.core.sr_models import ESPCN

    model = ESPCN(scale)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    x, y = torch.rand(batch_size, 1, patch, patch), torch.rand(batch_size, 1, scale * patch, scale * patch)
    for i in range(25):
        if i == 5:
            start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x=x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    per_step = (time.perf_counter() - start) / 20
    return max(100, int(minutes * 60 / per_step) // 100 * 100), 1000 * per_step


def plot(sections: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for key, sec in sorted(sections.items()):
        pts = sec["learning_curve"]
        line, = ax.plot([p["train_seconds"] / 60 for p in pts], [p["gain_db"] for p in pts], "o-", ms=3,
                        label=f"x{key}")
        ax.axhline(GOALS_DB[int(key)], color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("training time (minutes, 2 CPU threads)")
    ax.set_ylabel("held-out Y-PSNR gain over bicubic (dB)")
    ax.set_title("ESPCN learning curves (dotted: goals)")
    ax.legend()
    fig.tight_layout()
    name = "train_espcn_curve.png"
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--steps", type=int, default=RECIPE["steps"], help="Adam steps per scale")
    parser.add_argument("--minutes", type=float, help="instead of --steps: as many steps as fill this many "
                        "minutes per scale on this machine (timed first; the JSON and manifest record the steps)")
    parser.add_argument("--count", type=int, default=RECIPE["count"],
                        help="LR/HR patch pairs drawn once from the training photographs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine has 2 shared cores)")
    parser.add_argument("--points", type=int, default=12, help="learning-curve points per scale")
    parser.add_argument("--quick", action="store_true", help="a few steps on a small pool, temporary output")
    parser.add_argument("--out", type=Path, help="folder for espcn-xS.slim (default edgeslim/models; temp with --quick)")
    parser.add_argument("--results", type=Path, help="results folder (default bench/results; temp with --quick)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="train-espcn-")) if args.quick else None
    models, results = args.out or tmp or MODELS, args.results or tmp or RESULTS
    results.mkdir(parents=True, exist_ok=True)
    steps = 6 if args.quick else args.steps
    settings = {"count": 64, "batch_size": 8} if args.quick else {"count": args.count}
    json_path = results / "train_espcn.json"
    summary = json.loads(json_path.read_text()) if json_path.is_file() else {"scales": {}}
    for scale in args.scales:
        sized = None
        if args.minutes and not args.quick:
            steps, ms = steps_for(scale, args.minutes, RECIPE["batch_size"], RECIPE["patch"])
            sized = {"minutes": args.minutes, "timed_ms_per_step": ms}
            print(f"x{scale}: {steps} steps fill {args.minutes} minutes ({ms:.0f} ms/step)", flush=True)
        curve = Curve(scale, max(1, steps // args.points))
        start = time.perf_counter()
        result, path = train_espcn_artifact(scale, steps, models / f"espcn-x{scale}.slim", args.seed,
                                            monitor=curve, **settings)
        seconds = time.perf_counter() - start
        change, record = result.changes[0], result.step_record()
        pairs = images.training_pairs(scale)
        summary["scales"][str(scale)] = {
            "artifact": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
            "data": {"training_images": list(images.TRAINING), "rescales": list(images.TRAINING_RESCALES),
                     "training_planes": len(pairs), "lr_pixels": int(sum(lr.size for _, _, lr in pairs)),
                     "held_out_images": list(images.HELD_OUT), "patches": result.resolved["training"]["samples"],
                     "name": result.resolved["training"]["data"],
                     "augment": "random flip and 90-degree rotation per batch"},
            "steps": steps, "sized_by_time": sized, "seed": args.seed,
            "reproduce": f"python bench/train_espcn.py --scales {scale} --steps {steps} --count {settings['count']} --seed {args.seed}", "config": record["config"],
            "schedule": f"AdamW (no weight decay), cosine lr {record['config']['lr']:g} -> "
                        f"{record['config']['lr'] / 100:g}, MSE on Y/255",
            "seconds_total": seconds, "seconds_training": seconds - curve.eval_seconds,
            "ms_per_step": 1000 * (seconds - curve.eval_seconds) / steps, "threads": args.threads,
            "loss_first": result.resolved["training"]["loss_first"],
            "loss_last50": result.resolved["training"]["loss_last50"],
            "final_held_out_gain_db": curve.points[-1]["gain_db"] if curve.points else None,
            "goal_gain_db": GOALS_DB[scale], "learning_curve": curve.points, "quick": args.quick,
            "machine_info": machine_info()}
        print(f"x{scale}: {change.params_after:,} params, {steps} steps in {seconds:.0f} s "
              f"({summary['scales'][str(scale)]['ms_per_step']:.0f} ms/step); {change.note} -> {path}")
    summary["recipe"] = {**RECIPE, "source": "edgeslim/sr_train.py"}
    summary["figures"] = [plot(summary["scales"], results)]
    tmp_json = json_path.with_suffix(".json.tmp")
    tmp_json.write_text(json.dumps(summary, indent=2))
    tmp_json.replace(json_path)
    print(f"results: {json_path}")


if __name__ == "__main__":
    main()
