"""Limits measured on the machine at hand: fp32 (and INT8) GEMM peak, memory bandwidth, GEMM timings.

A profile's `peak_gflops` / `mem_gbps` are published figures for a board; on the machine at hand a
roofline against another CPU's numbers is meaningless (109-118% "of the roofline" when the figure
came from a slower CPU). For a local CPU target the profiler instead measures, once per machine:
- fp32 GEMM peak: best GFLOP/s of ONNX Runtime's MatMul (the profile's runtime and thread count) on
  a few large square products;
- INT8 GEMM peak: ORT's MatMulInteger, only where the CPU has VNNI or AMX INT8 instructions;
- memory bandwidth: a stream-like copy (Copy kernel of McCalpin's STREAM, 1995) of an array far
  larger than the caches, counting read + write bytes.
The results live in one JSON cache under ~/.cache/edgeslim (EDGESLIM_CACHE_DIR overrides), keyed by
the CPU (model name, family/model/stepping, a digest of its flags), the runtime version and the thread
count. The same cache holds GEMM-shape timings (`gemm_ms`), the `Measure` a latency budget reads
through CompressContext. A figure is kept only when it was taken on a quiet machine (1-minute load
under QUIET_LOAD per CPU, before and after): one taken under load serves the command that measured it
and is then forgotten. A GEMM table is checked when read: a shape slower than one with more work by
more than the noise is measured again (the smaller time kept).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeslim.runtime.device_runner import best_seconds, copy_gbps
from edgeslim.runtime.machine import _cpuinfo, cpu_signature
from edgeslim.runtime.targets import Profile

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
QUIET_LOAD = 0.75  # 1-minute load per logical CPU under which a measurement may be kept (1.5 on 2 cores)
NOISE = 1.5  # a GEMM slower than one with at least its work by more than this factor is measured again
_GEMM_SIZES = (1024, 2048)  # square fp32 products tried for the peak; the best GFLOP/s is kept
_COPY_BYTES = 256 << 20  # 256 MiB source array: far beyond any L3


def cache_path() -> Path:
    """The JSON file holding every measured limit and GEMM timing of this user."""
    root = os.environ.get("EDGESLIM_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "edgeslim") / "peak.json"


def _read_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(data: dict) -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".peak-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def machine_key(threads: int) -> str:
    """Cache key: the CPU (runtime/machine.cpu_signature), ONNX Runtime version and intra-op threads (0 = the
    runtime's default)."""
    import onnxruntime as ort

    return f"{cpu_signature()}|onnxruntime-{ort.__version__}|threads={threads}"


def load_now() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def quiet(load: float | None = None) -> bool:
    """Whether the machine is quiet enough for a measurement to be kept (see QUIET_LOAD)."""
    return (load_now() if load is None else load) < QUIET_LOAD * (os.cpu_count() or 1)


def matmul_model(m: int | str, k: int | str, n: int | str, int8: bool = False):
    """A one-node ONNX MatMul (fp32) or MatMulInteger (u8 x s8) of (m x k) @ (k x n); a str dim is left free."""
    from onnx import TensorProto, helper

    elem = TensorProto.UINT8 if int8 else TensorProto.FLOAT
    b_elem = TensorProto.INT8 if int8 else TensorProto.FLOAT
    out = TensorProto.INT32 if int8 else TensorProto.FLOAT
    node = helper.make_node("MatMulInteger" if int8 else "MatMul", ["A", "B"], ["Y"])
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("A", elem, [m, k]),
                                               helper.make_tensor_value_info("B", b_elem, [k, n])],
                              [helper.make_tensor_value_info("Y", out, [m, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _matmul_session(m: int, k: int, n: int, threads: int, int8: bool = False):
    import onnxruntime as ort

    model = matmul_model(m, k, n, int8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    sess = ort.InferenceSession(model.SerializeToString(),
                                sess_options=opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    if int8:
        feeds = {"A": rng.integers(0, 255, (m, k), dtype=np.uint8), "B": rng.integers(-127, 127, (k, n), dtype=np.int8)}
    else:
        feeds = {"A": rng.standard_normal((m, k), dtype=np.float32), "B": rng.standard_normal((k, n), dtype=np.float32)}
    return sess, feeds


def time_gemm_ms(m: int, k: int, n: int, threads: int, repeats: int = 5, int8: bool = False) -> float:
    """Fastest latency (ms) of one ORT (m x k) @ (k x n) product, fp32 MatMul or INT8 MatMulInteger."""
    sess, feeds = _matmul_session(m, k, n, threads, int8)
    return best_seconds(lambda: sess.run(None, feeds), repeats) * 1e3


def copy_bandwidth_gbps(nbytes: int = _COPY_BYTES, repeats: int = 5) -> float:
    """Stream-like copy bandwidth in GB/s, measured as a board's runner measures its own."""
    return copy_gbps(nbytes, repeats)


@dataclass(frozen=True)
class Peak:
    """Limits of one machine for one runtime/thread count, and where they came from."""

    fp32_gflops: float
    int8_gops: float | None  # None where the CPU has no VNNI/AMX INT8 (or the target is remote)
    mem_gbps: float
    source: str  # "measured on <key>" or "published (profile <name>)"
    simd_lanes_fp32: int | None  # fp32 lanes of this CPU's widest vector unit; None for a remote board
    measured_at: str | None = None  # UTC time of the measurement (None: published figures)
    load_avg: float | None = None  # the 1-minute load it was taken under (the larger of before and after)
    kept: bool | None = None  # whether it was cached (taken on a quiet machine); None: published

    def to_dict(self) -> dict:
        return asdict(self)

    def gflops(self, precision: str) -> float:
        """Peak compute for a profile precision (int8 falls back to fp32 where no INT8 peak is known)."""
        return self.int8_gops if precision == "int8" and self.int8_gops else self.fp32_gflops


def is_local(profile: Profile) -> bool:
    """True when the profile runs on this machine's CPU (its limits can be measured here)."""
    return profile.device == "cpu" and profile.runtime in ("onnxruntime", "torch") and not profile.remote \
        and profile.address is None


def _measure_peak(threads: int) -> dict:
    flags = _cpuinfo()[1]
    before = load_now()
    fp32 = max(2 * s ** 3 / time_gemm_ms(s, s, s, threads) / 1e6 for s in _GEMM_SIZES)
    int8 = None
    if any(f in flags for f in VNNI_FLAGS):
        int8 = max(2 * s ** 3 / time_gemm_ms(s, s, s, threads, int8=True) / 1e6 for s in _GEMM_SIZES)
    return {"fp32_gflops": fp32, "int8_gops": int8, "mem_gbps": copy_bandwidth_gbps(),
            "load_avg": [max(before, load_now())], "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _contended(entry: dict) -> bool:
    """Whether a cached peak was measured on a machine busier than a quiet one (caches written before the
    quiet rule): such a figure is too low (a roofline fraction over 100% follows), so it is measured again."""
    return not quiet((entry.get("load_avg") or [0.0])[0])


_UNDER_LOAD: dict[str, dict] = {}  # figures measured under load in this process: used, never written
_GEMM_UNDER_LOAD: dict[str, dict[str, float]] = {}  # the same for GEMM times, by machine key and shape


def measured_peak(profile: Profile, refresh: bool = False) -> Peak:
    """The limits a roofline on `profile` should use: measured once per machine for a local CPU target
    (cached when measured on a quiet machine; `refresh` measures again, as does a cached figure taken
    under load; a new measurement never lowers a cached one), the profile's published figures otherwise."""
    from edgeslim.runtime.machine import simd_width_fp32

    if not is_local(profile):
        return Peak(profile.peak_gflops, profile.peak_gflops if profile.precision == "int8" else None,
                    profile.mem_gbps, f"published (profile {profile.name})", None)
    key = machine_key(profile.threads)
    cache = _read_cache()
    entry = cache.get("peak", {}).get(key)
    kept = True
    if key in _UNDER_LOAD and not refresh and (entry is None or _contended(entry)):
        entry, kept = _UNDER_LOAD[key], False  # this process measured it under load already
    elif entry is None or refresh or _contended(entry):
        new = _measure_peak(profile.threads)
        for k in ("fp32_gflops", "int8_gops", "mem_gbps"):  # a peak is a maximum: contention only lowers one
            before = (entry or {}).get(k)
            if before is not None and (new[k] is None or before > new[k]):
                new[k] = before
        entry, kept = new, quiet(new["load_avg"][0])
        if kept:
            cache.setdefault("peak", {})[key] = entry
            _write_cache(cache)
        else:
            _UNDER_LOAD[key] = entry
    where = f"measured on {key}" + ("" if kept else f" under load {entry['load_avg'][0]:.2f} (not kept)")
    return Peak(entry["fp32_gflops"], entry["int8_gops"], entry["mem_gbps"], where, simd_width_fp32(),
                entry.get("measured_at"), entry["load_avg"][0], kept)


def machine_align(profile: Profile) -> int:
    """The shape multiple for `profile`: a local CPU target follows this CPU's fp32 SIMD width (AVX2: 8,
    AVX-512: 16, NEON: 4), where the profile's fixed `align` was written for some other CPU; a board or
    GPU keeps the profile's own."""
    from edgeslim.runtime.machine import simd_width_fp32

    return simd_width_fp32() if is_local(profile) and profile.device == "cpu" else profile.align


def cached_gemm(key: str) -> dict[str, float]:
    """The GEMM timings cached under `key` ({"MxKxN": ms}; empty when none)."""
    return dict(_read_cache().get("gemm", {}).get(key, {}))


def cached_limits() -> list[dict]:
    """What the cache holds, one row per machine key: its peak (when and under what load it was measured)
    and the number of GEMM shapes timed (`edgeslim cache list`)."""
    data = _read_cache()
    rows = {}
    for key, e in data.get("peak", {}).items():
        rows[key] = {"machine": key, "peak_measured_at": e.get("measured_at"),
                     "peak_load_avg": (e.get("load_avg") or [None])[0], "fp32_gflops": e.get("fp32_gflops"),
                     "int8_gops": e.get("int8_gops"), "mem_gbps": e.get("mem_gbps"), "gemm_shapes": 0}
    for key, table in data.get("gemm", {}).items():
        rows.setdefault(key, {"machine": key, "peak_measured_at": None})["gemm_shapes"] = len(table)
    return list(rows.values())


def clear_limits() -> bool:
    """Forget every measured peak and GEMM timing (the next use measures again); whether there was a cache."""
    path = cache_path()
    existed = path.is_file()
    path.unlink(missing_ok=True)
    return existed


def store_gemm(key: str, table: dict[str, float]) -> None:
    """Keep `table` as the GEMM timings of `key` (a board's, measured there)."""
    cache = _read_cache()
    cache.setdefault("gemm", {})[key] = table
    _write_cache(cache)


def inconsistent(table: dict[str, float]) -> list[str]:
    """Shapes of `table` ({"MxKxN": ms}) slower than some shape of at least their work by more than NOISE:
    time grows with the work, so one of the two was timed while something else ran."""
    def work(shape: str) -> int:
        m, k, n = (int(x) for x in shape.split("x"))
        return m * k * n

    ordered = sorted(table, key=work, reverse=True)
    out, fastest = [], float("inf")  # the fastest time among shapes of at least this work
    for shape in ordered:
        if table[shape] > NOISE * fastest:
            out.append(shape)
        fastest = min(fastest, table[shape])
    return out


class GemmTable:
    """`Measure` (compress/base.py) for a local CPU target: ORT GEMM latency per shape, timed once per
    machine and kept in the same cache as the peak (see the module docstring: quiet, checked)."""

    def __init__(self, threads: int = 0, repeats: int = 5) -> None:
        self.threads, self.repeats = threads, repeats
        self.key = machine_key(threads)
        self._under_load = _GEMM_UNDER_LOAD.setdefault(self.key, {})  # timed under load: this process, never written
        self._checked = False
        self._known: dict[str, float] = {}  # shapes this object has read or timed quietly: the file is not read again

    def _time(self, shape: str) -> tuple[float, bool]:
        m, k, n = (int(x) for x in shape.split("x"))
        before = load_now()
        ms = time_gemm_ms(m, k, n, self.threads, self.repeats)
        return ms, quiet(max(before, load_now()))

    def _check(self, cache: dict) -> None:
        """Measure again the shapes the cached table contradicts (once per table object); keep the smaller."""
        self._checked = True
        table = cache.get("gemm", {}).get(self.key, {})
        changed = False
        for shape in inconsistent(table):
            ms, calm = self._time(shape)
            if calm and ms < table[shape]:
                table[shape], changed = ms, True
            elif calm:
                continue
            else:
                self._under_load[shape] = min(ms, table[shape])
        if changed:
            _write_cache(cache)

    def gemm_ms(self, m: int, k: int, n: int) -> float:
        """Latency in ms of an (m x k) @ (k x n) fp32 product on this machine (cached when timed quietly)."""
        shape = f"{int(m)}x{int(k)}x{int(n)}"
        if shape in self._known:
            return self._known[shape]
        cache = _read_cache()
        if not self._checked:
            self._check(cache)
        if shape in self._under_load:
            return self._under_load[shape]
        table = cache.setdefault("gemm", {}).setdefault(self.key, {})
        if shape not in table:
            ms, calm = self._time(shape)
            if not calm:
                self._under_load[shape] = ms
                return ms
            table[shape] = ms
            _write_cache(cache)
        self._known[shape] = float(table[shape])
        return self._known[shape]
