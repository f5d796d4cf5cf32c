"""Where an ONNX model's time goes: kernel time per op type from ONNX Runtime's own profiler.

ORT's profiler (`SessionOptions.enable_profiling`) writes one trace event per executed node with its
kernel duration; summing them by op type after a warm-up run gives the share of each op type in the
model's kernel time. `gemm_fraction` is the part low-rank factorization can shrink (m in the Amdahl
bound (1 - m) + m * f for a FLOPs ratio f of the GEMMs).
"""
from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Mapping

import numpy as np

from edgeslim.errors import ConfigError, SourceError

# ONNX Runtime CPU op types that are matrix products (after its graph fusions).
GEMM_OPS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm", "MatMulInteger", "QGemm", "MatMulIntegerToFloat",
            "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulNBits")


def op_breakdown(onnx_path: str | Path, feeds: Mapping[str, np.ndarray], iters: int = 5, threads: int = 2,
                 warmup: int = 1) -> dict[str, float]:
    """Fraction of ORT CPU kernel time per op type, largest first, over `iters` runs after `warmup`.

    Args:
        onnx_path: the model file.
        feeds: one set of inputs (numpy arrays by input name).
        iters: profiled runs; warmup: runs before them, left out of the sums.
        threads: intra-op threads, as in the target profile.

    Raises:
        ConfigError: iters < 1 or warmup < 0.
        SourceError: ONNX Runtime cannot load the file.
    """
    import onnxruntime as ort

    if iters < 1 or warmup < 0:
        raise ConfigError(f"op_breakdown needs iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    with tempfile.TemporaryDirectory(prefix="edgeslim_ortprof_") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        try:
            sess = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT's own pybind error classes
            raise SourceError(f"ONNX Runtime cannot load {onnx_path}: {str(exc).strip().splitlines()[0]}") from exc
        for _ in range(warmup + iters):
            sess.run(None, dict(feeds))
        events = json.loads(Path(sess.end_profiling()).read_text())
    return _by_op_type(events, skip_runs=warmup)


def _by_op_type(events: list[dict], skip_runs: int) -> dict[str, float]:
    """Sum node kernel times by op type, leaving out the nodes of the first `skip_runs` model runs."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session"
                  and e.get("name") == "model_run")
    start = runs[skip_runs][0] if skip_runs < len(runs) else float("inf")
    total: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            total[e.get("args", {}).get("op_name", "?")] += e["dur"]
    whole = sum(total.values())
    if whole <= 0:
        return {}
    return dict(sorted(((k, v / whole) for k, v in total.items()), key=lambda kv: -kv[1]))


def gemm_fraction(breakdown: Mapping[str, float]) -> float:
    """Share of kernel time in matrix products (the part low-rank factorization shrinks)."""
    return float(sum(v for k, v in breakdown.items() if k in GEMM_OPS))


def amdahl_bound(gemm_share: float, flops_ratio: float) -> float:
    """Best latency ratio when only the GEMMs shrink by `flops_ratio`: (1 - m) + m * f."""
    return (1.0 - gemm_share) + gemm_share * flops_ratio
