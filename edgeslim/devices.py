"""Profiling on boards over SSH (`profile --device`, a profile's `address`, `device probe`).

The model file, the torch-free runner and the feeds go to each board (runtime/remote.py); the runner
measures there as local profiling does (warm-up, interleaved rounds, p50/p90/p99, cv, throughput, the
memory of a fresh process) and its answer is trusted only when its version and the model's SHA-256
match. Several boards are measured at once, one run per board at a time. Every row says where and when
it was measured (`measured_on`: address and machine fingerprint; `measured_at`).
"""
from __future__ import annotations

import functools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from edgeslim.core.errors import ConfigError, EdgeslimError, InferenceCrashError
from edgeslim.core.files import file_key
from edgeslim.core.progress import say
from edgeslim.core.specs import example_feeds
from edgeslim.profiling import resolve_sizes, work_of

SAVED_HEADER = "# Measured by `edgeslim device probe`"  # the first line of every profile it writes
PROBE_SHAPES = ((1, 384, 384), (8, 384, 1536), (128, 384, 384), (128, 1536, 384))  # a sample GEMM table


def boards(addresses: Sequence[str], identity: str | None, prof: Any) -> list[Any]:
    """A Board per address (the profile's own `address` when none is given), each checked before any work."""
    from edgeslim.runtime.address import parse_device
    from edgeslim.runtime.remote import Board

    if prof.runtime != "onnxruntime":
        raise ConfigError(f"a board runs ONNX Runtime: profile '{prof.name}' uses runtime '{prof.runtime}'; pick an "
                          "onnxruntime profile (e.g. cpu-ort-fp32, rpi5-ort-fp32)")
    if len(set(addresses)) != len(addresses):
        raise ConfigError(f"a board is named twice in --device {list(addresses)}")
    given = list(addresses) or ([prof.address] if prof.address else [])
    return [Board(parse_device(a, prof.python if not addresses else None), identity) for a in given]


def _model_file(target: Any) -> Path:
    """The ONNX file to copy: one file, its weights inside (external data would stay behind)."""
    path = Path(target)
    if path.suffix != ".onnx":
        raise ConfigError(f"a board runs ONNX files; {path.name} is not one")
    if _external_data(*file_key(path)):
        raise ConfigError(f"{path.name} keeps its weights in external data files; export it as one file (< 2 GB) to "
                          "profile it on a board")
    return path


