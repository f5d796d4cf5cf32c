"""Where an ONNX model's time goes: kernel time per op type from ONNX Runtime's own profiler.

ORT's profiler (`SessionOptions.enable_profiling`) writes one trace event per executed node with its
kernel duration; summing them by op type after a warm-up run gives the share of each op type in the
model's kernel time (`op_breakdown`), and, in ms per run (`op_times`), an original model's beside its
compressed one's (`op_comparison`, which names the op types whose time did not shrink).
`gemm_fraction` is the part low-rank factorization can shrink (m in the Amdahl bound
(1 - m) + m * f for a FLOPs ratio f of the GEMMs).
"""
from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Mapping

import numpy as np

from edgeslim.core.errors import ConfigError, SourceError

# ONNX Runtime CPU op types that are matrix products (after its graph fusions).
GEMM_OPS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm", "MatMulInteger", "QGemm", "MatMulIntegerToFloat",
            "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulNBits")
SHRUNK = 0.9  # an op type whose kernel time fell below this fraction of the original's shrank
MIN_SHARE = 0.02  # op types under this share of a model's kernel time are not named as unshrunk


def op_times(onnx_path: str | Path, feeds: Mapping[str, np.ndarray], iters: int = 5, threads: int = 2,
             warmup: int = 1) -> dict[str, float]:
    """ORT CPU kernel time per op type, in ms per run (mean over `iters` runs after `warmup`), largest first.

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
        raise ConfigError(f"op profiling needs iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
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
    return _kernel_ms(events, skip_runs=warmup)


def op_breakdown(onnx_path: str | Path, feeds: Mapping[str, np.ndarray], iters: int = 5, threads: int = 2,
                 warmup: int = 1) -> dict[str, float]:
    """Fraction of ORT CPU kernel time per op type, largest first (`op_times` as shares)."""
    return shares(op_times(onnx_path, feeds, iters, threads, warmup))


def op_fields(onnx_path: str | Path, feeds: Mapping[str, np.ndarray], iters: int, threads: int) -> dict[str, dict]:
    """The op-type fields of a profile row: `op_time_ms` (ms per run) and `op_time_share` (fractions)."""
    times = op_times(onnx_path, feeds, iters=max(1, min(iters, 5)), threads=threads)
    return {"op_time_ms": times, "op_time_share": shares(times)}


def shares(times: Mapping[str, float]) -> dict[str, float]:
    """Times by op type as fractions of their sum (same order); {} when nothing was timed."""
    whole = sum(times.values())
    return {k: v / whole for k, v in times.items()} if whole > 0 else {}


def _kernel_ms(events: list[dict], skip_runs: int) -> dict[str, float]:
    """Node kernel times summed by op type, in ms per run, leaving out the first `skip_runs` model runs."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session"
                  and e.get("name") == "model_run")
    start = runs[skip_runs][0] if skip_runs < len(runs) else float("inf")
    total: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            total[e.get("args", {}).get("op_name", "?")] += e["dur"]
    counted = max(1, len(runs) - skip_runs)
    return dict(sorted(((k, v / 1000 / counted) for k, v in total.items()), key=lambda kv: -kv[1]))


def op_comparison(before: Mapping[str, float], after: Mapping[str, float], min_share: float = MIN_SHARE
                  ) -> dict[str, list]:
    """Kernel time by op type of an original model (`before`, ms per run) beside its compressed one's
    (`after`), and the op types that did not shrink: "speedup or explain" names them.

    Returns:
        {"rows": per op type, largest original time first (op types new in `after` last): `op`,
        `before_ms`, `after_ms`, `ratio` (after / before; None for a new op type), `before_share`,
        `after_share`; "not_shrunk": the op types holding at least `min_share` of either model's
        kernel time whose time ratio is at least SHRUNK (or that are new)}.
    """
    share_b, share_a = shares(before), shares(after)
    order = list(before) + [k for k in after if k not in before]
    rows = [{"op": k, "before_ms": before.get(k, 0.0), "after_ms": after.get(k, 0.0),
             "ratio": after.get(k, 0.0) / before[k] if before.get(k) else None,
             "before_share": share_b.get(k, 0.0), "after_share": share_a.get(k, 0.0)} for k in order]
    stuck = [r["op"] for r in rows if max(r["before_share"], r["after_share"]) >= min_share
             and (r["ratio"] is None or r["ratio"] >= SHRUNK)]
    return {"rows": rows, "not_shrunk": stuck}


def gemm_fraction(breakdown: Mapping[str, float]) -> float:
    """Share of kernel time in matrix products (the part low-rank factorization shrinks)."""
    return float(sum(v for k, v in breakdown.items() if k in GEMM_OPS))


def amdahl_bound(gemm_share: float, flops_ratio: float) -> float:
    """Best latency ratio when only the GEMMs shrink by `flops_ratio`: (1 - m) + m * f."""
    return (1.0 - gemm_share) + gemm_share * flops_ratio


FP32_COMPUTE = ("Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm")


def fp32_compute_ops(onnx_path: str | Path) -> dict[str, str]:
    """{node name: "OpType: why"} of the Conv/MatMul/Gemm nodes ONNX Runtime still runs in fp32 once it has
    fused the Q/DQ pairs it can (its optimized graph, extended level: QLinearConv, QLinearMatMul,
    MatMulInteger are INT8): "its input is dequantized but not fused" (a Q/DQ chain ORT does not
    take, e.g. an activation between the op and its output quantizer) or "no quantizer on its input"
    (kept fp32 when compressing: ignored, reverted, or an op the quantizer leaves)."""
    from edgeslim.core.onnx_io import ort_fused_graph

    graph = ort_fused_graph(onnx_path)
    producer = {o: n.op_type for n in graph.node for o in n.output}
    out = {}
    for node in graph.node:
        if node.op_type in FP32_COMPUTE and node.domain in ("", "com.microsoft"):
            fused = producer.get(node.input[0]) == "DequantizeLinear"
            out[node.name] = f"{node.op_type}: " + ("its input is dequantized but not fused" if fused
                                                    else "no quantizer on its input")
    return out
