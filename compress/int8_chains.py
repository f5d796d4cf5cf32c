"""Close the INT8 chains ONNX Runtime leaves open in an NNCF QDQ graph.

ORT's CPU provider turns a `DQ -> Conv -> Q` group into one QLinearConv (int8 in, int8 out). NNCF
quantizes the *inputs* of compute ops only, so a Conv whose output does not reach a QuantizeLinear
runs in fp32 on dequantized weights, slower than the plain fp32 graph (ORT's NCHWc layout does not
apply behind a DequantizeLinear). Two cases are closed here, from ranges calibrated once and recorded:
**Conv -> Tanh** (the shipped ESPCN): ORT has no quantized Tanh, but it has a quantized Sigmoid
  (a 256-entry lookup table, QLinearSigmoid), and tanh(z) = 2 sigmoid(2z) - 1. The Conv's weight
  scales and bias are doubled (it computes 2z), its output is quantized, Tanh becomes Sigmoid, the
  sigmoid is quantized to uint8 with scale 1/256 and zero point 0, and the next DequantizeLinear
  reads that same byte q as h = (q - 128) / 128 = 2 s - 1: the affine part costs nothing, and the
  next QLinearConv pads with its zero point 128, i.e. h = 0, exactly as the fp32 Conv pads tanh's 0.
  (ORT fuses the quantized Sigmoid for uint8 only.) Activations spread over all of 0..255 make the
  u8s8 kernels of CPUs without VNNI saturate their 16-bit pair sums (VPMADDUBSW; measured here as a
  3x larger error), so the Convs that read the table get 7-bit weights, ORT's own remedy
  (`reduce_range`), where NNCF has not made every weight 7-bit already (`overflow_fix`).
**Conv -> graph output** (ESPCN's last Conv, alone or before a DepthToSpace): its output is
  quantized to uint8 on its calibrated range (or an image's 1/255 grid: quantize.py decides), and a
  DepthToSpace between it and the graph output runs on the bytes (a permutation commutes with a
  per-tensor DequantizeLinear, so this is exact); measured on a ReLU ESPCN x3 at 1080p (AVX2 EPYC):
  1.15x faster than leaving the Conv in fp32, at -0.01 dB on the calibrated range and no loss at all
  on the image grid. (An earlier 4 dB loss here was the u8s8 saturation above, gone with 7-bit weights.)
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from edgeslim.compress.int8_record import activation_quantizers

SIGMOID_EDGE = float(np.log(511.0))  # beyond +-ln(511), sigmoid rounds to 0 or 255 on the 1/256 grid


def _consumers(model) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _producer(model) -> dict[str, Any]:
    return {o: n for n in model.graph.node for o in n.output}


def _has_dq_weight(conv, producer) -> bool:
    return len(conv.input) > 1 and getattr(producer.get(conv.input[1]), "op_type", None) == "DequantizeLinear"


def chain_sites(model) -> list[str]:
    """Outputs of Convs (with quantized weights and a bias) read only by a Tanh whose output is read
    only by QuantizeLinear nodes: the sites `close_chains` rewrites."""
    uses, producer = _consumers(model), _producer(model)
    sites = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 3 or not _has_dq_weight(node, producer):
            continue
        users = uses.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == "Tanh":
            after = uses.get(users[0].output[0], [])
            if after and all(u.op_type == "QuantizeLinear" for u in after):
                sites.append(node.output[0])
    return sites


def output_sites(model) -> list[str]:
    """Outputs of Convs (with quantized weights and a bias) that are a graph output, or read only by a
    DepthToSpace that is: the sites `close_outputs` quantizes."""
    uses, producer = _consumers(model), _producer(model)
    outputs = {o.name for o in model.graph.output}
    sites = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 3 or not _has_dq_weight(node, producer):
            continue
        z, users = node.output[0], uses.get(node.output[0], [])
        if (z in outputs and not users) or (z not in outputs and len(users) == 1 and users[0].op_type == "DepthToSpace"
                                            and users[0].output[0] in outputs and not uses.get(users[0].output[0])):
            sites.append(z)
    return sites


def output_ranges(values: Mapping[str, Sequence[np.ndarray]]) -> dict[str, list[float]]:
    """The recorded part: per output site the calibrated range of the Conv output."""
    return {name: [min(float(a.min()) for a in arrays), max(float(a.max()) for a in arrays)]
            for name, arrays in values.items()}


def close_outputs(model, sites: Mapping[str, Sequence]) -> None:
    """Quantize the recorded Conv outputs (`output_ranges`) of the QDQ `model` in place; a DepthToSpace
    after one moves before its DequantizeLinear (exact: it only moves elements).

    Raises:
        KeyError: a recorded site is not such a Conv output of this graph (the caller names the file).
    """
    present = set(output_sites(model))
    for z, (lo, hi) in sites.items():
        if z not in present:
            raise KeyError(z)
        conv = _producer(model)[z]
        _quantize_output(model, conv, *uint8_grid(lo, hi))
        if z in {o.name for o in model.graph.output}:  # the Conv's output is the graph's: the DQ writes it now
            dq = _producer(model)[f"chain_dq_{z}"]
            conv.output[0], dq.output[0] = f"chain_conv_{z}", z
            _consumers(model)[z][0].input[0] = f"chain_conv_{z}"
        users = _consumers(model).get(f"chain_dq_{z}", [])
        if users and users[0].op_type == "DepthToSpace":
            d2s, dq = users[0], _producer(model)[f"chain_dq_{z}"]
            out = d2s.output[0]
            d2s.input[0], d2s.output[0] = f"chain_q_{z}", f"chain_d2s_{z}"
            dq.input[0], dq.output[0] = f"chain_d2s_{z}", out
            model.graph.node.remove(dq)
            model.graph.node.insert(list(model.graph.node).index(d2s) + 1, dq)


def uint8_grid(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric uint8 scale and integer zero point for the range [lo, hi] (0 included)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max(hi - lo, 1e-8) / 255.0
    return scale, int(np.clip(round(-lo / scale), 0, 255))


TABLE_SAMPLES = 100_000  # calibration values of 2z a table range is fitted on (a fixed random subset)
TABLE_SHRINK = np.linspace(0.3, 1.0, 15)  # candidate fractions of the calibrated low and high ends


def table_error(t: np.ndarray, lo: float, hi: float) -> float:
    """Mean squared error of the tanh chain on values t = 2z, with the table input on the uint8 grid of
    [lo, hi]: tanh(t / 2) against (round(256 sigmoid(t^)) - 128) / 128, t^ = t rounded and clipped."""
    scale, zp = uint8_grid(lo, hi)
    q = np.clip(np.round(t / scale) + zp, 0, 255)
    s = 1.0 / (1.0 + np.exp(-(q - zp) * scale))
    h = (np.clip(np.round(s * 256), 0, 255) - 128) / 128
    return float(np.mean((h - np.tanh(t / 2)) ** 2))


def table_range(t: np.ndarray, lo: float, hi: float) -> list[float]:
    """The input range of a tanh table with the least `table_error` on t = 2z, each end a fraction
    (`TABLE_SHRINK`) of the calibrated [lo, hi]: tanh is flat far from 0, so a step finer near 0 is worth
    clipping the rare large |2z| (measured on the shipped espcn-x3: its second table's error 2.8x lower
    at 0.45 and 0.5 of the calibrated ends; 0.24 -> 0.12 dB lost on the held-out photos)."""
    if t.size > TABLE_SAMPLES:
        t = t[np.random.default_rng(0).choice(t.size, TABLE_SAMPLES, replace=False)]
    _, f, g = min((table_error(t, lo * f, hi * g), f, g) for f in TABLE_SHRINK for g in TABLE_SHRINK)
    return [float(lo * f), float(hi * g)]


def site_ranges(values: Mapping[str, Sequence[np.ndarray]]) -> dict[str, list[float]]:
    """The recorded part: per site the range of 2z (z: the Conv output) the table reads, clipped to where
    the sigmoid table still changes and fitted to the calibration values (`table_range`)."""
    out = {}
    for name, (lo, hi) in output_ranges(values).items():
        t = 2.0 * np.concatenate([np.asarray(a, np.float64).ravel() for a in values[name]])
        out[name] = table_range(t, max(2 * lo, -SIGMOID_EDGE), min(2 * hi, SIGMOID_EDGE))
    return out


def _init(model, name: str, value: np.ndarray) -> str:
    from onnx import numpy_helper
    model.graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _scale_init(model, name: str, factor: float) -> None:
    from onnx import numpy_helper
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            value = numpy_helper.to_array(init)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array((value * factor).astype(value.dtype), name))
            return
    raise KeyError(name)


def _quantize_output(model, conv, scale: float, zero_point: int) -> None:
    """Insert Q -> DQ (uint8) on `conv`'s output; its consumers read the DQ output."""
    from onnx import helper
    z = conv.output[0]
    s = _init(model, f"chain_scale_{z}", np.array(scale, np.float32))
    zp = _init(model, f"chain_zero_point_{z}", np.array(zero_point, np.uint8))
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == z:
                node.input[i] = f"chain_dq_{z}"
    at = list(model.graph.node).index(conv) + 1
    model.graph.node.insert(at, helper.make_node("QuantizeLinear", [z, s, zp], [f"chain_q_{z}"], name=f"chain_q_{z}"))
    model.graph.node.insert(at + 1, helper.make_node("DequantizeLinear", [f"chain_q_{z}", s, zp], [f"chain_dq_{z}"],
                                                     name=f"chain_dq_{z}"))


