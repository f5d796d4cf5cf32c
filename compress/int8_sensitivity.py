"""Keep the compute ops INT8 hurts most in fp32, chosen by a measured sensitivity (compress/quantize.py).

Each Conv / MatMul / Gemm that NNCF quantized is scored on the calibration batches by the output error
left when that op alone goes back to fp32 (the DequantizeLinear nodes on its inputs, activation and
weight, taken out: int8_record.revert_quantizers): the leave-one-out ranking of NNCF's accuracy control,
measured on the model's outputs against the fp32 graph's (relative L2), so it needs no labels. The ops
are then reverted in that order, the error measured again after each, while each one removes at least
`min_gain` of the all-INT8 graph's output error and the reverted ops' multiply-adds stay within `max_macs`
of the INT8 kernels' (an op that does not fit is passed over). An op's cost counts the ops whose kernels
it unfuses too: a Conv whose output quantizer only fed the reverted op runs in fp32 as well. The
reverted DequantizeLinear nodes go into the record (`reverted`), and the export replays them without data.

Last, the ops whose quantized input no INT8 kernel reads (ORT dequantizes it for an fp32 op: a CNN's Gemm
head) get their activations back in fp32 together, at no cost in time, when that lowers the output error and
unfuses no kernel; their weights too where ORT leaves the weight's DequantizeLinear unfused (it would
dequantize them on every call, and the export stores them in fp32 anyway: no cost in time or size).

Measured on EfficientNet-Lite0 (48 bundled crops, Xeon AMX): before its depthwise biases were corrected
(int8_grouped_bias.py) the first depthwise conv alone carried 41 % of the output error, and the defaults kept
three ops of the 112 x 112 stage fp32 (agreement on 192 held-out crops 0.932 -> 0.958, but batch-1 speedup
1.63x -> 1.43x: fp32 convs at 112 x 112 lose ORT's NCHWc layout, a cost their 8.6 % of the MACs understates).
With them corrected no op removes more than 2.1 % of the error: one 1x1 conv at 14 x 14 and the Gemm head
(its input, and its weight, which ORT would dequantize on every call) are kept fp32: output error 0.0636 ->
0.0619 on the calibration crops, 0.0647 -> 0.0644 on the 192 held-out ones (0.0623 and 0.0647 with the head's
weight int8). Reverting the next 8 ops of the ranking too (22 % of the MACs) leaves 0.0601: the error of
8-bit weights is spread over every layer (weights alone: 0.053). ESPCN x3's two quantized convs (88 %, 12 %
of the MACs) never fit.
"""
from __future__ import annotations

from math import prod
from typing import Any, Collection, Sequence

import numpy as np

from edgeslim.compress.int8_chains import unfused_weight_dqs
from edgeslim.compress.int8_record import (COMPUTE_OPS, activation_quantizers, initializer_arrays, ort_session,
                                           probe_values, revert_quantizers)
from edgeslim.core.errors import ConfigError
from edgeslim.core.progress import bar


