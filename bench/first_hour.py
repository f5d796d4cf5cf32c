"""Benchmark: a new user's first hour (issue 38): start-up of the quick commands, and the README's quickstart.

Sections (`--sections`, default both):
- startup: wall time of `edgeslim --help` and each `edgeslim list ...` in a fresh process (the console
  script a user runs), REPEATS times after one warm-up; the goal is under 0.5 s.
- quickstart: the README's "Make my model faster" block run as written (each line a fresh `edgeslim`
  process in an empty folder, with empty caches: the GEMM table is timed by the first command that needs
  it), then VARIANTS (other requests a user makes: the README's low-rank example at `--speedup 1.5`):
  every speedup round (aimed, estimated, measured), the round kept, the agreement `compress` prints
  (cosine mean on held-out sentences, of what the artifact deploys: for INT8 its ONNX graph), the
  side-by-side profile's output and the speedup it measured, and each command's wall time.

    python bench/first_hour.py                      # ~15 min on 2 cores; writes bench/results/first_hour.json
    python bench/first_hour.py --quick              # tiny BERT in place of MiniLM, 2 repeats: a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeslim.core.files import JSON, replace_output  # noqa: E402
from edgeslim.runtime.machine import machine_info  # noqa: E402

RESULTS = ROOT / "bench" / "results"
EDGESLIM = Path(sys.executable).parent / "edgeslim"  # the console script installed beside this Python
STARTUP = (["--help"], ["list", "models"], ["list", "datasets"], ["list", "profiles"], ["list", "compressors"])
REPEATS = 7
GOAL_S = 0.5
GOAL_COSINE = 0.9
# requests beside the README's, run after it in the same folder: (name, the compress line's replacements)
VARIANTS = (("low rank: asvd (K-FAC weighting on the encoder's layers) at --speedup 1.5, heal 40 steps",
             {"-m": "asvd", "--speedup": "1.5", "--target": r".*encoder\.layer\.\d+\..*", "--set": "mode=kfac",
              "--heal": "40", "-o": "minilm-lowrank.slim"}),)
ROUND = re.compile(r"speedup round (\d+): aimed at ([\d.]+)x by the GEMM table, estimated ([\d.]+)x, "
                   r"measured ([\d.]+)x")
COSINE = re.compile(r"cosine mean ([\d.]+)")
ROW = re.compile(r"^\W*(\S+)\s*│\s*(\d+)\s*│\s*([\d.]+)\s*│\s*([\d.]+)\s*│", re.M)  # candidate, batch, p50, x first


def quickstart_lines() -> list[str]:
    """The `edgeslim` lines of the README's "Make my model faster" block."""
    section = (ROOT / "README.md").read_text().split("### Make my model faster", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.strip().splitlines() if line.startswith("edgeslim ")]


