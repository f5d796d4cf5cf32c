"""A BERT encoder's exported self-attention as one ONNX Runtime attention node (the dynamic INT8 path).

torch's export of transformers' eager attention writes, per layer: three MatMul (+ bias Add) projections of one
input, a Reshape to [b, s, heads, d] and Transpose each (K to [b, heads, d, s]), MatMul, a scaling Mul (or Div),
the additive mask's Add, Softmax, MatMul with V, Transpose and Reshape back. ONNX Runtime's transformer
optimizer does not match it (the Reshape shapes are computed from Shape nodes, the mask is a Where on the
padding mask), so ORT runs it op by op: Transposes, FusedMatMul and Softmax were 14 % of MiniLM's INT8 time.
Here each such chain becomes com.microsoft Attention (q/k/v weights concatenated to [hidden, 3 * hidden]), or,
quantized, DynamicQuantizeLinear + QAttention: the same int8 weights per output column as quantize_dynamic
writes for the three MatMuls (symmetric, 127 steps of max |w|), so the same integer sums; ORT's kernel
then computes softmax(scale * QK^T + mask) V per head without the Transposes.

The mask is fused only when it is exact: the subgraph that makes it is run on probe padding masks, and it must
be Where(mask, 0, m) broadcast over heads and queries with one m <= -1e4 (mask_filter_value m, fed the raw
padding mask as QAttention's 2D mask_index).
"""
from __future__ import annotations

from typing import Any

import numpy as np

MS = "com.microsoft"


