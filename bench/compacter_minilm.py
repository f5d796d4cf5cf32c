"""Benchmark: full fine-tuning vs head only, bottleneck, LoRA, Compacter, Compacter++ on MiniLM-L6 / BBC News.

The packaged (not fine-tuned) MiniLM sentence encoder gets a new 5-class head and each method trains
on a subsample of the fixed BBC News split of bench/lowrank_minilm.py (`bbc_news_split(0)`), then is
scored on the whole test split: accuracy, macro-F1, trainable parameters (count, %, and the papers'
formula), adapter file size, time per epoch, training peak RSS, and ONNX Runtime latency vs the
base (batch 8), merged (LoRA into its weights, PHM as dense matrices) and unmerged, timed in
alternating rounds against the base's session.

    python bench/compacter_minilm.py           # subsampled full run (~20 min on 2 shared cores)
    python bench/compacter_minilm.py --quick   # tiny BERT, a few documents: seconds; used by a test

The `adapters` library (AdapterHub) is not compared: it pins an older transformers than ours and
cannot be installed here beside it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from lowrank_minilm import _minilm_path, paired_latency  # noqa: E402  (the low-rank benchmark's helpers)
from edgeslim.report import save_png  # noqa: E402
from edgeslim.adapter import encode_pairs, evaluate, save_adapter, trainable_count  # noqa: E402
from edgeslim.compress.base import CompressResult, get_compressor  # noqa: E402
from edgeslim.compress.compacter import adapted_model, merge_for_export, paper_param_count, state_sha256  # noqa: E402
from edgeslim.compress.train import fit  # noqa: E402
from edgeslim.data import load_labelled  # noqa: E402
from edgeslim.export.onnx import to_onnx  # noqa: E402
from edgeslim.core.files import JSON, replace_output  # noqa: E402
from edgeslim.runtime.machine import machine_info  # noqa: E402
from edgeslim.runtime.measure import measure  # noqa: E402
from edgeslim.runtime.memory import MemoryProbe  # noqa: E402
from edgeslim.runtime.session import open_session  # noqa: E402
from edgeslim.sources import load_model, make_encoder  # noqa: E402
from edgeslim.core.specs import example_feeds  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("head", "compacter", "compacter_pp", "lora", "bottleneck", "full")  # head first: the latency reference
FULL = dict(source="minilm", train_docs=240, test_docs=None, epochs=2, batch=16, seq=64, full_lr=1e-4,
            settings={}, latency_dims={"batch": 8, "sequence": 64}, latency_rounds=3, latency_iters=4)
QUICK = dict(source="tiny-bert", train_docs=32, test_docs=16, epochs=1, batch=8, seq=16, full_lr=1e-3,
             settings={"reduction": 4}, latency_dims={"batch": 2, "sequence": 16}, latency_rounds=1, latency_iters=2)


def full_finetune(base, data, classes: int, epochs: int, lr: float) -> CompressResult:
    """Every parameter trains, with a new head: the reference the adapters are measured against."""
    model = copy.deepcopy(base.model)
    with torch.inference_mode():
        features = model(**data.batches[0]).shape[-1]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        adapted = adapted_model(model, torch.nn.Linear(features, classes), None)
    fit(adapted, data, epochs=epochs, lr=lr, seed=0, weight_decay=0.01, max_grad_norm=1.0, label="full fine-tuning")
    names = [n for n, p in adapted.named_parameters() if p.requires_grad]
    return CompressResult(adapted, "full", {"lr": lr}, [], {"trainable": names, "base_sha256": state_sha256(base.model)})


def adapter_params(result: CompressResult) -> int:
    """Parameters the adapters add (head and trained norms excluded): what the papers' formulas count."""
    return sum(c.params_after - c.params_before for c in result.changes if c.name != "head")