def _tanh_as_sigmoid(model, conv, tanh) -> list[Any]:
    """Conv computes 2z, Tanh becomes Sigmoid, the sigmoid's quantizers write s on the 1/256 grid,
    their DequantizeLinear consumers read h = (q - 128) / 128 = 2 s - 1, and the Convs reading those
    get 7-bit weights."""
    producer, uses = _producer(model), _consumers(model)
    weight_dq = producer[conv.input[1]]
    _scale_init(model, weight_dq.input[1], 2.0)
    _scale_init(model, conv.input[2], 2.0)
    tanh.op_type, tanh.name = "Sigmoid", f"{tanh.name}_as_sigmoid"
    s_scale = _init(model, f"chain_sigmoid_scale_{tanh.output[0]}", np.array(1 / 256, np.float32))
    h_scale = _init(model, f"chain_tanh_scale_{tanh.output[0]}", np.array(1 / 128, np.float32))
    zero = _init(model, f"chain_sigmoid_zero_{tanh.output[0]}", np.array(0, np.uint8))
    mid = _init(model, f"chain_tanh_zero_{tanh.output[0]}", np.array(128, np.uint8))
    readers = []
    for q in uses[tanh.output[0]]:
        q.input[1], q.input[2] = s_scale, zero
        for dq in uses.get(q.output[0], []):
            dq.input[1], dq.input[2] = h_scale, mid
            readers += [producer[r.input[1]] for r in uses.get(dq.output[0], [])
                        if r.op_type == "Conv" and _has_dq_weight(r, producer)]
    return readers


