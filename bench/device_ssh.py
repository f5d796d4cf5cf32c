"""Is a board measured over SSH measured like the machine at hand? Loopback SSH against local, interleaved.

A real sshd on 127.0.0.1 (tests/loopback_ssh.py; Debian's openssh-server) plays the board, with a Python
that has numpy and onnxruntime and no torch. Round by round, the same ONNX file at the same sizes is
timed by local profiling (`profiling.profile_file`, in-process ORT) and by `profile --device`
(`devices.measure_on`: copy by SHA-256, the runner on the "board", its answer checked), so load drift hits
both alike. Goals (issue 37): the remote p50 within 5% of the local one, and the overhead of a run after
the first (connect, hash check, feeds and result transfer, the runner's start) under 2 s.

Run it alone on a quiet machine: `flock /tmp/bench.lock python bench/device_ssh.py` (it refuses to start
above a 1-minute load of 1.5).

    python bench/device_ssh.py --quick   # tiny MLP, seconds; writes to a temporary folder
    python bench/device_ssh.py           # MiniLM s128 at batch 1 and 8
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from loopback_ssh import Boards, device_python  # noqa: E402

from edgeslim.core.files import JSON, replace_output  # noqa: E402
from edgeslim.devices import measure_on  # noqa: E402
from edgeslim.pipeline import export_model  # noqa: E402
from edgeslim.profiling import profile_file  # noqa: E402
from edgeslim.runtime.machine import machine_info  # noqa: E402
from edgeslim.runtime.address import parse_device  # noqa: E402
from edgeslim.runtime.remote import Board  # noqa: E402
from edgeslim.runtime.targets import load_profile  # noqa: E402
from edgeslim.sources import load_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PROFILE = "cpu-ort-fp32"
FULL = {"models": {"minilm": ({"sequence": 128}, [1, 8])}, "rounds": 5, "iters": 20, "warmup": 3, "overhead_runs": 8,
        "cut": "MiniLM only (ESPCN x3 at 1080p left out to fit the quiet window at the end of a session)"}
QUICK = {"models": {"tiny-mlp": ({}, [1])}, "rounds": 2, "iters": 5, "warmup": 1, "overhead_runs": 2}
MAX_LOAD = 1.5


def _board_runs(board: Board, target: Path, loaded, batch: int, dims: dict, settings: dict) -> dict:
    """Overhead of a run after the first (connect, hash check, feeds and result transfer, the runner's start):
    the wall time of a 1-call run without the memory child, minus that call; and the same run with the
    memory child (a fresh Python opening the model on the board), which `profile --device` also pays."""
    prof = load_profile(PROFILE)
    out = {}
    for memory in (False, True):
        walls = []
        for _ in range(settings["overhead_runs"] + 1):
            start = time.perf_counter()
            rows = measure_on(board, [target], [loaded], prof, [batch], dims, 0, 1, 1, memory)[0]
            walls.append(time.perf_counter() - start - rows[0]["p50_ms"] / 1e3)
        key = "with_memory_child_" if memory else ""
        out |= {f"{key}first_run_s": walls[0], f"{key}overhead_s": statistics.median(walls[1:]),
                f"{key}overhead_max_s": max(walls[1:])}
    return out


def run(settings: dict, out: Path) -> dict:
    prof = load_profile(PROFILE)
    with tempfile.TemporaryDirectory(prefix="edgeslim-bench-ssh-") as tmp:
        lab = Boards(Path(tmp) / "ssh")
        os.environ["EDGESLIM_SSH_CONFIG"] = str(lab.config)
        try:
            python = device_python(Path(tmp) / "py")
            board = Board(parse_device(lab.boards[0].address(python)))
            results = []
            for name, (dims, batches) in settings["models"].items():
                loaded = load_model(name)
                target = Path(export_model(loaded, "onnx", Path(tmp) / f"{name}.onnx", PROFILE, quiet=True)["onnx"])
                for batch in batches:
                    local, there = [], []
                    for _ in range(settings["rounds"]):  # alternating: drift hits both alike
                        local.append(profile_file(target, loaded, PROFILE, [batch], dims, settings["warmup"],
                                                  settings["iters"], roofline=False, child_memory=False)[0]["p50_ms"])
                        there.append(measure_on(board, [target], [loaded], prof, [batch], dims, settings["warmup"],
                                                settings["iters"], 1)[0][0]["p50_ms"])
                    row = {"model": name, "batch": batch, "sizes": dims, "local_p50_ms": statistics.median(local),
                           "ssh_p50_ms": statistics.median(there), "local_rounds_ms": local, "ssh_rounds_ms": there}
                    row["ssh_over_local"] = row["ssh_p50_ms"] / row["local_p50_ms"]
                    row |= _board_runs(board, target, loaded, batch, dims, settings)
                    row["goal_within_5pct"] = abs(row["ssh_over_local"] - 1) <= 0.05
                    row["goal_overhead_under_2s"] = row["overhead_s"] < 2.0
                    results.append(row)
                    print(json.dumps({k: v for k, v in row.items() if not k.endswith("rounds_ms")}), flush=True)
        finally:
            lab.stop()
    summary = {"machine": machine_info(), "profile": PROFILE, "settings": {k: v for k, v in settings.items()
                                                                          if k != "models"},
               "models": {k: {"sizes": d, "batches": b} for k, (d, b) in settings["models"].items()}, "rows": results,
               "transport": "OpenSSH over 127.0.0.1 (ControlMaster connection reuse), runner on a torch-free Python"}
    with replace_output(out / "device_ssh.json", JSON) as path:
        path.write_text(json.dumps(summary, indent=1))
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny MLP, a temporary output folder")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results; --quick: a temp folder)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    if not args.quick and load > MAX_LOAD:
        print(f"refused: 1-minute load {load:.2f} > {MAX_LOAD}; run it alone on a quiet machine", file=sys.stderr)
        return 2
    out = args.out or (Path(tempfile.mkdtemp(prefix="edgeslim-bench-")) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    run(QUICK if args.quick else FULL, out)
    print(f"wrote {out / 'device_ssh.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
