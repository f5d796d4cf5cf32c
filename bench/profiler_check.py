"""Does `edgeslim profile` agree with a user's own timing loop? p50 vs a bare timeit loop, max RSS, roofline.

For each model the ONNX file is exported once; then, round by round (so load drift hits both alike),
the profiler (`profiling.profile_file`, the code behind `edgeslim profile`) and a bare loop (an ORT
session with the same threads, `timeit.repeat(number=1)`, median) time the same file at the same
sizes. The ratio of the two p50s should be within 10%. The profiler's peak resident memory (measured
in a fresh child process per batch, runtime/child.py) should be within 15% of the maximum RSS
`/usr/bin/time -v` reports for a bare script doing the same runs. The roofline
efficiency uses the limits measured on this machine (runtime/peak.py) and the work counted from the
ONNX graph (runtime/onnx_work.py).

    python bench/profiler_check.py --quick   # tiny MLP, seconds; writes to a temporary folder
    python bench/profiler_check.py           # MiniLM s128, EfficientNet-Lite0 224, ESPCN x3 to 1080p
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import timeit
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from edgeslim.core.files import JSON, REPORT, replace_output  # noqa: E402
from edgeslim.pipeline import export_model  # noqa: E402
from edgeslim.profiling import profile_file  # noqa: E402
from edgeslim.runtime.machine import machine_info  # noqa: E402
from edgeslim.runtime.peak import measured_peak  # noqa: E402
from edgeslim.runtime.targets import load_profile  # noqa: E402
from edgeslim.sources import load_model  # noqa: E402
from edgeslim.core.specs import example_feeds  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# ESPCN x3 to 1080p: a 640x360 low-resolution Y channel in, 1920x1080 out.
FULL = {"models": {"minilm": {"sequence": 128}, "efficientnet-lite0": {},
                   "espcn-x3": {"height": 360, "width": 640}}, "rounds": 3, "iters": 6, "warmup": 1,
        "cut": "iters 10 -> 6, warmup 2 -> 1 per round, to fit a lock slot on a CPU shared by 5 sessions"}
QUICK = {"models": {"tiny-mlp": {}}, "rounds": 2, "iters": 5, "warmup": 1}

BARE = """import sys, timeit, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = {threads}; o.inter_op_num_threads = 1
s = ort.InferenceSession({path!r}, sess_options=o, providers=["CPUExecutionProvider"])
feeds = dict(np.load({feeds!r}))
for _ in range({warmup}): s.run(None, feeds)
t = timeit.repeat(lambda: s.run(None, feeds), number=1, repeat={iters})
print(sorted(t)[len(t) // 2] * 1e3)
"""


def bare_script(path: Path, feeds_file: Path, threads: int, warmup: int, iters: int) -> str:
    return BARE.format(path=str(path), feeds=str(feeds_file), threads=threads, warmup=warmup, iters=iters)


def max_rss_bytes(script: str) -> tuple[int, float]:
    """(max RSS in bytes from /usr/bin/time -v, the script's printed p50 ms) of a bare python run."""
    res = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    kib = next(int(line.split(":")[1]) for line in res.stderr.splitlines() if "Maximum resident set size" in line)
    return kib * 1024, float(res.stdout.strip().splitlines()[-1])


def bare_p50_ms(session, feeds: dict, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        session.run(None, feeds)
    return statistics.median(timeit.repeat(lambda: session.run(None, feeds), number=1, repeat=iters)) * 1e3


def check_model(name: str, dims: dict, cfg: dict, profile: str, work: Path) -> dict:
    import onnxruntime as ort

    prof = load_profile(profile)
    loaded = load_model(name)
    sizes = {**loaded.dims, **dims, "batch": 1}
    onnx_path = Path(export_model(loaded, "onnx", work / f"{name}.onnx", profile, quiet=True)["onnx"])
    feeds = example_feeds(loaded.inputs, sizes, seed=0)
    feeds_file = work / f"{name}_feeds.npz"
    np.savez(feeds_file, **feeds)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = prof.threads, 1
    bare = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    file_loaded = type(loaded)(loaded.model, loaded.source, loaded.inputs, loaded.task, sizes)
    rounds = []
    for r in range(cfg["rounds"]):  # interleaved: profiler, then bare loop, each round
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row = profile_file(onnx_path, file_loaded, profile, [1], dims, cfg["warmup"], cfg["iters"])[0]
        b = bare_p50_ms(bare, feeds, cfg["warmup"], cfg["iters"])
        rounds.append({"round": r, "profiler_p50_ms": row["p50_ms"], "bare_p50_ms": b, "load_avg": os.getloadavg(),
                       "roofline_fraction": row.get("roofline_fraction"), "profiler_peak_mem_bytes":
                       row["peak_mem_bytes"], "profiler_mem_method": row["mem_method"],
                       "profiler_peak_rss_bytes": row.get("peak_rss_bytes"), "profiler_memory": row.get("memory")})
    rss, script_p50 = max_rss_bytes(bare_script(onnx_path, feeds_file, prof.threads, cfg["warmup"], cfg["iters"]))
    ratio = statistics.median(x["profiler_p50_ms"] / x["bare_p50_ms"] for x in rounds)
    rss_ratio = statistics.median(x["profiler_peak_rss_bytes"] for x in rounds) / rss
    return {"model": name, "dims": dims, "onnx_bytes": onnx_path.stat().st_size, "flops": row.get("flops"),
            "bytes_moved": row.get("bytes_moved"), "sizes": row["sizes"], "size_sources": row["size_sources"],
            "rounds": rounds, "p50_ratio_profiler_over_bare": ratio, "within_10pct": abs(ratio - 1) <= 0.10,
            "bare_script_max_rss_bytes": rss, "bare_script_p50_ms": script_p50,
            "rss_ratio_profiler_child_over_bare": rss_ratio, "rss_within_15pct": abs(rss_ratio - 1) <= 0.15,
            "roofline_fraction_median": statistics.median(x["roofline_fraction"] for x in rounds
                                                          if x["roofline_fraction"] is not None)
            if row.get("flops") else None}


def plot(results: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = [r["model"] for r in results]
    ax.bar(np.arange(len(names)) - 0.2, [statistics.median(x["profiler_p50_ms"] for x in r["rounds"]) for r in results],
           0.4, label="edgeslim profile p50")
    ax.bar(np.arange(len(names)) + 0.2, [statistics.median(x["bare_p50_ms"] for x in r["rounds"]) for r in results],
           0.4, label="bare timeit p50")
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_title("profiler vs a bare timing loop, same ONNX file, interleaved")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with replace_output(path, REPORT) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny MLP: seconds")
    parser.add_argument("--models", help="comma-separated subset of the full run's models")
    parser.add_argument("--profile", default="cpu-ort-fp32")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = parser.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    if args.models:
        cfg["models"] = {m: cfg["models"][m] for m in args.models.split(",")}
    out = args.out or (Path(tempfile.mkdtemp(prefix="profiler_check_quick_")) if args.quick else RESULTS)
    info_before = machine_info()
    with tempfile.TemporaryDirectory() as work:
        results = [check_model(m, d, cfg, args.profile, Path(work)) for m, d in cfg["models"].items()]
    summary = {"config": cfg, "profile": args.profile, "peak": measured_peak(load_profile(args.profile)).to_dict(),
               "machine_before": info_before, "machine_after": machine_info(), "results": results,
               "note": "CPU shared with other jobs: read ratios (interleaved round by round), not absolute ms"}
    out.mkdir(parents=True, exist_ok=True)
    with replace_output(out / "profiler_check.json", JSON) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    plot(results, out / "profiler_check_p50.png")
    for r in results:
        print(f"{r['model']}: profiler/bare p50 {r['p50_ratio_profiler_over_bare']:.3f}, roofline "
              f"{r['roofline_fraction_median']}, bare max RSS {r['bare_script_max_rss_bytes'] / 2**20:.0f} MiB, "
              f"profiler (child) / bare RSS {r['rss_ratio_profiler_child_over_bare']:.3f}")
    print(f"results in {out}")


if __name__ == "__main__":
    main()
