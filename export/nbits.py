"""Weight-only INT4/INT8 in the ONNX file: MatMuls lowered to ONNX Runtime's `MatMulNBits` (com.microsoft).

An exported graph holds each quantized weight as the fp32 matrix its integers define (compress/
weight_quant.py `dequantized`). This pass finds every MatMul whose constant right-hand side is one of
those matrices (transposed, [K, N], matched by its bytes, so a name the exporter chose does not
matter) and replaces it by MatMulNBits with the integers themselves: B uint8 [N, K / block,
block * bits / 8] (4-bit values packed two per byte, low nibble first), scales fp32 [N * K / block],
zero points uint8 (4-bit: packed per row, low nibble first), the artifact's group size as the block
(a per-channel scale is repeated over power-of-two blocks that divide K). A float minimum per block
(wq int4_min, GGUF's Q4_1 grid: w = d * q + m) is not a zero point MatMulNBits computes fast (a float
zero_points input makes ORT dequantize B on every call), so an integer zero point takes the bulk of
the minimum and the rest (`offset`, int8 in the file) is added after it: y = MatMulNBits(x) +
blocksum(x) @ offset^T, blocksum(x) [..., K / block] the sum of x over each block (x @ a 0/1 block
indicator), offset^T fp32 once ONNX Runtime has folded its constants.
An 8-bit embedding table (per row, NNCF's choice for the embedding an LM head is tied to, or per
block, int4_min's Q8_0) becomes a Gather of the same integers times their scales, minus their zero
points (the MatMulNBits tensors reshaped): the file keeps one copy of the table.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeslim.core.onnx_io import OFFSET_BLOCK

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class QuantizedMatrix:
    """One weight [N, K] as w = scale * (q - zero) (+ offset) per block of K / G inputs, and the fp32 matrix
    that is."""

    name: str
    dense: np.ndarray  # float32 [N, K]: exactly what the exported graph holds (transposed) for this weight
    q: np.ndarray  # uint8 [N, K]
    scale: np.ndarray  # float32 [N, G]
    zero: np.ndarray  # uint8 [N, G]
    bits: int
    offset: np.ndarray | None = None  # float32 [N, G]: + offset per block (a float minimum, int4_min)
    offset_q: np.ndarray | None = None  # uint8 [N, G]: offset = offset_scale * (offset_q - 128), with an offset
    offset_scale: np.ndarray | None = None  # float32 [N, ceil(G / OFFSET_BLOCK)]


@dataclass
class Lowering:
    """What `lower_matmul_nbits` did."""

    matmuls: int = 0
    gathers: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    unmatched: list[str] = field(default_factory=list)  # quantized weights the graph does not use as a MatMul constant


def _key(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest() + str(array.shape)


MAX_BLOCK = 128  # ORT's blockwise kernels take blocks of 16..128 (an 8-bit block of 512 came out wrong at level 0)


def block_size(group: int) -> int | None:
    """The MatMulNBits block for a group of `group` inputs: the largest power of two in 16..MAX_BLOCK
    dividing it (the group itself when it is one; else its scale repeated over the blocks), else None."""
    best = None
    b = 16
    while b <= min(group, MAX_BLOCK):
        if group % b == 0:
            best = b
        b *= 2
    return best


def _pack4(values: np.ndarray) -> np.ndarray:
    """uint8 values < 16 along the last axis, two per byte, low nibble first (an odd count padded with 0)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), np.uint8)], -1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def nbits_tensors(m: QuantizedMatrix) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """(B, scales, zero points, block) of `m` in MatMulNBits' layout, or None when no block fits K."""
    n, k = m.q.shape
    groups = m.scale.shape[1]
    block = block_size(k // groups)
    if block is None:
        return None
    repeat = (k // groups) // block
    blocks = k // block
    scale = np.repeat(m.scale.astype(np.float32), repeat, axis=1)  # [N, blocks]
    zero = np.repeat(m.zero.astype(np.uint8), repeat, axis=1)
    q = m.q.reshape(n, blocks, block).astype(np.uint8)
    if m.bits == 4:
        return _pack4(q), scale.reshape(-1), _pack4(zero).reshape(-1), block
    return q, scale.reshape(-1), zero.reshape(-1), block


def lower_matmul_nbits(path: str | Path, matrices: Sequence[QuantizedMatrix], accuracy_level: int = 0) -> Lowering:
    """Rewrite the ONNX file at `path` in place (see the module docstring).

    Args:
        accuracy_level: MatMulNBits' compute type (0: fp32 as the dequantized weights; 4: int8
            activations, faster on CPUs with VNNI, not bit-exact).
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    by_t = {_key(m.dense.T): m for m in matrices}  # a MatMul's right-hand side is W^T [K, N]
    by_w = {_key(m.dense): m for m in matrices}  # an embedding table, or a Transpose's input, is W [N, K]
    shape_of = {name: tuple(i.dims) for name, i in inits.items()}
    wanted_t = {tuple(m.dense.T.shape) for m in matrices}
    wanted_w = {tuple(m.dense.shape) for m in matrices}
    report = Lowering()
    used: dict[str, tuple[str, QuantizedMatrix, int]] = {}  # matrix name -> (B initializer, matrix, block)
    new_nodes, new_inits = [], []
    sums: dict[tuple[str, int, int], str] = {}  # (input, K, blocks) -> its block sums, shared by the MatMuls reading it

    def integers(m: QuantizedMatrix) -> tuple[str, int] | None:
        if m.name in used:
            return used[m.name][0], used[m.name][2]
        packed = nbits_tensors(m)
        if packed is None:
            return None
        b, scale, zero, block = packed
        stem = m.name.replace(".", "_")
        for suffix, value in (("_q", b), ("_scales", scale), ("_zp", zero)):
            new_inits.append(numpy_helper.from_array(value, stem + suffix))
        used[m.name] = (stem + "_q", m, block)
        report.bytes_after += b.nbytes + scale.nbytes + zero.nbytes
        return stem + "_q", block

    # W^T as Transpose(W) where W is shared (a tied LM head and its embedding): not folded by the exporter
    transposed = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits
                  and [list(a.ints) for a in n.attribute if a.name == "perm"] in ([[1, 0]], [])
                  and shape_of[n.input[0]] in wanted_w}
    dropped: set[str] = set()
    nodes = list(graph.node)
    matched = {}  # index of a MatMul in `nodes` -> its quantized weight, for the MatMuls that lower
    for index, node in enumerate(nodes):
        rhs = node.input[1] if len(node.input) > 1 else None
        m = None
        if node.op_type == "MatMul" and rhs in transposed:
            m = by_w.get(_key(numpy_helper.to_array(inits[transposed[rhs]])))
            rhs = transposed[rhs] if m is not None else rhs
        elif node.op_type == "MatMul" and rhs in inits and shape_of[rhs] in wanted_t:
            m = by_t.get(_key(numpy_helper.to_array(inits[rhs])))
        if m is not None and block_size(m.q.shape[1] // m.scale.shape[1]) is not None:
            matched[index] = m
            dropped.add(rhs)
    tables = {_key(numpy_helper.to_array(inits[n.input[0]])) for n in graph.node if n.op_type == "Gather"
              and n.input[0] in inits and shape_of[n.input[0]] in wanted_w}
    groups = _shared_input_groups(nodes, matched, {m.name for m in matrices if _key(m.dense) in tables})
    for index, node in enumerate(nodes):
        if index in matched:
            group = groups.get(index)
            if group is None:  # a later member of a group: lowered with its first
                continue
            members = [matched[i] for i in group]
            group = [nodes[i] for i in group]
            m = members[0] if len(members) == 1 else _concatenated(members)
            q_name, block = integers(m)
            stem = m.name.replace(".", "_")
            n, k = m.q.shape
            whole = group[0].output[0] if len(group) == 1 else f"{stem}_out"
            out = whole if m.offset is None else f"{whole}_nbits"
            new_nodes.append(helper.make_node(
                "MatMulNBits", [node.input[0], q_name, stem + "_scales", stem + "_zp"], [out],
                name=node.name or f"{stem}_matmulnbits", domain=MS_DOMAIN, K=k, N=n, bits=m.bits,
                block_size=block, accuracy_level=accuracy_level))
            if m.offset is not None:
                new_nodes += _offset_nodes(m, node.input[0], out, whole, stem, new_inits, sums)
                report.bytes_after += m.offset_q.size + m.offset_scale.size * 4
            if len(group) > 1:
                new_inits.append(numpy_helper.from_array(np.array([x.q.shape[0] for x in members], np.int64),
                                                         f"{stem}_split"))
                new_nodes.append(helper.make_node("Split", [whole, f"{stem}_split"], [g.output[0] for g in group],
                                                  name=f"{stem}_split", axis=-1))
            report.matmuls += len(group)
            continue
        if node.op_type == "Gather" and node.input[0] in inits and shape_of[node.input[0]] in wanted_w:
            m = by_w.get(_key(numpy_helper.to_array(inits[node.input[0]])))
            got = integers(m) if m is not None and m.bits == 8 and m.offset is None else None
            if got is not None:
                new_nodes += _gather_nodes(m, got[0], got[1], node.input[1], node.output[0], new_inits)
                report.gathers += 1
                dropped.add(node.input[0])
                continue
        new_nodes.append(node)
    new_nodes = _offsets_into_residuals(new_nodes, {o.name for o in graph.output})
    live = {i for node in new_nodes for i in node.input} | {o.name for o in graph.output}
    new_nodes = [n for n in new_nodes if n.op_type != "Transpose" or n.output[0] in live]  # W^T no longer read
    still_used = {i for node in new_nodes for i in node.input}
    for name in dropped - still_used:
        report.bytes_before += int(np.prod(shape_of[name])) * 4
    keep = [i for i in graph.initializer if i.name not in dropped or i.name in still_used]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    if report.matmuls and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    report.unmatched = sorted(set(m.name for m in matrices) - set(used) - {m.name for m in matched.values()})
    onnx.save(model, str(path))
    return report


def _shared_input_groups(nodes: list, matched: dict[int, QuantizedMatrix], alone: set[str]) -> dict[int, list[int]]:
    """First node's index -> the MatMuls (indices in `nodes`) lowered as one MatMulNBits (its N the sum of theirs, then a Split): those
    reading the same input with the same bits, block and minimum form (q, k and v; gate and up), fewer
    kernels per token. A weight an embedding Gather reads too (`alone`) keeps its own."""
    by_key: dict[tuple, list[int]] = {}
    for index, m in sorted(matched.items()):
        key = (nodes[index].input[0], m.bits, m.q.shape[1], m.scale.shape[1], m.offset is None) \
            if m.name not in alone else (index,)
        by_key.setdefault(key, []).append(index)
    return {group[0]: group for group in by_key.values()}


def _concatenated(members: list[QuantizedMatrix]) -> QuantizedMatrix:
    """The weights of `members` stacked along N (their outputs side by side)."""
    def cat(field: str):
        return np.concatenate([getattr(m, field) for m in members], axis=0)
    offset = () if members[0].offset is None else (cat("offset"), cat("offset_q"), cat("offset_scale"))
    return QuantizedMatrix(f"{members[0].name}.merged", cat("dense"), cat("q"), cat("scale"), cat("zero"),
                           members[0].bits, *offset)


def _offset_nodes(m: QuantizedMatrix, x: str, partial: str, out: str, stem: str, new_inits: list,
                  sums: dict[tuple[str, int, int], str]) -> list:
    """out = partial + blocksum(x) @ offset^T (sum_k x_k * offset_block(k)). blocksum(x) [batch, sequence, G] sums
    x [batch, sequence, K] over each block: ReduceSum over a [batch, sequence, G, K / G] view, one per input (q, k
    and v read the same x; a 0/1 indicator MatMul, the previous form, cost ~4x as much per call). The offsets stay
    int8 in the file (block_quant.offset_grid: q [G' / OFFSET_BLOCK, OFFSET_BLOCK, N] with G' = G padded to whole
    OFFSET_BLOCKs and one scale per OFFSET_BLOCK blocks and output); offset^T = Slice(Reshape(Cast(q) * scale)),
    constants ONNX Runtime folds when it loads the file, so a call runs one fp32 MatMul of [.., G] by [G, N] (an
    8-bit MatMulNBits over the block sums took ~15% of a 512-token prefill in ORT's profiler)."""
    import onnx
    from onnx import helper, numpy_helper
    n, k = m.q.shape
    groups = m.offset.shape[1]
    blocks = m.offset_scale.shape[1]
    padded = blocks * OFFSET_BLOCK
    nodes = []
    key = (x, k, groups)
    if key not in sums:
        view = f"block_view_{groups}x{k // groups}"
        names = {i.name for i in new_inits}
        for name, value in ((view, [0, 0, groups, k // groups]), ("block_sum_axis", [-1])):
            if name not in names:
                new_inits.append(numpy_helper.from_array(np.array(value, np.int64), name))
        sums[key] = f"{out}_blocksum"
        nodes += [helper.make_node("Reshape", [x, view], [f"{out}_blocks"], name=f"{stem}_blocks"),
                  helper.make_node("ReduceSum", [f"{out}_blocks", "block_sum_axis"], [sums[key]], name=f"{stem}_blocksum",
                                   keepdims=0)]
    q = np.zeros((n, padded), np.int8)
    q[:, :groups] = (m.offset_q.astype(np.int16) - 128).astype(np.int8)
    for suffix, value in (("_offset_q", q.T.reshape(blocks, OFFSET_BLOCK, n)),
                          ("_offset_scales", m.offset_scale.T.reshape(blocks, 1, n).astype(np.float32)),
                          ("_offset_shape", np.array([padded, n], np.int64)),
                          ("_offset_rows_kept", np.array([groups], np.int64)),
                          ("_offset_axis", np.array([0], np.int64))):
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(value), stem + suffix))
    return nodes + [
        helper.make_node("Cast", [f"{stem}_offset_q"], [f"{stem}_offset_qf"], name=f"{stem}_offset_cast",
                         to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", [f"{stem}_offset_qf", f"{stem}_offset_scales"], [f"{stem}_offset_t3"],
                         name=f"{stem}_offset_scale"),
        helper.make_node("Reshape", [f"{stem}_offset_t3", f"{stem}_offset_shape"], [f"{stem}_offset_padded"],
                         name=f"{stem}_offset_rows"),
        helper.make_node("Slice", [f"{stem}_offset_padded", f"{stem}_offset_axis", f"{stem}_offset_rows_kept",
                                   f"{stem}_offset_axis"], [f"{stem}_offset_t"], name=f"{stem}_offset_groups"),
        helper.make_node("MatMul", [sums[key], f"{stem}_offset_t"], [f"{out}_off"], name=f"{stem}_offset"),
        helper.make_node("Add", [partial, f"{out}_off"], [out], name=f"{stem}_add_offset")]


def _offsets_into_residuals(nodes: list, outputs: set[str]) -> list:
    """An offset Add (MatMulNBits + offset) whose sum only a residual Add reads becomes one Sum of the three
    (o_proj and down_proj: h + W x + offset, one kernel fewer per product and token)."""
    from onnx import helper
    readers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    merged: dict[int, object] = {}
    gone: set[int] = set()
    for node in nodes:
        if node.op_type != "Add" or not node.name.endswith("_add_offset") or node.output[0] in outputs:
            continue
        after = readers.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type != "Add" or id(after[0]) in merged or len(after[0].input) != 2:
            continue
        other = next(i for i in after[0].input if i != node.output[0]) if after[0].input[0] != after[0].input[1] else None
        if other is None:
            continue
        merged[id(after[0])] = helper.make_node("Sum", [other, *node.input], list(after[0].output),
                                                name=f"{node.name}_residual")
        gone.add(id(node))
    return [merged.get(id(n), n) for n in nodes if id(n) not in gone]


def _gather_nodes(m: QuantizedMatrix, q_name: str, block: int, ids: str, out: str, new_inits: list) -> list:
    """An 8-bit embedding table gathered from the MatMulNBits integers of the same weight (B, scales, zero
    points reshaped, not copied): rows of q, minus their zero point, times their scale, per block."""
    import onnx
    from onnx import helper, numpy_helper
    n, k = m.q.shape
    blocks = k // block
    stem = m.name.replace(".", "_")
    for suffix, value in (("table_shape", [n, k]), ("block_shape", [n, blocks, 1]), ("row_blocks", [blocks, block]),
                          ("row_width", [k])):
        new_inits.append(numpy_helper.from_array(np.array(value, np.int64), f"{stem}_{suffix}"))
    return [
        helper.make_node("Reshape", [q_name, f"{stem}_table_shape"], [f"{stem}_table"], name=f"{stem}_table_view"),
        helper.make_node("Reshape", [f"{stem}_scales", f"{stem}_block_shape"], [f"{stem}_scale3"], name=f"{stem}_scale_view"),
        helper.make_node("Reshape", [f"{stem}_zp", f"{stem}_block_shape"], [f"{stem}_zp3"], name=f"{stem}_zp_view"),
        helper.make_node("Gather", [f"{stem}_table", ids], [f"{out}_q"], name=f"{stem}_gather_q", axis=0),
        helper.make_node("Cast", [f"{out}_q"], [f"{out}_qf"], name=f"{stem}_cast", to=onnx.TensorProto.FLOAT),
        helper.make_node("Shape", [ids], [f"{out}_lead"], name=f"{stem}_lead"),
        helper.make_node("Concat", [f"{out}_lead", f"{stem}_row_blocks"], [f"{out}_bshape"], name=f"{stem}_bshape", axis=0),
        helper.make_node("Concat", [f"{out}_lead", f"{stem}_row_width"], [f"{out}_shape"], name=f"{stem}_shape", axis=0),
        helper.make_node("Reshape", [f"{out}_qf", f"{out}_bshape"], [f"{out}_qb"], name=f"{stem}_qblocks"),
        helper.make_node("Gather", [f"{stem}_zp3", ids], [f"{out}_zq"], name=f"{stem}_gather_z", axis=0),
        helper.make_node("Cast", [f"{out}_zq"], [f"{out}_z"], name=f"{stem}_cast_z", to=onnx.TensorProto.FLOAT),
        helper.make_node("Gather", [f"{stem}_scale3", ids], [f"{out}_s"], name=f"{stem}_gather_s", axis=0),
        helper.make_node("Sub", [f"{out}_qb", f"{out}_z"], [f"{out}_c"], name=f"{stem}_sub"),
        helper.make_node("Mul", [f"{out}_c", f"{out}_s"], [f"{out}_w"], name=f"{stem}_mul"),
        helper.make_node("Reshape", [f"{out}_w", f"{out}_shape"], [out], name=f"{stem}_rows"),
    ]
