"""Dynamic INT8 (compress/quantize.py's `activations = "dynamic"`): int8 weights per output channel,
activations quantized at run time from each input's own range.

ONNX Runtime's `quantize_dynamic` writes the graph: every MatMul with a constant weight becomes
DynamicQuantizeLinear (uint8 scale and zero point from the input's min/max, per call) + MatMulInteger
on the int8 weight + the rescale; a BERT encoder's self-attention is first fused as DynamicQuantizeLinear +
QAttention on the same int8 weights (int8_attention.py). Nothing depends on calibration data, so the record holds settings
only and replay is the same call on the exported graph. Only MatMuls are quantized: embeddings
(Gather) stay fp32 (measured on MiniLM, BBC News: sentence cosine 0.9949 to fp32 against 0.9944 with
ORT's default that quantizes them too, for no kernel time), and so do Convs (ConvInteger is slower
than ORT's fp32 Conv). On a CPU whose u8 x s8 dot product saturates (AVX2 without VNNI) the weights
are 7-bit (`reduce_range`), as the static path's overflow fix does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edgeslim.compress.base import LayerChange
from edgeslim.compress.int8_record import initializer_arrays, node_scope
from edgeslim.core.errors import SourceError

OP_TYPES = ("MatMul",)  # what the dynamic mode quantizes


def dynamic_record(overflow_fix: str, ignored: Sequence[str]) -> dict[str, Any]:
    """The settings a dynamic quantization is replayed from (no data: weights only)."""
    import onnxruntime
    return {"op_types": list(OP_TYPES), "per_channel": True, "reduce_range": overflow_fix != "disable",
            "ignored": list(ignored), "fused_attention": True, "onnxruntime_version": onnxruntime.__version__}


def check_dynamic(record: Any, where: str) -> None:
    """SourceError unless `record` is settings `quantize_dynamic` accepts (a manifest is not trusted)."""
    if not isinstance(record, Mapping) or set(record.get("op_types", ())) - set(OP_TYPES) or \
            not all(isinstance(record.get(k), bool) for k in ("per_channel", "reduce_range")) or \
            not isinstance(record.get("fused_attention", False), bool) or \
            not all(isinstance(n, str) for n in record.get("ignored", ())):
        raise SourceError(f"{where}: INT8 dynamic record is not op_types {list(OP_TYPES)}, per_channel, reduce_range "
                          "fused_attention and ignored node names")


def quantize_dynamic_graph(record: Mapping[str, Any], onnx_in: Path, onnx_out: Path) -> None:
    """Write the dynamic-INT8 graph of `onnx_in` to `onnx_out` as `record` says (`fused_attention`: each exported
    self-attention as QAttention first, int8_attention.py; with 8-bit weights only, as QAttention's u8 x s8
    product has no 7-bit variant; a record without it, written before, replays unfused)."""
    import logging
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgeslim.compress.int8_attention import fuse_attention

    def advice(entry: logging.LogRecord) -> bool:  # ORT advises its pre-processing; export has cleaned the graph
        return "pre-processing before quantization" not in entry.getMessage()

    root = logging.getLogger()
    root.addFilter(advice)
    tmp = tempfile.TemporaryDirectory(prefix="edgeslim-attention-")
    try:
        if record.get("fused_attention") and not record["reduce_range"]:
            model = onnx.load(str(onnx_in))
            if fuse_attention(model, quantize=True, skip=set(record.get("ignored", ()))):
                onnx_in = Path(tmp.name) / "fused.onnx"
                onnx.save(model, str(onnx_in))
        quantize_dynamic(str(onnx_in), str(onnx_out), op_types_to_quantize=list(record["op_types"]),
                         per_channel=record["per_channel"], reduce_range=record["reduce_range"],
                         weight_type=QuantType.QInt8, nodes_to_exclude=list(record.get("ignored", ())),
                         extra_options={"MatMulConstBOnly": True})
    finally:
        root.removeFilter(advice)
        tmp.cleanup()


def weight_error(w: np.ndarray, reduce_range: bool) -> float:
    """Relative error ||W - dq(q(W))|| / ||W|| of symmetric int8 per output column (the last axis of a
    MatMul weight), 7-bit when `reduce_range`."""
    qmax = 63 if reduce_range else 127
    scale = np.maximum(np.abs(w).max(axis=0, keepdims=True), 1e-30) / qmax
    return float(np.linalg.norm(np.round(w / scale) * scale - w) / max(np.linalg.norm(w), 1e-30))


def dynamic_rows(fp32, record: Mapping[str, Any]) -> list[LayerChange]:
    """One row per Conv/MatMul/Gemm: quantized (its weight's int8 error; MatMulInteger, or QAttention where the
    record fuses its attention) or kept fp32, and why."""
    from edgeslim.compress.int8_attention import fusable
    inits, ignored = initializer_arrays(fp32), set(record.get("ignored", ()))
    fused = {n for c in fusable(fp32, ignored)[0] for n in c["names"]} \
        if record.get("fused_attention") and not record["reduce_range"] else set()
    rows = []
    for node in fp32.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            continue
        weight = inits.get(node.input[1]) if len(node.input) > 1 else None
        params = int(sum(inits[x].size for x in node.input[1:] if x in inits))
        kind = f"{node.op_type} ({node.name})"
        why = ("a node the config ignores" if node.name in ignored else "no constant weight" if weight is None
               else f"{node.op_type} is not quantized in dynamic mode" if node.op_type not in record["op_types"] else "")
        if why:
            rows.append(LayerChange(node_scope(node), kind, params, params, status="skipped", bytes_before=4 * params,
                                    bytes_after=4 * params, note=f"kept fp32: {why}"))
            continue
        err = weight_error(weight.astype(np.float64), record["reduce_range"])
        into = "QAttention (q, k, v in one)" if node.name in fused else "MatMulInteger"
        rows.append(LayerChange(node_scope(node), f"{kind} -> {into} (dynamic)", params, params,
                                status="quantized", bytes_before=4 * params, bytes_after=4 * params - 3 * weight.size,
                                rel_error=err, note="activations quantized at run time"))
    return rows