def _seven_bit(model, weight_dq) -> None:
    """Requantize an int8 weight (DequantizeLinear of an initializer) to 7 bits: q' = round(q / 2) in
    [-64, 63], scale 2x."""
    from onnx import numpy_helper
    inits = {i.name: i for i in model.graph.initializer}
    q = numpy_helper.to_array(inits[weight_dq.input[0]]).astype(np.int32)
    inits[weight_dq.input[0]].CopyFrom(numpy_helper.from_array(np.clip(np.round(q / 2), -64, 63).astype(np.int8),
                                                                  weight_dq.input[0]))
    _scale_init(model, weight_dq.input[1], 2.0)


def close_chains(model, sites: Mapping[str, Sequence], seven_bit: bool = True) -> None:
    """Apply the recorded rewrites (`site_ranges`) to the QDQ `model` in place; `seven_bit`: requantize
    the weights of the Convs that read a table (False when every weight is 7-bit already).

    Raises:
        KeyError: a recorded site is not a Conv output of this graph (the caller names the file).
    """
    producer, uses = _producer(model), _consumers(model)
    readers = {}
    for z, (lo, hi) in sites.items():
        conv = producer.get(z)
        if conv is None or conv.op_type != "Conv" or [u.op_type for u in uses.get(z, [])] != ["Tanh"]:
            raise KeyError(z)
        readers |= {dq.name: dq for dq in _tanh_as_sigmoid(model, conv, uses[z][0])}
        _quantize_output(model, conv, *uint8_grid(lo, hi))
    for dq in readers.values() if seven_bit else ():
        _seven_bit(model, dq)


