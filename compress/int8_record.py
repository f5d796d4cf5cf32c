"""A quantized ONNX graph as data (compress/quantize.py's INT8 step): the record of what NNCF's
calibration decided (activation scales and zero points, changed initializers, quantizers the accuracy
control dropped), putting it back on a graph without data, and reading the graph for the report
(per-quantizer errors, one row per compute op, whether an output is a conv's pixels).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from edgeslim.compress.base import LayerChange
from edgeslim.core.errors import SourceError

COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def initializer_arrays(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def activation_quantizers(model) -> dict[str, Any]:
    """QuantizeLinear nodes whose input is an activation (not a weight), by node name."""
    inits = {i.name for i in model.graph.initializer}
    return {n.name: n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


ZERO_POINT_DTYPES = ("int8", "uint8")
MIN_OPSET = 13  # per-axis QuantizeLinear
OVERFLOW_FIXES = ("enable", "first_layer", "disable")  # what a record may hold ("auto" is resolved before)


def check_record(resolved: Mapping[str, Any], where: str) -> None:
    """SourceError unless an INT8 record is one `onnx_stage` can apply: an opset ONNX knows (>= 13), and
    every activation quantizer with finite positive scales and int8/uint8 zero points in their range
    (NaN scales would export a NaN model; a dtype such as int4 or a bad value would crash the stage)."""
    import onnx

    opset = resolved.get("opset")
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= newest:
        raise SourceError(f"{where}: INT8 opset {opset!r} is not one ONNX {onnx.__version__} has "
                          f"({MIN_OPSET}..{newest})")
    fix = resolved.get("nncf", {}).get("overflow_fix", "first_layer") if isinstance(resolved.get("nncf"), Mapping) else None
    if fix not in OVERFLOW_FIXES:
        raise SourceError(f"{where}: INT8 overflow fix {fix!r} is not one of {OVERFLOW_FIXES}")
    activations = resolved.get("activations")
    if not isinstance(activations, Mapping) or not isinstance(resolved.get("changed"), Mapping):
        raise SourceError(f"{where}: INT8 record needs 'activations' and 'changed' objects")
    for key in ("tanh_table", "output_ranges"):
        for name, pair in (resolved.get(key) or {}).items():
            try:
                lo, hi = (float(v) for v in pair)
            except (TypeError, ValueError):
                raise SourceError(f"{where}: INT8 {key} of {name!r} is not a pair of numbers") from None
            if not (np.isfinite([lo, hi]).all() and lo <= hi):
                raise SourceError(f"{where}: INT8 {key} of {name!r} is [{lo}, {hi}], not a finite range")
    for name, value in resolved["changed"].items():
        try:
            finite = bool(np.isfinite(np.asarray(value, dtype=np.float64)).all())
        except (TypeError, ValueError):
            finite = False
        if not finite:
            raise SourceError(f"{where}: INT8 corrected initializer {name!r} is not finite numbers")
    for name, q in activations.items():
        try:
            dtype = q["dtype"]
            if dtype not in ZERO_POINT_DTYPES:
                raise ValueError(f"zero-point dtype {dtype!r} is not one of {ZERO_POINT_DTYPES}")
            scale, zp = np.asarray(q["scale"], dtype=np.float64), np.asarray(q["zero_point"], dtype=np.float64)
            info = np.iinfo(dtype)
            if scale.size == 0 or scale.size > 1 << 20 or scale.shape != zp.shape:
                raise ValueError(f"scale {scale.shape} and zero point {zp.shape} do not match")
            if not (np.isfinite(scale).all() and (scale > 0).all()):
                raise ValueError("scales that are not finite and positive (calibration data with NaN or inf?)")
            if not ((zp == np.round(zp)) & (zp >= info.min) & (zp <= info.max)).all():
                raise ValueError(f"zero points outside {dtype}")
        except (TypeError, ValueError, KeyError) as exc:
            raise SourceError(f"{where}: INT8 quantizer {name!r} has {exc}") from None


def record_graph(fp32, quantized, full=None) -> dict[str, Any]:
    """The data-dependent part of a quantized graph: activation scales/zero points, changed initializers,
    and (accuracy control) the quantizers of the full quantization it dropped."""
    inits, before = initializer_arrays(quantized), initializer_arrays(fp32)
    activations = {}
    for name, node in activation_quantizers(quantized).items():
        zp = inits[node.input[2]]
        activations[name] = {"scale": inits[node.input[1]].tolist(), "zero_point": zp.tolist(), "dtype": str(zp.dtype)}
    changed = {k: v.tolist() for k, v in inits.items() if k in before and not np.array_equal(v, before[k])}
    reverted = []
    if full is not None:
        kept = {n.name for n in quantized.graph.node}
        reverted = sorted(n.name for n in full.graph.node if n.op_type == "DequantizeLinear" and n.name not in kept)
    return {"activations": activations, "changed": changed, "reverted": reverted}


def set_initializer(model, name: str, value: np.ndarray) -> None:
    """Replace initializer `name` by `value`, whose dtype is kept: a zero point's int8/uint8 is part of
    the record (NNCF picks unsigned for activations that were never negative in the calibration)."""
    from onnx import numpy_helper
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            return
    raise KeyError(name)


def revert_quantizers(model, fp32, dq_names: Sequence[str]) -> None:
    """Take the named DequantizeLinear nodes out: their consumers read what the fp32 graph's same node
    read at that input again; Q/DQ nodes and initializers left unused are dropped."""
    fp32_nodes = {n.name: n for n in fp32.graph.node}
    dq_out = {n.output[0] for n in model.graph.node if n.name in set(dq_names)}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in dq_out:
                node.input[i] = fp32_nodes[node.name].input[i]
    while True:
        used = {x for n in model.graph.node for x in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    used = {x for n in model.graph.node for x in n.input}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)
    fp32_inits = {i.name: i for i in fp32.graph.initializer}
    have = {i.name for i in model.graph.initializer}
    model.graph.initializer.extend(fp32_inits[n] for n in sorted(used - have) if n in fp32_inits)


def metric(outputs: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> float:
    """Top-1 accuracy for integer class targets, else 1 - relative L2 error to the targets."""
    if all(t.dtype.kind in "iu" for t in targets):
        return float(np.mean(np.concatenate([o.argmax(-1) == t for o, t in zip(outputs, targets)])))
    err = sum(float(np.sum((o - t) ** 2)) for o, t in zip(outputs, targets))
    return 1.0 - float(np.sqrt(err / max(sum(float(np.sum(t ** 2)) for t in targets), 1e-30)))


def ort_session(model):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def probe_values(fp32, tensors: Sequence[str], batches: Sequence[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """The fp32 graph's values of `tensors` on `batches`."""
    import onnx
    probe = onnx.ModelProto()
    probe.CopyFrom(fp32)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors if t not in present)
    session = ort_session(probe)
    values: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for feeds in batches:
        for name, value in zip([o.name for o in session.get_outputs()], session.run(None, feeds)):
            if name in values:
                values[name].append(value)
    return values


