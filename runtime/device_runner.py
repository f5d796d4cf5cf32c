"""The measurement that runs ON a device: one file that needs only Python >= 3.9, numpy and onnxruntime.

`edgeslim profile --device ssh://...` copies this file (and the models) into a per-user cache folder
on the board, addressed by SHA-256, and runs it there with fixed arguments; edgeslim's own profiler
uses its `summarize` and `interleaved_times`, so a board and the machine at hand are measured alike.
It imports nothing from edgeslim (the board has no edgeslim and no torch).

    python3 -I device_runner.py probe|gemm|measure|memory ...   # what the local side runs; not a user command

The local side writes one JSON header line on stdin, then the bytes the header announces (feeds as
.npz); stdin then stays open: when it closes (the user pressed Ctrl-C, the connection dropped) the
runner stops its children, removes its temporary folder and exits. The answer is one JSON object on
stdout; `{"error": KIND, "message": ...}` when something was refused or failed.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

VERSION = "2"  # the local side refuses an answer from a runner of another version
UNSTABLE_CV = 0.15  # above this spread a timing is flagged unstable (runtime/measure.py reads it here)
INTERLEAVED_MEM = "not measured: interleaved sessions share one process (see runtime/child.py)"
MEMORY_TIMEOUT_S = 900
# CPU features that decide which kernels ONNX Runtime picks: x86 SIMD/INT8 and ARM NEON/dotprod/i8mm/SVE.
X86_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
                "amx_int8", "amx_bf16")
ARM_FEATURES = ("asimd", "asimddp", "i8mm", "sve", "sve2", "bf16", "fphp", "asimdhp")
INT8_FEATURES = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm", "sve")


def summarize(times_s, batch: int, warmup: int, peak=None, method: str = INTERLEAVED_MEM, clock: str = "wall"):
    """Percentiles, spread and throughput of per-call times in seconds: the fields of a Timing, as a dict."""
    import numpy as np

    ms = np.asarray(times_s, dtype=float) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    mean = float(ms.mean())
    std = float(ms.std(ddof=1)) if len(ms) > 1 else 0.0
    cv = std / mean if mean > 0 else 0.0
    return {"batch": int(batch), "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": mean,
            "std_ms": std, "cv": cv, "throughput_per_s": batch / (mean / 1e3) if mean > 0 else float("inf"),
            "peak_mem_bytes": peak, "mem_method": method, "iters": int(len(ms)), "warmup": int(warmup),
            "unstable": cv > UNSTABLE_CV, "clock": clock}


def round_shares(iters: int, rounds: int):
    """Timed calls per round: `iters` spread over min(rounds, iters) rounds, the first ones one more."""
    rounds = min(rounds, iters)
    return [iters // rounds + (r < iters % rounds) for r in range(rounds)]


def interleaved_times(calls, warmup: int, iters: int, rounds: int, timed=None, advance=None):
    """Per-call seconds of each of `calls` (zero-argument functions), round by round, after `warmup` untimed
    calls each: every round runs each call in turn for its share of `iters`, so drift hits all alike.
    `timed(call) -> seconds` replaces the wall clock per call index (CUDA events); `advance()` ticks a bar."""
    def wall(call):
        start = time.perf_counter()
        call()
        return time.perf_counter() - start

    timers = timed or [wall] * len(calls)
    tick = advance or (lambda: None)
    for call in calls:
        for _ in range(warmup):
            call()
            tick()
    times = [[] for _ in calls]
    for share in round_shares(iters, rounds):
        for i, call in enumerate(calls):
            for _ in range(share):
                times[i].append(timers[i](call))
                tick()
    return times


def _read_text(path: str) -> str:
    try:
        with open(path, errors="ignore") as f:
            return f.read()
    except OSError:
        return ""


def _status_kib(field: str) -> int | None:
    for line in _read_text("/proc/self/status").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _rss_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes (ru_maxrss where /proc is absent)."""
    kib = _status_kib(field)
    if kib is not None:
        return kib * 1024
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def cpu_model_and_flags():
    """(model name, flags) from /proc/cpuinfo (x86 `flags`, ARM `Features`; a board's device-tree model
    where the CPU has no name); ("unknown", set()) where nothing can be read."""
    model, flags = "", set()
    for line in _read_text("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    model = model or _read_text("/proc/device-tree/model").strip("\x00\n ") or platform.processor() or "unknown"
    return model, flags


def cpu_ids():
    """The numbers that tell apart CPUs sold under one name (an "AMD EPYC" Zen 2 from a Zen 4): x86 family,
    model and stepping, ARM implementer, part and revision, as /proc/cpuinfo gives them."""
    keys = ("cpu family", "model", "stepping", "cpu implementer", "cpu part", "cpu revision")
    ids = {}
    for line in _read_text("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in keys and key not in ids and value.strip():
            ids[key] = value.strip()
        elif not line.strip() and ids:
            break  # the first processor's block is enough
    return ids


def cpu_info():
    """CPU model, architecture, cores, SIMD and INT8 features, RAM and OS of this machine."""
    model, flags = cpu_model_and_flags()
    mem_kib = next((int(line.split()[1]) for line in _read_text("/proc/meminfo").splitlines()
                    if line.startswith("MemTotal:")), None)
    features = [f for f in X86_FEATURES + ARM_FEATURES if f in flags]
    return {"cpu_model": model, "cpu_ids": cpu_ids(), "arch": platform.machine(), "logical_cpus": os.cpu_count(),
            "features": features,
            "int8_features": [f for f in INT8_FEATURES if f in flags],
            "ram_bytes": mem_kib * 1024 if mem_kib else None, "os": platform.platform(),
            "python": platform.python_version(), "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _ort_info():
    import numpy
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "numpy": numpy.__version__, "providers": ort.get_available_providers()}


def fingerprint():
    """What a result was measured on: CPU, features, cores, runtime versions (also the cache key of its tables)."""
    return {k: v for k, v in {**cpu_info(), **_ort_info()}.items() if k not in ("load_avg", "ram_bytes")}


def _session(path: str, threads: int, provider: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
    return ort.InferenceSession(path, sess_options=options, providers=providers)


def best_seconds(call, repeats: int) -> float:
    """Fastest of `repeats` calls after one warm-up: the least disturbed by other processes."""
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_ms(gemm_model: str, shapes, threads: int, repeats: int = 5):
    """{"MxKxN": fastest ms} of ONNX Runtime's fp32 MatMul (the shipped one-node model) at each shape."""
    import numpy as np

    sess = _session(gemm_model, threads, "CPUExecutionProvider")
    rng = np.random.default_rng(0)
    out = {}
    for m, k, n in shapes:
        feeds = {"A": rng.standard_normal((m, k), dtype=np.float32), "B": rng.standard_normal((k, n), dtype=np.float32)}
        out[f"{m}x{k}x{n}"] = best_seconds(lambda: sess.run(None, feeds), repeats) * 1e3
    return out


def copy_gbps(nbytes: int, repeats: int = 5) -> float:
    """Stream-like copy bandwidth: (read + write bytes) / fastest np.copyto of an array beyond the caches."""
    import numpy as np

    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    return 2 * src.nbytes / best_seconds(lambda: np.copyto(dst, src), repeats) / 1e9


def probe(request, cache: str):
    """The board's CPU, features, RAM, OS, Python, ONNX Runtime, and its measured fp32 peak and bandwidth."""
    model, threads = _cached(cache, request["gemm_model"]), int(request.get("threads", 0))
    sizes = [int(s) for s in request.get("peak_sizes", (512, 1024))]
    timed = gemm_ms(model, [(s, s, s) for s in sizes], threads)
    peak = max(2 * s ** 3 / timed["%dx%dx%d" % (s, s, s)] / 1e6 for s in sizes)
    table = gemm_ms(model, [tuple(s) for s in request.get("shapes", [])], threads)
    return {**cpu_info(), **_ort_info(), "fp32_gflops": peak, "mem_gbps": copy_gbps(int(request.get("copy_bytes", 64 << 20))),
            "gemm_ms": table, "threads": int(request.get("threads", 0))}


def _load_feeds(path: str):
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def memory(model: str, feeds_path: str, calls: int, threads: int, provider: str):
    """Resident memory of one model's inference in this fresh process (the `memory` subcommand)."""
    import numpy  # noqa: F401  (imported before the baseline, as a bare ORT script has it)
    import onnxruntime  # noqa: F401

    feeds = _load_feeds(feeds_path)
    baseline = _rss_bytes("VmRSS")
    sess = _session(model, threads, provider)
    loaded = _rss_bytes("VmRSS")
    for _ in range(calls):
        sess.run(None, feeds)
    options = sess.get_session_options()
    return {"baseline_rss_bytes": baseline, "loaded_rss_bytes": loaded, "peak_rss_bytes": _rss_bytes("VmHWM"),
            "runs": calls, "method": "VmHWM of a fresh child process (its whole life)",
            "runtime": {"runtime": "onnxruntime", "provider": provider, "threads": threads,
                        "cpu_mem_arena": options.enable_cpu_mem_arena, "mem_pattern": options.enable_mem_pattern}}


_CHILDREN = []
_DONE = threading.Event()  # the answer is written: a closing stdin is then no longer a cancel


def _how_it_died(code: int, stderr: str) -> str:
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else "signal %d" % -code
        cause = {"SIGKILL": " (the usual cause: the kernel's out-of-memory killer)"}.get(name, "")
        how = "was killed by %s%s" % (name, cause)
    else:
        how = "exited with status %d" % code
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    return how + ("; its last words: " + last[:300] if last else "")


def _memory_child(model: str, feeds_path: str, calls: int, threads: int, provider: str):
    command = [sys.executable, "-I", os.path.abspath(__file__), "memory", model, feeds_path, str(calls), str(threads),
               provider]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _CHILDREN.append(proc)
    try:
        out, err = proc.communicate(timeout=MEMORY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"crashed": "the memory child ran past %d s and was stopped" % MEMORY_TIMEOUT_S}
    finally:
        _CHILDREN.remove(proc)
    if proc.returncode != 0:
        return {"crashed": "the memory child " + _how_it_died(proc.returncode, err)}
    return json.loads(out)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached(cache: str, name: str) -> str:
    """A file of the cache by its plain name (`<sha256>.onnx`): never a path the request could aim elsewhere."""
    if os.path.basename(name) != name or name.startswith("."):
        raise ValueError("not a plain cache file name: %r" % name)
    return os.path.join(cache, name)


def measure(request, cache: str, folder: str):
    """Each model's memory in a fresh child, then all models timed interleaved (one batch's feeds each)."""
    threads, provider = int(request["threads"]), request["provider"]
    warmup, iters, rounds = int(request["warmup"]), int(request["iters"]), int(request["rounds"])
    models = [_cached(cache, m) for m in request["models"]]
    hashes = [_sha256(m) for m in models]
    feeds_paths = [os.path.join(folder, "feeds-%d.npz" % i) for i in range(len(models))]
    mem = [_memory_child(m, f, int(request.get("memory_calls", 3)), threads, provider) if request.get("memory", True)
           else None for m, f in zip(models, feeds_paths)]
    machine = {"machine": fingerprint(), "load_avg": cpu_info()["load_avg"], "sha256": hashes, "memory": mem}
    if any(m and "crashed" in m for m in mem):  # what killed a fresh child would kill the runner too: not timed
        return {**machine, "timings": None}
    sessions = [_session(m, threads, provider) for m in models]
    feeds = [_load_feeds(f) for f in feeds_paths]
    calls = [(lambda s=s, f=f: s.run(None, f)) for s, f in zip(sessions, feeds)]
    times = interleaved_times(calls, warmup, iters, rounds)
    batches = [int(next(iter(f.values())).shape[0]) if f and next(iter(f.values())).ndim else 1 for f in feeds]
    return {**machine, "timings": [summarize(t, b, warmup) for t, b in zip(times, batches)]}


def _watch_stdin(folder: str) -> None:
    """Stop everything when the local side goes away (stdin reaches end of file)."""
    def watch():
        while sys.stdin.buffer.read(65536):
            pass
        if _DONE.is_set():
            return
        for child in list(_CHILDREN):
            child.kill()
        shutil.rmtree(folder, ignore_errors=True)
        os._exit(130)

    threading.Thread(target=watch, daemon=True).start()


def _read_request(folder: str):
    """The JSON header line, then the announced payload files (written into `folder`)."""
    header = json.loads(sys.stdin.buffer.readline())
    for i, size in enumerate(header.get("payload", [])):
        data = sys.stdin.buffer.read(int(size))
        if len(data) != int(size):
            raise EOFError("the request ended before its payload did")
        with open(os.path.join(folder, "feeds-%d.npz" % i), "wb") as f:
            f.write(data)
    return header


def _clean_stale(cache: str) -> None:
    """Remove the temporary folders of runs that were killed (older than a day)."""
    for name in os.listdir(cache) if os.path.isdir(cache) else ():
        path = os.path.join(cache, name)
        if name.startswith("run-") and time.time() - os.path.getmtime(path) > 86400:
            shutil.rmtree(path, ignore_errors=True)


def main(argv) -> int:
    if argv[:1] == ["memory"]:
        model, feeds, calls, threads, provider = argv[1:6]
        print(json.dumps(memory(model, feeds, int(calls), int(threads), provider)))
        return 0
    cache = os.path.dirname(os.path.abspath(__file__))
    _clean_stale(cache)
    folder = tempfile.mkdtemp(prefix="run-", dir=cache)
    try:
        request = _read_request(folder)
        _watch_stdin(folder)
        try:
            import numpy  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            out = {"error": "MissingDependencyError", "message": "%s on the device: pip install numpy onnxruntime" % exc}
        else:
            missing = [n for n in request.get("models", []) + [request.get("gemm_model")]
                       if n and not os.path.isfile(_cached(cache, n))]
            task = {"probe": lambda: probe(request, cache), "gemm": lambda: {"gemm_ms": gemm_ms(
                _cached(cache, request["gemm_model"]), [tuple(s) for s in request["shapes"]], int(request["threads"]))},
                    "measure": lambda: measure(request, cache, folder)}.get(argv[0] if argv else "")
            if missing:  # removed from the cache since the local side looked: it copies them and asks again
                out = {"error": "CacheMiss", "message": "not in the cache: %s" % " ".join(missing), "names": missing}
            else:
                out = task() if task else {"error": "ConfigError", "message": "unknown runner command %r" % argv[:1]}
    except Exception as exc:  # reported to the local side as one line; the runner never prompts or hangs
        out = {"error": "RunnerError", "message": "%s: %s" % (type(exc).__name__, " ".join(str(exc).split()))}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    out["runner_version"] = VERSION
    _DONE.set()
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