def formula(method: str, blocks: int, width: int, settings: dict, lora_layers: int) -> int | None:
    reduction = settings.get("reduction", 16)
    if method in ("compacter", "compacter_pp", "bottleneck"):
        return paper_param_count(method, blocks, width, width // reduction, n=4, rank=1)
    if method == "lora":
        return paper_param_count("lora", blocks, width, rank=8, lora_layers=lora_layers, lora_in=width, lora_out=width)
    return None


def run(cfg: dict, out: Path) -> dict:
    torch.set_num_threads(2)
    base = load_model(cfg["source"])
    if cfg["source"] == "minilm":  # the zoo's encoder cuts at 128 tokens; this run at cfg["seq"]
        from transformers import AutoTokenizer
        base.encode = make_encoder(AutoTokenizer.from_pretrained(_minilm_path()), cfg["seq"])
    train = load_labelled(f"bbc-news:{cfg['train_docs']}", "train")
    test = load_labelled(f"bbc-news:{cfg['test_docs']}" if cfg["test_docs"] else "bbc-news", "test")
    labels = sorted({y for _, y in train})
    data = encode_pairs(base, train, labels, cfg["batch"], "bbc-news train")
    test_data = encode_pairs(base, test, labels, 16, "bbc-news test")
    hf_config = base.model.hf.config
    blocks, width = hf_config.num_hidden_layers, hf_config.hidden_size
    tmp = Path(tempfile.mkdtemp(prefix="compacter_minilm_"))
    feeds = example_feeds(base.inputs, cfg["latency_dims"], seed=0)
    summary = {"source": cfg["source"], "config": cfg, "labels": labels, "train_docs": len(train), "test_docs": len(test),
               "machine": machine_info(), "base_params": sum(p.numel() for p in base.model.parameters()),
               "cut": "240 documents of the train split, 2 epochs, sequence 64 (the low-rank benchmark uses 128); "
                      "full test split; the adapters library is not compared (it pins an older transformers)",
               "latency": "ORT CPU p50 at batch 8, median of alternating rounds against the head-only model",
               "rows": []}
    probe = MemoryProbe("rss")
    base_session = None
    for method in VARIANTS:
        rss_start = probe.current()
        probe.reset_peak()
        start = time.perf_counter()
        if method == "full":
            result = full_finetune(base, data, len(labels), cfg["epochs"], cfg["full_lr"])
        else:
            extra = cfg["settings"] if method in ("compacter", "compacter_pp", "bottleneck") else {}
            result = get_compressor(method).compress(base.model, {**extra, "labels": labels, "epochs": cfg["epochs"]},
                                                     data)
        seconds = time.perf_counter() - start
        row = {"method": method, "epoch_seconds": seconds / cfg["epochs"], "train_peak_rss_bytes": probe.peak(),
               "train_peak_over_start_bytes": probe.peak() - rss_start, **evaluate(result.model, test_data)}
        row["trainable_params"] = trainable_count(result)
        row["trainable_percent"] = 100 * row["trainable_params"] / summary["base_params"]
        if method != "full":
            row["adapter_params"] = adapter_params(result)
            row["paper_formula_params"] = formula(method, blocks, width, cfg["settings"],
                                                  len(result.resolved.get("lora", [])))
            path = save_adapter(tmp / f"{method}.slim", result, base)
            row["adapter_file_bytes"] = (path / "weights.safetensors").stat().st_size
            row["artifact_bytes"] = sum(f.stat().st_size for f in path.iterdir())
        else:
            from safetensors.torch import save_model
            save_model(result.model, str(tmp / "full.safetensors"))
            row["adapter_file_bytes"] = (tmp / "full.safetensors").stat().st_size
        if method == "head":  # the reference graph: base encoder + head, what every adapter adds to
            ref = to_onnx(result.model, base.inputs, tmp / "head.onnx", dims=cfg["latency_dims"])
            base_session = open_session(ref.path, "cpu-ort-fp32")
            row["onnx_bytes"] = ref.file_bytes
            row["p50_ms"] = measure(base_session, feeds, warmup=2, iters=cfg["latency_iters"]).p50_ms
        elif method in ("lora", "compacter", "compacter_pp", "bottleneck"):
            kinds = {"unmerged": result.model} if method == "bottleneck" else \
                {"unmerged": result.model, "merged": merge_for_export(result.model)}
            for kind, model in kinds.items():
                exp = to_onnx(model, base.inputs, tmp / f"{method}-{kind}.onnx", dims=cfg["latency_dims"])
                ref_ms, ms = paired_latency(base_session, exp.path, feeds, cfg["latency_rounds"], cfg["latency_iters"])
                row[f"{kind}_onnx_bytes"], row[f"{kind}_p50_ms"], row[f"{kind}_ref_p50_ms"] = exp.file_bytes, ms, ref_ms
                row[f"{kind}_latency_ratio"] = ms / ref_ms
                row[f"{kind}_max_abs_diff"] = max(exp.max_abs_diff.values())
        summary["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("bytes")}), flush=True)
        write_results(summary, out)
    if base_session is not None:
        base_session.close()
    return summary


def write_results(summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with replace_output(out / "compacter_minilm.json", JSON) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(max(r["trainable_percent"], 1e-4), r["accuracy"], s=40)
        ax.annotate(r["method"], (max(r["trainable_percent"], 1e-4), r["accuracy"]), fontsize=8,
                    xytext=(4, 2), textcoords="offset points")
    ax.set(xscale="log", xlabel="trainable parameters (% of the base)", ylabel="test accuracy",
           title=f"MiniLM-L6 on BBC News ({summary['train_docs']} training docs)")
    save_png(fig, out / "compacter_minilm_accuracy.png")
    plt.close(fig)
    lat = [r for r in rows if "unmerged_latency_ratio" in r]
    if lat:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = range(len(lat))
        ax.bar([i - 0.2 for i in x], [r["unmerged_latency_ratio"] for r in lat], 0.4, label="unmerged")
        ax.bar([i + 0.2 for i in x], [r.get("merged_latency_ratio", float("nan")) for r in lat], 0.4, label="merged")
        ax.axhline(1.0, color="gray", ls="--")
        ax.set_xticks(list(x), [r["method"] for r in lat])
        ax.set(ylabel="ORT p50 / head-only model", title="inference latency overhead")
        ax.legend(fontsize=8)
        save_png(fig, out / "compacter_minilm_latency.png")
        plt.close(fig)


def table(summary: dict) -> str:
    lines = [f"{'method':13s} {'acc':>6s} {'F1':>6s} {'trainable':>10s} {'%':>7s} {'formula':>8s} {'file kB':>9s} "
             f"{'s/epoch':>8s} {'lat unm':>8s} {'lat mrg':>8s}"]
    for r in summary["rows"]:
        lines.append(f"{r['method']:13s} {r['accuracy']:6.3f} {r['macro_f1']:6.3f} {r['trainable_params']:10d} "
                     f"{r['trainable_percent']:7.3f} {str(r.get('paper_formula_params', '-')):>8s} "
                     f"{r['adapter_file_bytes'] / 1e3:9.1f} {r['epoch_seconds']:8.1f} "
                     f"{r.get('unmerged_latency_ratio', float('nan')):8.3f} {r.get('merged_latency_ratio', float('nan')):8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny BERT, a few documents: seconds")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    out = args.out or (Path(tempfile.mkdtemp(prefix="compacter_quick_")) if args.quick else RESULTS)
    summary = run(cfg, out)
    print(table(summary))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