class _Graph:
    """Producers, reader counts and constants of an ONNX graph."""

    def __init__(self, graph) -> None:
        from onnx import numpy_helper
        self.graph = graph
        self.consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.readers: dict[str, int] = {}
        for name in [i for n in graph.node for i in n.input] + [o.name for o in graph.output]:
            self.readers[name] = self.readers.get(name, 0) + 1

    def one(self, name: str, *ops: str):
        """The node of one of `ops` making `name`, read only by the chain, else None."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type in ops and self.readers.get(name) == 1 else None

    def perm(self, name: str, perm: list[int]):
        """The Transpose by `perm` making `name`, read only by the chain, else None."""
        node = self.one(name, "Transpose")
        got = [list(a.ints) for a in node.attribute if a.name == "perm"] if node is not None else []
        return node if got == [perm] else None


def _head_size(g: _Graph, shape: str) -> int | None:
    """d of a Reshape to [b, s, heads or -1, d]: a constant shape or a Concat ending in constants."""
    if shape in g.consts:
        value = g.consts[shape].ravel()
        return int(value[3]) if value.size == 4 and value[3] > 0 else None
    concat = g.producer.get(shape)
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
        return None
    last = g.consts.get(concat.input[3])
    return int(last.ravel()[0]) if last is not None and last.size == 1 and last.ravel()[0] > 0 and \
        concat.input[2] in g.consts else None


def _merges_heads(g: _Graph, shape: str) -> bool:
    """A Reshape shape [b, s, -1] (constant or a Concat whose last entry is the constant -1)."""
    if shape in g.consts:
        return g.consts[shape].size == 3 and int(g.consts[shape].ravel()[2]) == -1
    concat = g.producer.get(shape)
    last = g.consts.get(concat.input[-1]) if concat is not None and concat.op_type == "Concat" else None
    return len(concat.input) == 3 and last is not None and last.size == 1 and int(last.ravel()[0]) == -1 \
        if last is not None else False


def _projection(g: _Graph, name: str, perm: list[int]) -> dict[str, Any] | None:
    """x @ W (+ b) -> Reshape [b, s, h, d] -> Transpose(perm)."""
    t = g.perm(name, perm)
    r = g.one(t.input[0], "Reshape") if t is not None else None
    if r is None:
        return None
    add = g.one(r.input[0], "Add")
    mm = g.one(add.input[0], "MatMul") if add is not None else g.one(r.input[0], "MatMul")
    if mm is None or mm.input[1] not in g.consts or g.consts[mm.input[1]].ndim != 2:
        return None
    w = g.consts[mm.input[1]]
    b = g.consts.get(add.input[1]) if add is not None else np.zeros(w.shape[1], np.float32)
    d = _head_size(g, r.input[1])
    if b is None or b.shape != (w.shape[1],) or d is None or w.shape[1] % d:
        return None
    return {"x": mm.input[0], "w": w, "b": b, "d": d, "nodes": [n for n in (t, r, add, mm) if n is not None],
            "names": [mm.name]}


def find_attention(model) -> list[dict[str, Any]]:
    """Every exported eager self-attention chain of `model` (a dict per layer: its nodes and constants)."""
    g = _Graph(model.graph)
    found = []
    for sm in model.graph.node:
        axis = next((a.i for a in sm.attribute if a.name == "axis"), -1)
        if sm.op_type != "Softmax" or axis != -1 or g.readers.get(sm.output[0]) != 1:
            continue
        add = g.one(sm.input[0], "Add")
        scaled = g.one(add.input[0], "Mul", "Div") if add is not None else None
        qk = g.one(scaled.input[0], "MatMul") if scaled is not None else None
        factor = g.consts.get(scaled.input[1]) if scaled is not None else None
        pv = next((n for n in model.graph.node if n.op_type == "MatMul" and n.input[0] == sm.output[0]), None)
        out_r = None
        for n in model.graph.node:  # context [b, h, s, d] -> Transpose -> Reshape [b, s, h * d]
            if n.op_type == "Reshape" and pv is not None and g.perm(n.input[0], [0, 2, 1, 3]) is not None and \
                    g.producer[n.input[0]].input[0] == pv.output[0] and g.readers.get(pv.output[0]) == 1:
                out_r = n
        out_t = g.producer[out_r.input[0]] if out_r is not None else None
        if qk is None or factor is None or factor.size != 1 or out_r is None or not _merges_heads(g, out_r.input[1]):
            continue
        q, k, v = (_projection(g, qk.input[0], [0, 2, 1, 3]), _projection(g, qk.input[1], [0, 2, 3, 1]),
                   _projection(g, pv.input[1], [0, 2, 1, 3]))
        if q is None or k is None or v is None or not q["x"] == k["x"] == v["x"] or \
                not q["d"] == k["d"] == v["d"] or not q["w"].shape == k["w"].shape == v["w"].shape:
            continue
        scale = float(factor.item()) if scaled.op_type == "Mul" else 1.0 / float(factor.item())
        found.append({"x": q["x"], "mask": add.input[1], "out": out_r.output[0], "scale": scale,
                      "heads": q["w"].shape[1] // q["d"], "w": [q["w"], k["w"], v["w"]], "b": [q["b"], k["b"], v["b"]],
                      "nodes": q["nodes"] + k["nodes"] + v["nodes"] + [qk, scaled, add, sm, pv, out_t, out_r],
                      "names": q["names"] + k["names"] + v["names"]})
    return found


def padding_mask(model, mask: str) -> tuple[str, float] | None:
    """(the graph input, m) when tensor `mask` is Where(input[:, None, None, :], 0, m) for padding masks of
    that input, m <= -1e4, checked by running the subgraph that makes it on probe masks; else None."""
    import onnx
    import onnxruntime as ort
    g = _Graph(model.graph)
    inputs = {i.name for i in model.graph.input}
    seen, stack, used = set(), [mask], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in inputs:
            used.add(name)
        elif name in g.producer:
            stack.extend(i for i in g.producer[name].input if i)
    if len(used) != 1:
        return None
    source = used.pop()
    sub = onnx.utils.Extractor(model).extract_model([source], [mask])
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    probe = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 1, 0]], np.int64)
    out = session.run(None, {source: probe})[0]
    if out.ndim != 4 or out.shape[0] != probe.shape[0] or out.shape[1] != 1 or out.shape[-1] != probe.shape[1]:
        return None
    m = float(out.min())
    expected = np.where(probe[:, None, None, :] > 0, 0.0, m)
    return (source, m) if m <= -1e4 and np.array_equal(np.broadcast_to(out, expected.shape[:2] + out.shape[2:]),
                                                       np.broadcast_to(expected, expected.shape[:2] + out.shape[2:])) \
        else None


def fusable(model, skip: set[str] = frozenset()) -> tuple[list[dict[str, Any]], dict[str, tuple[str, float]]]:
    """The attention chains fuse_attention rewrites (none of their projections in `skip`, their mask a padding
    mask) and each mask's (graph input, fill value)."""
    chains = [c for c in find_attention(model) if not set(c["names"]) & skip]
    masks = {m: padding_mask(model, m) for m in {c["mask"] for c in chains}}
    return [c for c in chains if masks[c["mask"]] is not None], {m: v for m, v in masks.items() if v is not None}