# a run after the first (the same file, unchanged since: path, size, modification time) does not read it again
@functools.lru_cache(maxsize=64)
def _external_data(path: str, size: int, mtime_ns: int) -> bool:
    import onnx

    model = onnx.load(path, load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def measure_on(board: Any, targets: Sequence[Any], loaded: Sequence[Any], prof: Any, batches: Sequence[int],
               dims: Mapping[str, int], warmup: int, iters: int, rounds: int, memory: bool = True,
               news: Callable[[str], None] | None = None) -> list[list[dict[str, Any]]]:
    """Rows per target (one per batch) measured on `board`, the targets interleaved at each batch (with
    `memory`, each target's memory first, in a fresh process on the board); `news` gets a line as each
    batch starts on the board (its files there) and as it ends: the board works silently for seconds to minutes.

    A batch whose memory child died on the board (out of memory, the common case on a 4 GB board) is a
    `crashed` row for every target, as local profiling does.
    """
    from edgeslim.runtime.peak import measured_peak
    from edgeslim.runtime.roofline import roofline_fraction, roofline_ms

    files = [_model_file(t) for t in targets]
    out: list[list[dict[str, Any]]] = [[] for _ in targets]
    for b in batches:
        plans = [resolve_sizes(lo, dims, b) for lo in loaded]
        feeds = [example_feeds(lo.inputs, {**lo.dims, **sizes}, seed=0) for lo, (sizes, _) in zip(loaded, plans)]
        start = time.perf_counter()
        answer = board.measure(files, feeds, prof.threads, prof.provider, warmup, iters, rounds, memory, started=news and (
            lambda: news(f"{board.device}: batch {b}, {len(files)} model(s) on the board: " + (
                "memory in a fresh process, " if memory else "") + f"{warmup} warm-up + {iters} timed calls")))
        if news:
            news(f"{board.device}: batch {b} measured in {time.perf_counter() - start:.1f} s")
        where = {"address": board.device.address, **answer["machine"]}
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for i, ((sizes, size_sources), f, mem) in enumerate(zip(plans, feeds, answer["memory"])):
            row: dict[str, Any] = {"batch": b, "sizes": sizes, "size_sources": size_sources, "measured_on": where,
                                   "measured_at": when, "load_avg": answer.get("load_avg")}
            if answer["timings"] is None:
                crashed = next(m["crashed"] for m in answer["memory"] if m and "crashed" in m)
                out[i].append(row | {"crashed": f"on {board.device}: {crashed}"})
                continue
            row |= answer["timings"][i]
            if mem is not None:
                row["memory"], row["peak_rss_bytes"] = mem | {"weights_resident_bytes": max(
                    0, mem["loaded_rss_bytes"] - mem["baseline_rss_bytes"])}, mem["peak_rss_bytes"]
            work = work_of(files[i], loaded[i], f, sizes, prof.precision)
            if work is not None:
                row["flops"], row["bytes_moved"] = work
                if prof.remote:  # a board profile: its own (published or probed) limits
                    row["peak"] = measured_peak(prof).to_dict()
                    row["roofline_ms"] = roofline_ms(*work, prof)
                    row["roofline_fraction"] = roofline_fraction(row["p50_ms"], *work, prof)
            out[i].append(row)
    return out


def on_boards(all_boards: Sequence[Any], job) -> dict[str, Any]:
    """`job(board)` on every board at once (one run per board at a time); {address: result or error}."""
    def one(board):
        try:
            return job(board)
        except EdgeslimError as exc:
            if len(all_boards) == 1:
                raise
            return exc

    with ThreadPoolExecutor(max_workers=max(1, len(all_boards))) as pool:
        results = list(pool.map(one, all_boards))
    return {b.device.address: r for b, r in zip(all_boards, results)}


def probe(board: Any, threads: int) -> dict[str, Any]:
    """The board's CPU, features, RAM, OS, Python and ONNX Runtime, its measured fp32 GEMM peak, copy
    bandwidth and a sample GEMM table (runtime/device_runner.probe)."""
    info = board.probe(threads, PROBE_SHAPES)
    return {"address": board.device.address, **info, "python_path": board.device.python,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def align_of(features: Sequence[str], arch: str) -> int:
    """The fp32 SIMD width a probed board wants shapes aligned to: 16 (AVX-512), 8 (AVX/AVX2), 4 (NEON)."""
    if "avx512f" in features:
        return 16
    if "avx2" in features or arch in ("x86_64", "AMD64"):
        return 8
    return 4


def saved_profile_text(info: Mapping[str, Any], threads: int) -> str:
    """The TOML of a measured profile: the board's own peak and bandwidth, its address and Python."""
    ram = f"ram_gb = {info['ram_bytes'] / 1e9:.1f}\n" if info.get("ram_bytes") else ""
    return (f"{SAVED_HEADER} on {info['measured_at']}: {info['cpu_model']} ({info['arch']}, "
            f"{info['logical_cpus']} CPUs, {', '.join(info['features']) or 'no listed SIMD features'}),\n"
            f"# onnxruntime {info['onnxruntime']}, Python {info['python']}.\n"
            f"description = {json.dumps(info['cpu_model'] + ' at ' + info['address'] + ', ONNX Runtime CPU fp32 (measured)')}\n"
            "device = \"cpu\"\nruntime = \"onnxruntime\"\nprovider = \"CPUExecutionProvider\"\nprecision = \"fp32\"\n"
            f"threads = {threads}\nbatch = [1]\nalign = {align_of(info['features'], info['arch'])}\n"
            f"peak_gflops = {info['fp32_gflops']:.1f}\nmem_gbps = {info['mem_gbps']:.2f}\nremote = true\n{ram}"
            f"address = {json.dumps(info['address'])}\npython = {json.dumps(info['python_path'])}\n")


def user_profile_path(name: str) -> Path:
    """Where `device probe --save NAME` writes: the user's profile folder (EDGESLIM_CONFIG_DIR overrides)."""
    from edgeslim.runtime.targets import user_profiles_dir

    return user_profiles_dir() / f"{name}.toml"



def profile_on_boards(item: str, profile: str, addresses: Sequence[str], identity: str | None,
                      batches: Sequence[int] | None, dims: Mapping[str, int], warmup: int, iters: int, trust: Any,
                      source: Mapping[str, Any], quiet: bool) -> dict[str, Any]:
    """One model measured on each board: {address: rows, or the EdgeslimError that board ended with}."""
    from edgeslim.pipeline import profile_target
    from edgeslim.runtime.targets import load_profile

    prof = load_profile(profile)
    all_boards = boards(addresses, identity, prof)
    with profile_target(item, profile, quiet, trust, source) as (target, loaded):
        return {a: r[0] if isinstance(r, list) else r for a, r in on_boards(all_boards, lambda board: measure_on(
            board, [target], [loaded], prof, batches or prof.batch, dims, warmup, iters, 1,
            news=None if quiet else say)).items()}


def compare_on_boards(items: Sequence[str], profile: str, addresses: Sequence[str], identity: str | None,
                      batches: Sequence[int] | None, dims: Mapping[str, int], warmup: int, iters: int, rounds: int,
                      trust: Any, source: Mapping[str, Any], quiet: bool, eval_data: str | None) -> dict[str, Any]:
    """`profile A B --device X --device Y`: the candidates interleaved on each board, every (candidate, board)
    one column of the comparison (`compare`'s schema; ratios are to the first candidate on the first board).
    A board that failed is listed under `board_errors`."""
    import contextlib

    from edgeslim.compare import _evaluate, _file_bytes, _params, ratios
    from edgeslim.pipeline import profile_target
    from edgeslim.runtime.targets import load_profile

    if len(items) < 2:
        raise ConfigError("a comparison needs two or more candidates (the first is the reference)")
    prof = load_profile(profile)
    all_boards = boards(addresses, identity, prof)
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(profile_target(i, profile, quiet, trust, source)) for i in items]
        results = on_boards(all_boards, lambda board: measure_on(board, [t for t, _ in opened], [lo for _, lo in opened],
                                                                 prof, batches or prof.batch, dims, warmup, iters, rounds,
                                                                 news=None if quiet else say))
        local = [{"item": str(i), "file_bytes": _file_bytes(t), "params": _params(lo)} for i, (t, lo) in zip(items, opened)]
        if eval_data:
            _evaluate(local, opened, eval_data)
    candidates, failed = [], {}
    for address, result in results.items():
        crashed = None if isinstance(result, Exception) else next(
            (r["crashed"] for rows in result for r in rows if "crashed" in r), None)
        if isinstance(result, Exception) or crashed:
            failed[address] = " ".join(str(result if isinstance(result, Exception) else crashed).split())
            continue
        host = address.removeprefix("ssh://")
        candidates += [{**cand, "item": f"{Path(cand['item']).name} @ {host}", "board": address, "rows": rows}
                       for cand, rows in zip(local, result)]
    if not candidates:
        raise InferenceCrashError("no board measured the candidates: " + "; ".join(f"{a}: {m}" for a, m in failed.items()))
    return {"profile": profile, "rounds": rounds, "warmup": warmup, "iters": iters, "candidates": candidates,
            "ratios": ratios(candidates), "board_errors": failed}
