"""Lossless rewrites of a QDQ graph that let ONNX Runtime's fast INT8 convolution take a QLinearConv.

ORT runs a QLinearConv with symmetric int8 weights through MLAS's indirect "ConvSym" kernel (NHWC, VNNI/AMX
or AVX2 dot products over input channels) only when the conv has at least 16 output channels, a multiple of
the kernel's output-channel block (16 on x86), and input channels in multiples of 4 (MlasConvSymPackWSize);
any other shape falls back to an im2col GEMM that was several times slower per multiply-add. Measured with
ORT's profiler on the shipped ESPCN x3 at 1080p (Intel Xeon with AMX-INT8, 2 threads): its last conv (32 ->
9 channels) took 40 ms as a QLinearConv against 25 ms for the fp32 one and 7-12 ms once padded to 16; its
stem (1 input channel, 5 x 5) 30-34 ms, 26-28 ms with the input padded to 4 channels, 11 ms as below.

- `pad_output_channels`: a quantized Conv that feeds the graph output (alone or through a DepthToSpace)
  gets zero filters up to the next multiple of 16 output channels, and a Slice on its uint8 output keeps
  the first ones: the same values, bit for bit.
- `shift_columns`: a quantized Conv on one input channel (or two, below) reads kw copies of its input, each shifted by one
  column (uint8 Pad, Slice, Concat; padded with the input's zero point, i.e. 0.0, as the Conv pads), with a
  kh x 1 kernel: W'[o, j, :, 0] = W[o, 0, :, j]; copies up to a multiple of 4 channels get zero weights.
  Every output is the same sum of the same integer products, so the result is exact too.
- `split_input_planes`: a quantized Conv on one channel of a graph input quantized on a grid (an image's
  1/255 steps) reads two uint8 planes instead, c = the input rounded down to the grid and f = the rest on a
  16x finer grid (0..16), with the fp32 weights / 16 on the second plane (int8, the first plane's scales):
  an input already on the grid (an app's 8-bit pixels) has f = 0 and is read exactly as before, and one that
  is not (the luma of an RGB image, BT.601: 16 + (65.481 R + 128.553 G + 24.966 B) / 255) is read to 1/16
  of a step instead of half a step. Measured on the shipped ESPCN x3 (held-out photos): rounding its luma
  input to the 1/255 grid alone costs 0.010 dB.
"""
from __future__ import annotations

from typing import Any

import numpy as np

CHANNEL_BLOCK = 16  # MLAS ConvSym's output-channel block on x86 (AVX2, AVX-512, VNNI)
INPUT_BLOCK = 4  # ConvSym reads input channels four at a time
MAX_SHIFTED = 2  # shift_columns: input channels (one image plane, or two from split_input_planes; measured there)
FINE_STEPS = 16  # split_input_planes: steps of the input's grid the second plane resolves
_END = np.iinfo(np.int64).max


def _graph_maps(model) -> tuple[dict[str, Any], dict[str, list[Any]], dict[str, Any]]:
    producer = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return producer, users, {i.name: i for i in model.graph.initializer}


def _attr(node, name: str, default):
    from onnx import helper
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _set(model, inits: dict[str, Any], name: str, value: np.ndarray) -> None:
    """Replace initializer `name` (and forget its recorded shape: NNCF records its initializers' shapes)."""
    from onnx import numpy_helper
    inits[name].CopyFrom(numpy_helper.from_array(value, name))
    _forget_shapes(model, {name})


def _add(model, name: str, value: np.ndarray) -> str:
    from onnx import numpy_helper
    model.graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _forget_shapes(model, names: set[str]) -> None:
    """Drop the recorded shapes (value_info) of tensors a rewrite widened; shape inference finds the new ones."""
    for info in [v for v in model.graph.value_info if v.name in names]:
        model.graph.value_info.remove(info)


def _quantized_conv(conv, producer, inits) -> Any | None:
    """The weight DequantizeLinear of a plain quantized Conv (int8 weights, zero points 0, group 1, a bias
    initializer or none), else None."""
    from onnx import numpy_helper
    if conv.op_type != "Conv" or _attr(conv, "group", 1) != 1 or _attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    dq = producer.get(conv.input[1]) if len(conv.input) > 1 else None
    if dq is None or dq.op_type != "DequantizeLinear" or not all(i in inits for i in dq.input if i):
        return None
    if len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits:
        return None
    q = numpy_helper.to_array(inits[dq.input[0]])
    zp = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else np.zeros(1, np.int8)
    return dq if q.dtype == np.int8 and not zp.any() and _attr(dq, "axis", 1) == 0 else None