def quantization_errors(fp32, record: Mapping[str, Any], quantized, batches: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """Relative error ||fq(a) - a|| / ||a|| of each activation quantizer on calibration batches."""
    nodes = activation_quantizers(quantized)
    values = probe_values(fp32, sorted({n.input[0] for n in nodes.values()}), batches[:2])
    errors = {}
    for name, node in nodes.items():
        q = record["activations"][name]
        info = np.iinfo(q["dtype"])
        lost = kept = 0.0
        for a in values[node.input[0]]:  # batch by batch: length-bucketed batches differ in shape
            a = a.astype(np.float64)
            scale, zp = np.asarray(q["scale"]), np.asarray(q["zero_point"])
            if scale.ndim:  # per-channel activation quantizer: along the node's axis (default 1)
                axis = next((x.i for x in node.attribute if x.name == "axis"), 1) % a.ndim
                shape = [1] * a.ndim
                shape[axis] = scale.size
                scale, zp = scale.reshape(shape), zp.reshape(shape)
            fq = (np.clip(np.round(a / scale) + zp, info.min, info.max) - zp) * scale
            lost, kept = lost + float(np.square(fq - a).sum()), kept + float(np.square(a).sum())
        errors[name] = float(np.sqrt(lost) / max(np.sqrt(kept), 1e-30))
    return errors


def node_scope(node) -> str:
    """The torch module a node came from (dynamo exporter metadata), else the node name."""
    import ast
    meta = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        scopes = []
    return scopes[-2] if len(scopes) >= 2 and scopes[-2] else node.name


def layer_rows(fp32, quantized, record, errors: Mapping[str, float],
               notes: Mapping[str, str] | None = None) -> list[LayerChange]:
    """One row per compute op: quantized (with the error of its input activations) or kept fp32 (with the
    op's entry of `notes` as its note, where it has one)."""
    fp32_inits = initializer_arrays(fp32)
    producer = {o: n for n in quantized.graph.node for o in n.output}
    q_of_dq = {n.output[0]: producer.get(n.input[0]) for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    rows = []
    for node in fp32.graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        weights = [fp32_inits[x] for x in node.input[1:] if x in fp32_inits]
        params = int(sum(w.size for w in weights))
        qnode = next((n for n in quantized.graph.node if n.name == node.name), None)
        dq_inputs = [x for x in (qnode.input if qnode is not None else []) if x in q_of_dq]
        act = [q_of_dq[x].name for x in dq_inputs if q_of_dq[x] is not None and q_of_dq[x].name in errors]
        kind = f"{node.op_type} ({node.name})"
        if not dq_inputs:
            rows.append(LayerChange(node_scope(node), kind, params, params, status="skipped",
                                    bytes_before=4 * params, bytes_after=4 * params,
                                    note=(notes or {}).get(node.name) or
                                    "kept fp32" + (" by accuracy control" if record["reverted"] else "")))
            continue
        main = fp32_inits.get(node.input[1]) if len(node.input) > 1 else None
        quant_bytes = 4 * params if main is None else 4 * params - 3 * main.size
        err = max((errors[a] for a in act), default=None)
        rows.append(LayerChange(node_scope(node), kind + " -> QDQ int8", params, params, status="quantized",
                                bytes_before=4 * params, bytes_after=int(quant_bytes), rel_error=err, sensitivity=err,
                                note=f"{len(act)} activation quantizer(s)"
                                + (f"; {notes[node.name]}" if notes and node.name in notes else "")))
    return rows


PASS_THROUGH = ("DepthToSpace", "Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Flatten")


def dense_output(model) -> bool:
    """True when a graph output is a Conv / ConvTranspose output, reached through layout ops only
    (a sub-pixel super-resolution net: Conv -> DepthToSpace).

    Fast bias correction is then left off by default. It estimates each layer's output shift
    (Nagel et al. 2019, Sec. 4.2, empirical form) by running the quantized layer on every channel's
    *mean* input, q(E[x]) instead of E[q(x)]: the rounding of a constant does not average out, and
    on a layer whose outputs are the pixels that systematic term is a brightness offset of every
    output pixel. Measured on the shipped espcn-x3 (held-out images, ORT): NNCF moved the last Conv's
    9 biases by +0.005..+0.009 (1.3-2.3 grey levels) and the INT8 model lost 0.36 dB against fp32;
    without the correction 0.07 dB.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    for out in model.graph.output:
        node = producer.get(out.name)
        while node is not None and node.op_type in PASS_THROUGH:
            node = producer.get(node.input[0])
        if node is not None and node.op_type in ("Conv", "ConvTranspose"):
            return True
    return False


def stem_conv(model) -> list[str]:
    """The name of the Conv that reads a graph input (pixels: at most 4 channels) directly, as a list (empty
    when there is none): a network's stem, cheap to keep in fp32, its error carried through every layer."""
    inputs = {i.name for i in model.graph.input} - {i.name for i in model.graph.initializer}
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "Conv" and n.input[0] in inputs
            and len(shapes.get(n.input[1], ())) == 4 and shapes[n.input[1]][1] <= 4][:1]