def unsigned_activations(model) -> int:
    """Make every int8 activation quantizer uint8 (zero point + 128: q' = q + 128, the same values), in
    place; returns how many zero points changed.

    ORT fuses `DQ -> Conv -> Q` into a QLinearConv only when its input and output have one type, and
    NNCF quantizes non-negative activations (after ReLU/ReLU6) to uint8 but signed ones to int8: each
    Conv between the two (EfficientNet's projection convs) ran in fp32 on dequantized weights.
    """
    import onnx
    from onnx import numpy_helper
    inits = {i.name: i for i in model.graph.initializer}
    uses = _consumers(model)
    weight_zps = {n.input[2] for n in model.graph.node
                  if n.op_type == "DequantizeLinear" and n.input[0] in inits and len(n.input) > 2}
    names = set()
    for q in model.graph.node:
        if q.op_type == "QuantizeLinear" and q.input[0] not in inits and len(q.input) > 2:
            names |= {q.input[2]} | {dq.input[2] for dq in uses.get(q.output[0], [])
                                     if dq.op_type == "DequantizeLinear" and len(dq.input) > 2}
    changed = set()
    for name in sorted(names - weight_zps):
        zp = numpy_helper.to_array(inits[name])
        if zp.dtype == np.int8:
            inits[name].CopyFrom(numpy_helper.from_array((zp.astype(np.int16) + 128).astype(np.uint8), name))
            changed.add(name)
    retyped = changed | {q.output[0] for q in model.graph.node if q.op_type == "QuantizeLinear" and q.input[2:3]
                         and q.input[2] in changed}
    for info in list(model.graph.value_info) + list(model.graph.output):  # recorded types of the int8 tensors
        if info.name in retyped:
            info.type.tensor_type.elem_type = onnx.TensorProto.UINT8
    return len(changed)


def unfused_weight_dqs(model) -> set[str]:
    """The names of `model`'s weight DequantizeLinear nodes (constant inputs) that ONNX Runtime leaves unfused:
    the DequantizeLinear nodes with constant inputs left in its optimized graph (CPU provider, extended level).
    It dequantizes those weights on every call for an fp32 op."""
    import tempfile
    from pathlib import Path

    import onnx

    from edgeslim.core.onnx_io import ort_fused_graph
    inits = {i.name for i in model.graph.initializer}
    weight_dqs = {n.name for n in model.graph.node if n.op_type == "DequantizeLinear" and n.name
                  and all(i in inits for i in n.input if i)}
    if not weight_dqs:
        return set()
    with tempfile.TemporaryDirectory(prefix="edgeslim-fold-") as tmp:
        path = Path(tmp) / "q.onnx"
        onnx.save(model, str(path), save_as_external_data=model.ByteSize() > (1 << 30))
        return weight_dqs & {n.name for n in ort_fused_graph(path).node if n.op_type == "DequantizeLinear"}


def fold_unfused_weights(model) -> list[str]:
    """Replace each weight DequantizeLinear that ONNX Runtime leaves unfused by its fp32 result, in place;
    returns the folded DQ nodes' names.

    ORT fuses `DQ(weights)` into an int8 kernel only when the data input is dequantized too (also through
    a Reshape or Transpose it moves the DQ across); where it cannot (EfficientNet-Lite0's classifier Gemm
    after the pooling), it dequantized the 1000 x 1280 weights on every call: 14% of the int8 model's
    time, measured (issue 39). ORT itself says which (unfused_weight_dqs). The values are the ones the
    DequantizeLinear computes, (q - zero point) * scale in float32, so the outputs are unchanged.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    left = unfused_weight_dqs(model)
    outputs = {o.name for o in model.graph.output}
    folded, freed = [], set()
    for dq in [n for n in model.graph.node if n.name in left]:
        if dq.output[0] in outputs:
            continue
        q, scale = numpy_helper.to_array(inits[dq.input[0]]), numpy_helper.to_array(inits[dq.input[1]])
        zp = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % max(q.ndim, 1)
        shape = [-1 if d == axis else 1 for d in range(q.ndim)] if scale.ndim else []
        value = (q.astype(np.int32) - zp.astype(np.int32).reshape(shape)).astype(np.float32) * scale.reshape(shape)
        model.graph.node.remove(dq)
        _init(model, dq.output[0], value.astype(np.float32))
        folded.append(dq.name)
        freed |= set(dq.input)
    used = {i for n in model.graph.node for i in n.input}
    for init in [i for i in model.graph.initializer if i.name in freed - used]:
        model.graph.initializer.remove(init)
    return folded


def image_input_grid(quantized, inputs: Sequence[str], activations: dict[str, Any]) -> None:
    """Put the uint8 quantizers of graph inputs on 1/255 steps over [0, 1] (in `activations`, the record): an
    image's own 8-bit values then pass exactly, where the calibrated range clips what the calibration
    patches never reached (espcn-x3: [0, 0.90])."""
    for name, node in activation_quantizers(quantized).items():
        if node.input[0] in inputs and activations[name]["dtype"] == "uint8" and np.ndim(activations[name]["scale"]) == 0:
            activations[name] |= {"scale": 1.0 / 255.0, "zero_point": 0}
