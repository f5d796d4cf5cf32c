"""Rotary position embeddings as one ONNX Runtime node: `RotaryEmbedding` (com.microsoft).

torch exports `q * cos + rotate_half(q) * sin` (LLaMA, Qwen2, Mistral, Phi-3, Gemma) as seven nodes per
query and per key: Mul, two Slices (or a Split), Neg, Concat, Mul, Add. Decoding a token ran them for every
layer (14 of the ~73 nodes of a SmolLM2 layer). This pass rewrites each such chain on a [batch, heads,
sequence, head_dim] tensor into ONNX Runtime's `RotaryEmbedding`, fed the graph's `position_ids` and the
model's own cos/sin tables for every position (`rotary_tables`: its rotary module called once, so its
theta and static scaling are the ones the file uses). Rope types whose tables depend on the sequence length
(dynamic, YaRN, LongRoPE) are left unfused.
"""
from __future__ import annotations

import numpy as np

from edgeslim.export.graph_rewrite import Chains

STATIC_ROPE = frozenset({"default", "linear", "llama3"})  # tables that depend on the position alone


def rotary_tables(hf, positions: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(cos, sin) [positions, head_dim / 2] of a Hugging Face causal LM's rotary module, or None when it has
    none, no length limit, a rope type outside STATIC_ROPE, or tables that are not rotate-half's."""
    import torch
    rope = getattr(getattr(hf, "model", None), "rotary_emb", None)
    scaling = getattr(hf.config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if rope is None or not positions or kind not in STATIC_ROPE:
        return None
    with torch.inference_mode():
        cos, sin = rope(torch.zeros(1), torch.arange(positions)[None])
    cos, sin = cos[0].float().numpy(), sin[0].float().numpy()
    half = cos.shape[-1] // 2
    if not (np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:])):
        return None
    return np.ascontiguousarray(cos[:, :half]), np.ascontiguousarray(sin[:, :half])


def fuse_rotary(model, cos: np.ndarray, sin: np.ndarray, position_ids: str = "position_ids") -> int:
    """Rewrite every rotate-half chain of head width 2 * cos.shape[1] of the ONNX `model` (a ModelProto) in
    place; returns how many were fused (0 leaves it untouched)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    if position_ids not in {i.name for i in graph.input}:
        return 0
    chains = Chains(graph)
    only, consts = chains.only, chains.consts
    half = cos.shape[1]
    replaced, drop = {}, set()
    for node in chains.nodes:
        if node.op_type != "Add":
            continue
        chain = _chain(node, only, consts, half)
        if chain is None:
            continue
        replaced[id(node)] = helper.make_node(
            "RotaryEmbedding", [chain["x"], position_ids, "rotary_cos_cache", "rotary_sin_cache"], [node.output[0]],
            name=f"{node.name or node.output[0]}_rotary", domain="com.microsoft", interleaved=0)
        drop.update(id(n) for n in chain["nodes"])
    if not replaced:
        return 0
    chains.rewrite(replaced, drop)
    graph.initializer.extend([numpy_helper.from_array(cos.astype(np.float32), "rotary_cos_cache"),
                              numpy_helper.from_array(sin.astype(np.float32), "rotary_sin_cache")])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replaced)


def _chain(add, only, consts, half: int) -> dict | None:
    """x * C + Concat(-x2, x1) * S (x1, x2 the halves of x's last axis) making `add`'s output, or None."""
    muls = [only(i, "Mul") for i in add.input]
    if len(muls) != 2 or None in muls:
        return None
    for rotated_mul, plain_mul in (muls, muls[::-1]):
        cat = next((only(i, "Concat") for i in rotated_mul.input if only(i, "Concat")), None)
        if cat is None or len(cat.input) != 2 or _axis(cat) not in (-1, 3):
            continue
        neg = only(cat.input[0], "Neg")
        second = only(neg.input[0], "Slice") if neg is not None else None
        first = only(cat.input[1], "Slice")
        if second is None or first is None or first.input[0] != second.input[0]:
            continue
        x = first.input[0]
        if x not in plain_mul.input or _bounds(first, consts) != (0, half) or \
                _bounds(second, consts) not in ((half, None), (half, 2 * half)):
            continue
        return {"x": x, "nodes": [rotated_mul, plain_mul, cat, neg, first, second]}
    return None


def _axis(node) -> int | None:
    from onnx import helper
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), None)


def _bounds(node, consts) -> tuple[int, int | None] | None:
    """(start, end) of a Slice over the last axis (end None when it runs to the end), or None."""
    values = [consts.get(i) for i in node.input[1:]]
    if len(values) < 3 or any(v is None or v.size != 1 for v in values[:3]) or \
            (len(values) > 3 and (values[3] is None or values[3].size != 1 or values[3].item() != 1)):
        return None
    start, end, axis = (int(v.item()) for v in values[:3])
    if axis not in (-1, 3):
        return None
    return start, (None if end >= 2 ** 31 - 1 else end)