def _output_quantizer(conv, users, outputs) -> Any | None:
    """The QuantizeLinear that alone reads `conv`'s output when what it writes reaches the graph output only
    (through DequantizeLinear, or DepthToSpace then DequantizeLinear)."""
    readers = users.get(conv.output[0], [])
    if len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
        return None
    q = readers[0]
    after = users.get(q.output[0], [])
    if len(after) == 1 and after[0].op_type == "DepthToSpace":
        after = users.get(after[0].output[0], [])
    ok = len(after) == 1 and after[0].op_type == "DequantizeLinear" and after[0].output[0] in outputs
    return q if ok else None


def pad_output_channels(model) -> list[str]:
    """Pad the output channels of each quantized Conv that feeds the graph output to a multiple of
    CHANNEL_BLOCK (zero filters, sliced off its uint8 output), in place; returns the Convs' names."""
    from onnx import helper, numpy_helper
    producer, users, inits = _graph_maps(model)
    outputs = {o.name for o in model.graph.output}
    done = []
    for conv in list(model.graph.node):
        dq = _quantized_conv(conv, producer, inits)
        q = _output_quantizer(conv, users, outputs) if dq is not None else None
        if q is None:
            continue
        weight = numpy_helper.to_array(inits[dq.input[0]])
        count = weight.shape[0]
        padded = -(-count // CHANNEL_BLOCK) * CHANNEL_BLOCK
        if padded == count:
            continue
        fills = [(dq.input[0], 0), (dq.input[1], 1.0)]
        fills += [(name, 0) for name in (dq.input[2:3] + conv.input[2:3]) if name]
        for name, fill in fills:
            value = numpy_helper.to_array(inits[name])
            if value.ndim:  # per-channel (a scalar scale or zero point holds for every channel)
                extra = np.full((padded - count,) + value.shape[1:], fill, value.dtype)
                _set(model, inits, name, np.concatenate([value, extra]))
        sliced, wide = q.output[0], f"{q.output[0]}_kernel_padded"
        q.output[0] = wide
        args = [_add(model, f"{wide}_{k}", np.array([v], np.int64)) for k, v in (("start", 0), ("end", count),
                                                                                 ("axis", 1))]
        at = list(model.graph.node).index(q) + 1
        model.graph.node.insert(at, helper.make_node("Slice", [wide, *args], [sliced], name=f"{conv.name}_channels"))
        _forget_shapes(model, {conv.output[0], dq.output[0]})
        done.append(conv.name)
    return done


def shift_columns(model) -> list[str]:
    """Rewrite each quantized Conv on one or two input channels (stride any, dilation 1, kernel wider than 1)
    whose input is a DequantizeLinear read by it alone as a kh x 1 Conv on its input's column shifts, in place;
    returns the Convs' names."""
    from onnx import helper, numpy_helper
    producer, users, inits = _graph_maps(model)
    done = []
    for conv in list(model.graph.node):
        dq = _quantized_conv(conv, producer, inits)
        x_dq = producer.get(conv.input[0]) if dq is not None else None
        if x_dq is None or x_dq.op_type != "DequantizeLinear" or len(users.get(x_dq.output[0], [])) != 1 \
                or len(x_dq.input) < 3 or x_dq.input[2] not in inits or any(d != 1 for d in _attr(conv, "dilations", [1])):
            continue
        weight = numpy_helper.to_array(inits[dq.input[0]])
        if weight.ndim != 4 or weight.shape[1] > MAX_SHIFTED or weight.shape[3] < 2:
            continue
        out_ch, chans, kh, kw = weight.shape
        top, left, bottom, right = _attr(conv, "pads", [0, 0, 0, 0])
        copies = next(n for n in range(kw, kw + INPUT_BLOCK) if n * chans % INPUT_BLOCK == 0)
        shifted = np.zeros((out_ch, copies * chans, kh, 1), np.int8)  # channel j * chans + c: W[:, c, :, j]
        shifted[:, :kw * chans, :, 0] = weight.transpose(0, 3, 1, 2).reshape(out_ch, kw * chans, kh)
        _set(model, inits, dq.input[0], shifted)
        base = f"{conv.name}_columns"
        src = x_dq.input[0]
        pads = _add(model, f"{base}_pads", np.array([0, 0, 0, left, 0, 0, 0, right], np.int64))
        axis = _add(model, f"{base}_axis", np.array([3], np.int64))
        nodes = [helper.make_node("Pad", [src, pads, x_dq.input[2]], [f"{base}_padded"], name=f"{base}_pad")]
        parts = []
        for j in list(range(kw)) + [0] * (copies - kw):  # the extra copies meet zero weights
            start = _add(model, f"{base}_start{len(parts)}", np.array([j], np.int64))
            end = _add(model, f"{base}_end{len(parts)}", np.array([j - kw + 1 if j < kw - 1 else _END], np.int64))
            parts.append(f"{base}_{len(parts)}")
            nodes.append(helper.make_node("Slice", [f"{base}_padded", start, end, axis], [parts[-1]],
                                          name=f"{base}_slice{len(parts) - 1}"))
        nodes.append(helper.make_node("Concat", parts, [base], axis=1, name=f"{base}_concat"))
        x_dq.input[0] = base
        at = list(model.graph.node).index(x_dq)
        for k, node in enumerate(nodes):
            model.graph.node.insert(at + k, node)
        for a in conv.attribute:
            if a.name == "kernel_shape":
                a.ints[:] = [kh, 1]
            elif a.name == "pads":
                a.ints[:] = [top, 0, bottom, 0]
        _forget_shapes(model, {x_dq.output[0], dq.output[0]})
        done.append(conv.name)
    return done


def split_input_planes(model, fp32) -> list[str]:
    """Read each quantized one-channel Conv on a graph input as two planes (the grid value and the rest,
    FINE_STEPS finer), in place, on NNCF's QDQ graph (its weight scales those of `fp32`'s weights: before a
    rewrite such as the tanh table rescales them); the second plane's weights are `fp32`'s / FINE_STEPS.
    Returns the Convs' names."""
    from onnx import helper, numpy_helper
    producer, users, inits = _graph_maps(model)
    inputs = {i.name for i in model.graph.input}
    fp32_weights = {n.name: n.input[1] for n in fp32.graph.node if n.op_type == "Conv"}
    fp32_inits = {i.name: i for i in fp32.graph.initializer}
    done = []
    for conv in list(model.graph.node):
        dq = _quantized_conv(conv, producer, inits)
        x_dq = producer.get(conv.input[0]) if dq is not None else None
        q = producer.get(x_dq.input[0]) if x_dq is not None and x_dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in inputs or len(q.input) < 3 \
                or len(users.get(q.output[0], [])) != 1 or len(users.get(x_dq.output[0], [])) != 1 \
                or fp32_weights.get(conv.name) not in fp32_inits:
            continue
        weight, scale = (numpy_helper.to_array(inits[n]) for n in dq.input[:2])
        step = float(numpy_helper.to_array(inits[q.input[1]]))
        if weight.ndim != 4 or weight.shape[1] != 1 or numpy_helper.to_array(inits[q.input[2]]).any() \
                or numpy_helper.to_array(inits[q.input[2]]).dtype != np.uint8:
            continue
        exact = numpy_helper.to_array(fp32_inits[fp32_weights[conv.name]]).astype(np.float64)
        fine = np.clip(np.round(exact / (FINE_STEPS * scale.reshape(-1, 1, 1, 1))), -127, 127).astype(np.int8)
        _set(model, inits, dq.input[0], np.concatenate([weight, fine], axis=1))
        base, x = f"{conv.name}_planes", q.input[0]
        lower = _add(model, f"{base}_lower_by", np.array(step * (0.5 - 0.5 / FINE_STEPS), np.float32))
        fine_scale = _add(model, f"{base}_fine_scale", np.array(step / FINE_STEPS, np.float32))
        coarse = q.output[0]
        # x lowered by just under half a step, rounded: x on the grid stays itself (rest 0), x between two grid
        # values goes to the lower one unless within 1/32 step of the upper (rest -1/32 step: 0 on the fine grid)
        q.input[0] = f"{base}_lowered"
        nodes = [helper.make_node("Sub", [x, lower], [f"{base}_lowered"], name=f"{base}_lower"),
                 helper.make_node("DequantizeLinear", [coarse, q.input[1], q.input[2]], [f"{base}_coarse"],
                                  name=f"{base}_coarse"),
                 helper.make_node("Sub", [x, f"{base}_coarse"], [f"{base}_rest"], name=f"{base}_rest"),
                 helper.make_node("QuantizeLinear", [f"{base}_rest", fine_scale, q.input[2]], [f"{base}_fine"],
                                  name=f"{base}_fine"),
                 helper.make_node("Concat", [coarse, f"{base}_fine"], [base], axis=1, name=f"{base}_concat")]
        x_dq.input[0] = base
        at = list(model.graph.node).index(q)
        model.graph.node.insert(at, nodes[0])
        at = list(model.graph.node).index(x_dq)
        for k, node in enumerate(nodes[1:]):
            model.graph.node.insert(at + k, node)
        _forget_shapes(model, {x_dq.output[0], dq.output[0]})
        done.append(conv.name)
    return done