def run(line: str, cwd: Path, cache: Path | None = None) -> dict:
    """One command line in a fresh process: its exit code, wall time, stdout and stderr. With `cache`, the
    edgeslim caches (converted models, exports, measured GEMM tables and peaks) start empty there, as a new
    user's do."""
    args = shlex.split(line)
    env = {**os.environ, **({"EDGESLIM_CACHE": str(cache), "EDGESLIM_CACHE_DIR": str(cache)} if cache else {})}
    t = time.perf_counter()
    done = subprocess.run([str(EDGESLIM), *args[1:]], cwd=cwd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    print(f"{seconds:7.1f} s  rc {done.returncode}  {line}", flush=True)
    if done.returncode:
        print(done.stderr[-2000:], file=sys.stderr, flush=True)
    return {"line": line, "returncode": done.returncode, "seconds": seconds, "stdout": done.stdout,
            "stderr": done.stderr}


def startup(repeats: int) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for args in STARTUP:
            line = " ".join(["edgeslim", *args])
            run(line, Path(tmp))  # warm-up: the file cache, not the interpreter
            times = [run(line, Path(tmp))["seconds"] for _ in range(repeats)]
            rows.append({"command": line, "seconds": times, "median_s": statistics.median(times), "min_s": min(times),
                         "under_goal": statistics.median(times) < GOAL_S})
    return {"goal_s": GOAL_S, "repeats": repeats, "rows": rows}


def compress_summary(result: dict, artifact: Path) -> dict:
    """What a compress line printed and kept: its rounds, the round kept, the agreement."""
    rounds = [{"round": int(r), "aimed": float(a), "estimated": float(e), "measured": float(m)}
              for r, a, e, m in ROUND.findall(result["stderr"])]
    cosine = COSINE.search(result["stdout"])
    out = {"rounds_printed": rounds, "cosine_mean": float(cosine.group(1)) if cosine else None}
    if (artifact / "manifest.json").is_file():
        steps = json.loads((artifact / "manifest.json").read_text())["steps"]
        latency = next((s["resolved"]["latency"] for s in steps if "latency" in s.get("resolved", {})), None)
        if latency:
            out["measured_speedup"] = latency["measured_speedup"]
            out["targeted_dense_ms"], out["model_ms"] = latency["targeted_dense_ms"], latency["model_ms"]
        out["params"] = json.loads((artifact / "report.json").read_text()).get("params")
    return out


def profile_summary(result: dict) -> dict:
    """What a side-by-side profile printed: each candidate's p50 and ratio to the first, and the last
    candidate's speedup over the first (1 / its ratio)."""
    rows = [{"candidate": c, "batch": int(b), "p50_ms": float(p), "x_first": float(x)}
            for c, b, p, x in ROW.findall(result["stdout"])]
    return {"rows": rows, **({"speedup": 1 / rows[-1]["x_first"]} if len(rows) > 1 else {})}


def variant_line(line: str, changes: dict) -> str:
    """`line` with each option in `changes` set to its value (None: removed, with its value; an option the
    line lacks is added)."""
    args, out = shlex.split(line), []
    i = 0
    while i < len(args):
        if args[i] in changes:
            if changes[args[i]] is not None:
                out += [args[i], changes[args[i]]]
            i += 2
            continue
        out.append(args[i])
        i += 1
    for option, value in changes.items():
        if option not in args and value is not None:
            out += [option, value]
    return shlex.join(out)


def quickstart(quick: bool) -> dict:
    lines = quickstart_lines()
    if quick:  # tiny BERT at a kept ratio in place of MiniLM at a speedup: the lines' shape, not their figures
        lines = [line.replace("minilm", "tiny-bert").replace("bbc-news-sentences:256", "sentences")
                 .replace("--heal 40", "--heal 2").replace("--speedup 1.5", "--ratio 0.5") for line in lines]
    summary: dict = {"lines": lines, "commands": [], "variants": []}
    with tempfile.TemporaryDirectory(prefix="first_hour_") as tmp:
        folder, cache = Path(tmp) / "work", Path(tmp) / "cache"
        folder.mkdir()
        for line in lines:
            result = run(line, folder, cache)
            row = {k: result[k] for k in ("line", "returncode", "seconds")}
            if line.startswith("edgeslim compress"):
                row.update(compress_summary(result, folder / shlex.split(line)[shlex.split(line).index("-o") + 1]))
            if line.startswith("edgeslim profile"):
                row["profile"] = profile_summary(result)
            row["stdout"] = result["stdout"][-4000:]
            summary["commands"].append(row)
        compress = next(line for line in lines if line.startswith("edgeslim compress"))
        for name, changes in () if quick else VARIANTS:
            line = variant_line(compress, changes)
            result = run(line, folder, cache)
            summary["variants"].append({"name": name, "line": line, "returncode": result["returncode"],
                                        "seconds": result["seconds"], **compress_summary(result, folder / changes["-o"]),
                                        "stdout": result["stdout"][-4000:], "stderr_tail": result["stderr"][-2000:]})
    first = summary["commands"][0]
    profiled = next((c["profile"] for c in summary["commands"] if "profile" in c), {})
    speedup = profiled.get("speedup")  # what the user's `profile` measured, else what `compress` measured
    speedup = speedup if speedup is not None else first.get("measured_speedup")
    summary["goal"] = {"speedup_at_least": 1.5, "cosine_at_least": GOAL_COSINE, "measured_speedup": speedup,
                       "compress_measured_speedup": first.get("measured_speedup"), "cosine_mean": first.get("cosine_mean"),
                       "met": bool(first.get("cosine_mean") and first["cosine_mean"] >= GOAL_COSINE
                                   and (speedup or 0) >= 1.5)}
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="startup,quickstart")
    parser.add_argument("--quick", action="store_true", help="tiny BERT, 2 repeats: a smoke run (writes to --out)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="first_hour_quick_")) if args.quick else RESULTS)
    sections = args.sections.split(",")
    summary = {"machine_start": machine_info(), "quick": args.quick}
    if "startup" in sections:
        summary["startup"] = startup(2 if args.quick else REPEATS)
    if "quickstart" in sections:
        summary["quickstart"] = quickstart(args.quick)
    summary["machine_end"] = machine_info()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "first_hour.json"
    if path.is_file() and set(sections) != {"startup", "quickstart"}:  # a section re-run keeps the other's rows
        summary = {**json.loads(path.read_text()), **summary}
    with replace_output(path, JSON) as tmp:
        tmp.write_text(json.dumps(summary, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
