"""Where a measurement came from: CPU model, SIMD and INT8 features, cores, load, library versions.

Every benchmark JSON records `machine_info()`: the same "2 cores" has been an AMD Zen 3 (AVX2) one day
and an Intel Xeon (AVX-512, VNNI, AMX) another, so no absolute figure holds without it.
"""
from __future__ import annotations

import os
import platform
from typing import Any

# CPU flags that change which kernels a runtime picks (fp32 SIMD width, INT8 dot products, AMX tiles).
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
              "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve")
INT8_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) of this CPU, read as a board's runner reads its own (runtime/device_runner.py)."""
    from edgeslim.runtime.device_runner import cpu_model_and_flags

    return cpu_model_and_flags()


def cpu_signature() -> str:
    """The CPU as a cache key: model name, family/model/stepping (or ARM part) and a digest of all its flags,
    so two CPUs sold under one brand string ("AMD EPYC": Zen 2 with AVX2, Zen 4 with AVX-512) never share
    measured figures."""
    import hashlib

    from edgeslim.runtime.device_runner import cpu_ids

    model, flags = _cpuinfo()
    ids = "/".join(cpu_ids().values()) or "?"
    return f"{model} [{ids}] flags:{hashlib.sha256(' '.join(sorted(flags)).encode()).hexdigest()[:10]}"


def cpu_model() -> str:
    """The CPU's model name (e.g. 'AMD EPYC 7B13'), the key for per-machine caches."""
    return _cpuinfo()[0]


def simd_width_fp32() -> int:
    """fp32 lanes of the widest vector unit: 16 with AVX-512, 8 with AVX/AVX2, 4 otherwise."""
    flags = _cpuinfo()[1]
    if "avx512f" in flags:
        return 16
    if "avx2" in flags or "avx" in flags:
        return 8
    return 4


def int8_features() -> tuple[str, ...]:
    """This CPU's INT8 features (`INT8_FLAGS` it has): what decides whether 8-bit weights saturate (AVX2 alone)."""
    flags = _cpuinfo()[1]
    return tuple(f for f in INT8_FLAGS if f in flags)


def machine_info() -> dict[str, Any]:
    """JSON-ready description of this machine for a benchmark's results."""
    model, flags = _cpuinfo()
    info: dict[str, Any] = {
        "cpu_model": model,
        "arch": platform.machine(),
        "simd_flags": [f for f in SIMD_FLAGS if f in flags],
        "int8_features": list(int8_features()),
        "simd_width_fp32": simd_width_fp32(),
        "logical_cpus": os.cpu_count(),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
    }
    for lib in ("torch", "onnxruntime", "onnx", "numpy"):
        try:
            info[f"{lib}_version"] = __import__(lib).__version__
        except ImportError:
            info[f"{lib}_version"] = None
    return info


def measured_here() -> dict[str, Any]:
    """Where and when a local measurement is taken, in the form a board's rows carry (`measured_on`, `measured_at`)."""
    import time

    from edgeslim.runtime.device_runner import fingerprint

    return {"measured_on": {"address": "local", **fingerprint()},
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
