"""Benchmark: latency against batch size, ONNX Runtime and PyTorch eager side by side on one target.

Exports the model to ONNX (validated in ONNX Runtime), then for each batch size times the ONNX file
on the ONNX Runtime profile and the nn.Module on the matching torch profile (same threads),
interleaved round by round (runtime.measure.interleave), and sets each row beside the roofline of
the target: FLOPs (torch's FlopCounterMode) and a lower bound on bytes moved (weights + inputs +
outputs) against this machine's measured peak GFLOP/s and GB/s (runtime.peak.measured_peak).

    python bench/profile_sweep.py            # MiniLM-L6, batches 1 and 8, sequence 128 (a few minutes)
    python bench/profile_sweep.py --quick    # tiny MLP, seconds; writes to a temporary folder

Writes bench/results/profile_sweep.json and bench/results/profile_sweep_latency.png.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from edgeslim.export.onnx import to_onnx  # noqa: E402
from edgeslim.core.files import JSON, REPORT, replace_output  # noqa: E402
from edgeslim.runtime.machine import machine_info  # noqa: E402
from edgeslim.runtime.measure import interleave  # noqa: E402
from edgeslim.runtime.peak import measured_peak  # noqa: E402
from edgeslim.runtime.roofline import count_flops, min_bytes_moved, roofline_fraction, roofline_ms  # noqa: E402
from edgeslim.runtime.session import open_session  # noqa: E402
from edgeslim.runtime.targets import load_profile  # noqa: E402
from edgeslim.sources import load_model  # noqa: E402
from edgeslim.core.specs import example_feeds  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FULL = {"model": "minilm", "batches": [1, 8], "sequence": 128, "warmup": 2, "iters": 10, "rounds": 5,
        "cut": "iters 20 -> 10, warmup 3 -> 2 per runtime and batch, to fit a lock slot on a CPU shared by 5 sessions"}
QUICK = {"model": "tiny-mlp", "batches": [1, 8, 32], "sequence": 16, "warmup": 2, "iters": 10, "rounds": 2}


def sweep_rows(cfg: dict, ort_profile: str, torch_profile: str, workdir: Path) -> tuple[list[dict], dict]:
    """Time the model at each batch on both runtimes; returns the rows and the model facts."""
    loaded = load_model(cfg["model"])
    ort_p, torch_p = load_profile(ort_profile), load_profile(torch_profile)
    peak = measured_peak(ort_p)  # measured here for a local target, published for a board
    limits = {"onnxruntime": ort_p.override({"peak_gflops": peak.gflops(ort_p.precision), "mem_gbps": peak.mem_gbps}),
              "torch": torch_p.override({"peak_gflops": peak.gflops(torch_p.precision), "mem_gbps": peak.mem_gbps})}
    torch.set_num_threads(torch_p.threads or torch.get_num_threads())
    dims = {**loaded.dims, "sequence": cfg["sequence"]}
    export = to_onnx(loaded.model, loaded.inputs, workdir / f"{cfg['model']}.onnx", dims={**dims, "batch": 2})
    facts = {"model": cfg["model"], "params": sum(p.numel() for p in loaded.model.parameters()),
             "onnx_bytes": export.file_bytes, "dims": {k: v for k, v in dims.items() if k != "batch"},
             "peak": peak.to_dict()}
    rows = []
    with open_session(export.path, ort_p) as ort_s, open_session(loaded.model, torch_p) as torch_s:
        for b in cfg["batches"]:
            feeds = example_feeds(loaded.inputs, {**dims, "batch": b}, seed=b)
            flops = count_flops(loaded.model, feeds)
            bytes_moved = min_bytes_moved(loaded.model, feeds, ort_p.precision)
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")  # the unstable flag is kept in the row
                timings = interleave([ort_s, torch_s], [feeds, feeds], warmup=cfg["warmup"], iters=cfg["iters"],
                                     rounds=cfg["rounds"], progress=True)
            for (runtime, prof), t in zip((("onnxruntime", ort_p), ("torch", torch_p)), timings):
                lim = limits[runtime]
                rows.append({"runtime": runtime, "profile": prof.name, **t.to_dict(), "flops": flops,
                             "bytes_moved": bytes_moved, "roofline_ms": roofline_ms(flops, bytes_moved, lim),
                             "roofline_fraction": roofline_fraction(t.p50_ms, flops, bytes_moved, lim),
                             "gflops_per_s": flops / (t.p50_ms / 1e3) / 1e9})
            rows[-1]["torch_over_ort_p50"] = timings[1].p50_ms / timings[0].p50_ms  # side by side, interleaved
    return rows, facts


def print_table(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for col in ("runtime", "batch", "p50 ms", "p90 ms", "p99 ms", "cv", "samples/s", "torch/ORT",
                "GFLOP", "roofline ms", "% roofline"):
        table.add_column(col, justify="left" if col == "runtime" else "right")
    for r in rows:
        table.add_row(r["runtime"], str(r["batch"]), f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}",
                      f"{r['cv']:.2f}" + (" !" if r["unstable"] else ""), f"{r['throughput_per_s']:.1f}",
                      f"{r['torch_over_ort_p50']:.2f}" if "torch_over_ort_p50" in r else "-", f"{r['flops'] / 1e9:.3f}", f"{r['roofline_ms']:.3f}",
                      f"{100 * r['roofline_fraction']:.0f}%")
    Console(width=160).print(table)


def plot(rows: list[dict], facts: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    for runtime in dict.fromkeys(r["runtime"] for r in rows):
        rs = [r for r in rows if r["runtime"] == runtime]
        ax.errorbar([r["batch"] for r in rs], [r["p50_ms"] for r in rs],
                    yerr=[[0] * len(rs), [r["p90_ms"] - r["p50_ms"] for r in rs]], marker="o", capsize=3,
                    label=f"{runtime} p50 (bar to p90)")
    roof = [r for r in rows if r["runtime"] == rows[0]["runtime"]]
    ax.plot([r["batch"] for r in roof], [r["roofline_ms"] for r in roof], "k--", label="roofline limit")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("latency per call (ms)")
    shape = ", ".join(f"{k}={v}" for k, v in facts["dims"].items())
    ax.set_title(f"{facts['model']} ({shape}): latency vs batch")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with replace_output(path, REPORT) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_results(rows: list[dict], facts: dict, cfg: dict, machine_before: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # Other processes on the same cores slow every row alike and raise cv: read the interleaved ratios, not ms.
    summary = {"config": cfg, **facts, "machine_info": machine_before, "machine_info_after": machine_info(),
               "rows": rows}
    with replace_output(out / "profile_sweep.json", JSON) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    plot(rows, facts, out / "profile_sweep_latency.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny MLP: seconds")
    parser.add_argument("--model", help="model source (default minilm; tiny-mlp with --quick)")
    parser.add_argument("--batches", help="comma-separated batch sizes")
    parser.add_argument("--iters", type=int, help="timed calls per runtime and batch (the cut is recorded in config)")
    parser.add_argument("--profile", default="cpu-ort-fp32", help="ONNX Runtime profile")
    parser.add_argument("--torch-profile", default="cpu-torch-fp32", help="torch profile to compare with")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = parser.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    if args.model:
        cfg["model"] = args.model
    if args.batches:
        cfg["batches"] = [int(b) for b in args.batches.split(",")]
    if args.iters:
        cfg["iters"] = args.iters
    out = args.out or (Path(tempfile.mkdtemp(prefix="profile_sweep_quick_")) if args.quick else RESULTS)
    machine_before = machine_info()
    with tempfile.TemporaryDirectory() as work:
        rows, facts = sweep_rows(cfg, args.profile, args.torch_profile, Path(work))
    print_table(rows, f"{facts['model']} on {args.profile} vs {args.torch_profile}")
    write_results(rows, facts, cfg, machine_before, out)
    print(f"results in {out}")


if __name__ == "__main__":
    main()
