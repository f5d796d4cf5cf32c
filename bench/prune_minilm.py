"""Structured pruning of MiniLM-L6 fine-tuned on BBC News: attention heads and FFN neurons.

Reuses bench/lowrank_minilm.py's fine-tuned, cached classifier and its seeded split. Targets every
encoder layer's q/k/v heads (with the attention output's input columns) and FFN neurons (intermediate
rows with the output's columns); the residual width, embeddings and classifier stay whole. Per kept
ratio and criterion: test accuracy before/after a short heal, and the ORT CPU p50 of the pruned model
against the original in alternating rounds, beside its FLOPs ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lowrank_minilm import FULL as LOWRANK_FULL  # noqa: E402
from edgeslim.report import save_png  # noqa: E402
from lowrank_minilm import accuracy, export_and_count, finetuned_setup, paired_latency, plt  # noqa: E402

from edgeslim.compress.prune import Prune  # noqa: E402
from edgeslim.compress.replace import count_params  # noqa: E402
from edgeslim.compress.train import heal  # noqa: E402
from edgeslim.core.files import JSON, replace_output  # noqa: E402
from edgeslim.runtime.machine import machine_info  # noqa: E402
from edgeslim.runtime.session import open_session  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TARGET = r"hf\.bert\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|intermediate\.dense)"
# The low-rank benchmark's cached classifier (2 epochs, sequence 128) on the full test split; cut for the
# 2-core machine: healing is 20 steps, only at kept 0.5 and 0.3; latency in 3 interleaved rounds of 4 runs.
FULL = dict(ratios=[0.75, 0.5, 0.3], criteria=["l2", "taylor", "merge"], heal_ratios=[0.5, 0.3], heal_steps=20,
            calib_samples=32, finetune=LOWRANK_FULL["finetune"], latency_rounds=3, latency_iters=4,
            latency_dims={"batch": 8, "sequence": 128},
            cut="healing only at kept 0.5 and 0.3 and only 20 steps (lr 5e-5); 32 calibration articles")
QUICK = dict(ratios=[0.5], criteria=["l2", "merge"], heal_ratios=[0.5], heal_steps=2, calib_samples=16,
             finetune=dict(epochs=1, lr=1e-3, batch=8, seq=32, seed=0, split_seed=0, train_docs=64, test_docs=32,
                           tiny=True), latency_rounds=1, latency_iters=2, latency_dims={"batch": 2, "sequence": 32})


def run(cfg: dict, out: Path, cache_root: Path) -> dict:
    setup = finetuned_setup(cfg, cache_root)
    recipe, folder, loaded, model = cfg["finetune"], setup.folder, setup.loaded, setup.loaded.model
    test, train, calib, feeds = setup.test, setup.train, setup.calib, setup.feeds
    tmp = Path(tempfile.mkdtemp(prefix="prune_minilm_"))
    with torch.no_grad():
        base = {"accuracy": accuracy(model, test), "params": count_params(model),
                **export_and_count(model, loaded, feeds, tmp / "original.onnx")}
    session = open_session(base.pop("onnx_path"), "cpu-ort-fp32")
    summary = {"machine": machine_info(), "model": str(folder), "recipe": recipe, "target": TARGET,
               "latency_dims": cfg["latency_dims"], "cut": cfg.get("cut", ""), "test_docs": sum(len(t) for t in test.targets), "original": base, "rows": []}
    exported: dict[tuple, tuple[float, float, dict]] = {}
    for ratio in cfg["ratios"]:
        for criterion in cfg["criteria"]:
            res = Prune().compress(model, {"ratio": ratio, "criterion": criterion, "target": TARGET}, calib)
            small = res.model
            heads = [g["channels"] // g["unit"] for g in res.resolved["groups"] if g["unit"] > 1]
            kept_heads = [len(g["kept"]) // g["unit"] for g in res.resolved["groups"] if g["unit"] > 1]
            ffn = [len(g["kept"]) for g in res.resolved["groups"] if g["unit"] == 1]
            shape = tuple(kept_heads + ffn)
            if shape not in exported:
                info = export_and_count(small, loaded, feeds, tmp / "variant.onnx")
                b, p = paired_latency(session, info.pop("onnx_path"), feeds, cfg["latency_rounds"], cfg["latency_iters"])
                exported[shape] = (b, p, info)
            b, p, info = exported[shape]
            with torch.no_grad():
                acc = accuracy(small, test)
            row = {"ratio": ratio, "criterion": criterion, "accuracy": acc, "params": count_params(small),
                   "targeted_kept": res.resolved["params_kept"] / res.resolved["params_targeted"],
                   "heads_kept": kept_heads, "heads": heads, "ffn_kept": ffn, "merged": res.resolved["merged"],
                   "flops_ratio": info["flops"] / base["flops"], "base_p50_ms": b, "p50_ms": p, "latency_ratio": p / b}
            if ratio in cfg["heal_ratios"]:
                heal(small, train, steps=cfg["heal_steps"], lr=5e-5, seed=0, progress=False)
                with torch.no_grad():
                    row["healed_accuracy"] = accuracy(small, test)
            summary["rows"].append(row)
            print(f"{criterion:6s} ratio {ratio}: accuracy {acc:.4f} healed {row.get('healed_accuracy')} "
                  f"heads {sum(kept_heads)}/{sum(heads)} latency x{row['latency_ratio']:.2f} "
                  f"FLOPs x{row['flops_ratio']:.2f}", flush=True)
            write_results(summary, out)
    session.close()
    return summary


def write_results(summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with replace_output(out / "prune_minilm.json", JSON) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for c in sorted({r["criterion"] for r in summary["rows"]}):
        pts = sorted((r["ratio"], r["accuracy"]) for r in summary["rows"] if r["criterion"] == c)
        axes[0].plot(*zip(*pts), "-o", label=c)
        healed = [(r["ratio"], r["healed_accuracy"]) for r in summary["rows"] if r["criterion"] == c and "healed_accuracy" in r]
        if healed:
            axes[0].plot(*zip(*healed), "s", label=f"{c} + heal")
    axes[0].axhline(summary["original"]["accuracy"], color="gray", ls="--", label="original")
    axes[0].set(xlabel="kept ratio of head + FFN parameters", ylabel="BBC News test accuracy")
    pts = [(r["flops_ratio"], r["latency_ratio"]) for r in summary["rows"]]
    axes[1].plot(*zip(*pts), "o")
    axes[1].plot([0, 1.1], [0, 1.1], "k-", lw=0.8, label="latency = FLOPs")
    axes[1].set(xlim=[0, 1.1], ylim=[0, 1.3], xlabel="FLOPs ratio", ylabel="ORT CPU p50 latency ratio")
    for ax in axes:
        ax.legend(fontsize=7)
    save_png(fig, out / "prune_minilm.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny BERT, a few documents: seconds")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgeslim")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    out = args.out or (Path(tempfile.mkdtemp(prefix="prune_minilm_quick_")) if args.quick else RESULTS)
    summary = run(cfg, out, out / "cache" if args.quick else args.cache)
    print(f"results in {out}; {len(summary['rows'])} variants")


if __name__ == "__main__":
    main()