def _int8_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column, quantize_dynamic's per-channel weights (127 steps, half to even)."""
    scale = (np.maximum(np.abs(w).max(axis=0), 0.0) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.round(w / safe), -127, 127).astype(np.int8), scale


def fuse_attention(model, quantize: bool, skip: set[str] = frozenset()) -> int:
    """Rewrite `model` in place: each exact attention chain (none of whose projections is in `skip`) as
    Attention, or DynamicQuantizeLinear + QAttention when `quantize`. Returns the number fused."""
    from onnx import helper, numpy_helper
    chains, masks = fusable(model, skip)
    if not chains:
        return 0
    g, new, drop = model.graph, [], set()
    casts: dict[str, str] = {}
    for i, c in enumerate(chains):
        source, fill = masks[c["mask"]]
        if source not in casts:
            casts[source] = f"{source}_int32"
            new.append(helper.make_node("Cast", [source], [casts[source]], f"{source}_to_int32", to=6))
        w, b, tag = np.concatenate(c["w"], axis=1).astype(np.float32), np.concatenate(c["b"]).astype(np.float32), \
            f"edgeslim_attention_{i}"
        attrs = {"num_heads": c["heads"], "scale": c["scale"], "mask_filter_value": fill}
        g.initializer.append(numpy_helper.from_array(b, f"{tag}_bias"))
        if quantize:
            q, scale = _int8_columns(w)
            g.initializer.extend([numpy_helper.from_array(q, f"{tag}_weight_int8"),
                                  numpy_helper.from_array(scale, f"{tag}_weight_scale")])
            x = [f"{tag}_x_{s}" for s in ("u8", "scale", "zero")]
            new.append(helper.make_node("DynamicQuantizeLinear", [c["x"]], x, f"{tag}_quantize"))
            new.append(helper.make_node("QAttention", [x[0], f"{tag}_weight_int8", f"{tag}_bias", x[1],
                                                       f"{tag}_weight_scale", casts[source], x[2]],
                                        [c["out"]], tag, domain=MS, **attrs))
        else:
            g.initializer.append(numpy_helper.from_array(w, f"{tag}_weight"))
            new.append(helper.make_node("Attention", [c["x"], f"{tag}_weight", f"{tag}_bias", casts[source]],
                                        [c["out"]], tag, domain=MS, **attrs))
        drop |= {id(n) for n in c["nodes"]}
    kept = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(_topological(kept + new, {i.name for i in g.input} | {i.name for i in g.initializer}))
    _prune(model)
    if not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
    return len(chains)


def _topological(nodes: list, known: set[str]) -> list:
    """`nodes` in an order where each reads only tensors made before it (waves of ready nodes, each in its given order)."""
    out, ready, pending = [], set(known) | {""}, list(nodes)
    while pending:
        rest = [n for n in pending if not set(n.input) <= ready]
        done = [n for n in pending if set(n.input) <= ready]
        if not done:
            raise ValueError("attention fusion left a cycle or an unknown input")
        out.extend(done)
        for n in done:
            ready.update(n.output)
        pending = rest
    return out


def _prune(model) -> None:
    """Drop the nodes and initializers nothing reads any more (the old mask's subgraph, the q/k/v weights)."""
    outputs = {o.name for o in model.graph.output}
    while True:
        read = {i for n in model.graph.node for i in n.input} | outputs
        kept = [n for n in model.graph.node if any(o in read for o in n.output)]
        if len(kept) == len(model.graph.node):
            break
        del model.graph.node[:]
        model.graph.node.extend(kept)
    kept = [i for i in model.graph.initializer if i.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