def op_quantizers(quantized) -> dict[str, list[str]]:
    """The DequantizeLinear nodes that feed each quantized compute op directly, by op name."""
    dq = {n.output[0]: n.name for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    ops = {}
    for node in quantized.graph.node:
        found = [dq[x] for x in node.input if x in dq]
        if node.op_type in COMPUTE_OPS and found:
            ops[node.name] = found
    return ops


ACTIVATIONS = ("Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish")


def int8_ops(model, outputs: Collection[str] = ()) -> set[str]:
    """The compute ops ORT can run as INT8 kernels: a DequantizeLinear on their data input, and their output
    (through one activation at most, which ORT folds or runs quantized) read by QuantizeLinear nodes only,
    or one of `outputs` (the graph outputs int8_chains.close_outputs quantizes later)."""
    uses: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            uses.setdefault(name, []).append(node)
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    found = set()
    for node in model.graph.node:
        after = uses.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type in ACTIVATIONS:
            after = uses.get(after[0].output[0], [])
        closed = node.output[0] in outputs or (after and all(u.op_type == "QuantizeLinear" for u in after))
        if node.op_type in COMPUTE_OPS and node.input[0] in dq and closed:
            found.add(node.name)
    return found


def op_macs(fp32, ops: Sequence[str], feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """Multiply-adds of each named compute op of `fp32` on `feeds`: output elements times the reduction
    length (a Conv's C/groups * kernel from its weight; a MatMul / Gemm's inner dimension)."""
    nodes = {n.name: n for n in fp32.graph.node if n.name in set(ops)}
    inits = initializer_arrays(fp32)
    shapes = {k: v[0].shape for k, v in probe_values(
        fp32, sorted({t for n in nodes.values() for t in (n.input[0], n.output[0]) if t not in inits}), [feeds]).items()}
    shapes |= {k: v.shape for k, v in inits.items()}
    macs = {}
    for name, node in nodes.items():
        if node.op_type in ("Conv", "ConvTranspose"):
            k = prod(shapes[node.input[1]][1:])
        elif node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            k = shapes[node.input[0]][0]
        else:
            k = shapes[node.input[0]][-1]
        macs[name] = int(prod(shapes[node.output[0]]) * k)
    return macs


def output_error(model, batches: Sequence[dict[str, np.ndarray]], reference: Sequence[list[np.ndarray]]) -> float:
    """Relative L2 error of `model`'s outputs (all of them) to `reference` over `batches`."""
    session = ort_session(model)
    lost = kept = 0.0
    for feeds, ref in zip(batches, reference):
        for out, r in zip(session.run(None, feeds), ref):
            lost += float(np.square(out.astype(np.float64) - r).sum())
            kept += float(np.square(r.astype(np.float64)).sum())
    return float(np.sqrt(lost / max(kept, 1e-30)))


def reverted(quantized, fp32, dq_names: Sequence[str]):
    """A copy of `quantized` with the named DequantizeLinear nodes taken out."""
    import onnx
    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    revert_quantizers(model, fp32, dq_names)
    return model


def check_op_names(fp32, ops: Sequence[str], where: str) -> None:
    """ConfigError unless every name in `ops` is a node of `fp32` (the int8 step's fp32_ops)."""
    known = {n.name for n in fp32.graph.node}
    unknown = [o for o in ops if o not in known]
    if unknown:
        compute = sorted(n.name for n in fp32.graph.node if n.op_type in COMPUTE_OPS)
        raise ConfigError(f"{where}: fp32_ops {unknown[:3]} are not ops of the exported graph (ONNX node names, "
                          f"e.g. {compute[:3]})")


def keep_named(fp32, quantized, ops: Sequence[str]):
    """`quantized` with the named compute ops back in fp32 as keep_sensitive scores one op (its DequantizeLinear
    inputs taken out: `reverted`, so the record replays it without data); an op already fp32 stays so. The
    names are checked beforehand (check_op_names, before calibration)."""
    dqs = op_quantizers(quantized)
    return reverted(quantized, fp32, sorted({d for o in ops for d in dqs.get(o, ())}))


def sensitivity_notes(info: dict[str, Any]) -> dict[str, str]:
    """The layer-row note of each op keep_sensitive reverted."""
    whole = set(info.get("free_weights", ()))
    return {op: "kept fp32: ORT runs it in fp32 (no INT8 kernel reads its input), weights included" if op in whole
            else "activations kept fp32: no INT8 kernel reads them" for op in info.get("free_ops", ())} | {
        op: "kept fp32: measured sensitivity" for op in info["fp32_ops"]}


def keep_sensitive(fp32, quantized, batches: Sequence[dict[str, np.ndarray]], min_gain: float, max_macs: float,
                   outputs: Collection[str] = (), progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """The quantized graph with its most sensitive compute ops reverted to fp32, and what was measured:
    {"error_int8", "error", "fp32_ops", "free_ops" (ops with a quantized input that no INT8 kernel reads:
    their activations reverted last, all together, when that lowers the error and unfuses no kernel; their
    weights stay int8 unless ORT leaves their DequantizeLinear unfused: "free_weights"), "macs_fp32_share" (of the INT8 kernels'
    multiply-adds, the reverted ops' and those they unfuse; `outputs` as in int8_ops), "ranking": [{"op",
    "error_if_fp32", "macs"}]}."""
    fp32_session = ort_session(fp32)
    reference = [fp32_session.run(None, f) for f in batches]
    full = output_error(quantized, batches, reference)
    dqs = op_quantizers(quantized)
    macs = op_macs(fp32, list(dqs), {k: v[:1] for k, v in batches[0].items()})
    ranking = []
    with bar(f"INT8 sensitivity of {len(dqs)} ops", len(dqs), progress) as shown:
        for op, names in dqs.items():
            ranking.append((output_error(reverted(quantized, fp32, names), batches, reference), op))
            shown.advance()
    ranking.sort()
    fast = int8_ops(quantized, outputs)
    total = sum(macs[o] for o in fast)
    free = [o for o in dqs if o not in fast]
    chosen, model, error, lost = [], quantized, full, 0
    for _, op in ranking:
        if op in free:
            continue
        trial = reverted(quantized, fp32, sorted({d for o in chosen + [op] for d in dqs[o]}))
        trial_lost = sum(macs[o] for o in fast - int8_ops(trial, outputs))  # its neighbours' kernels it unfuses too
        if trial_lost > max_macs * total:
            continue
        trial_error = output_error(trial, batches, reference)
        if error - trial_error < min_gain * full:
            break
        chosen, model, error, lost = chosen + [op], trial, trial_error, trial_lost
    whole: list[str] = []
    if free:  # quantized activations no INT8 kernel reads (ORT dequantizes them for an fp32 op): fp32 at no cost
        acts = {q.output[0] for q in activation_quantizers(quantized).values()}
        of_act = {n.name for n in quantized.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in acts}
        kept = {d for o in chosen for d in dqs[o]} | {d for o in free for d in dqs[o] if d in of_act}
        # their weights stay int8 (an MPO model's core products: MatMulIntegerToFloat), unless ORT dequantizes
        # them on every call too (the export then stores them in fp32 anyway: fold_unfused_weights)
        left = unfused_weight_dqs(reverted(quantized, fp32, sorted(kept)))
        whole = [o for o in free if any(d in left for d in dqs[o])]
        trial = reverted(quantized, fp32, sorted(kept | {d for o in whole for d in dqs[o]}))
        trial_error = output_error(trial, batches, reference)
        if int8_ops(trial, outputs) == int8_ops(model, outputs) and trial_error < error:
            model, error = trial, trial_error
        else:
            free, whole = [], []
    return model, {"error_int8": full, "error": error, "fp32_ops": chosen, "free_ops": free, "free_weights": whole,
                   "macs_fp32_share": lost / max(total, 1),
                   "ranking": [{"op": op, "error_if_fp32": e, "macs": macs[op]} for e, op in ranking]}
