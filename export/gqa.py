"""A cache graph's attention as one ONNX Runtime node per layer: `GroupQueryAttention` (com.microsoft).

After the RMSNorm and rotary fusions a LLaMA-family layer still runs its attention as ~20 kernels per token
(Reshape and Transpose of q, k and v into heads, the Concat of the past into the present, the grouped
MatMuls, scale, mask Add, Softmax and the Transposes back), one thread each. This pass finds that subgraph from
each layer's `present.{i}.key/value` Concat and writes, in its place, one GroupQueryAttention(query, key, value
[batch, sequence, heads * head_dim], past key/value, seqlens_k, total_sequence_length), its outputs the
attention [batch, sequence, hidden] and the layer's `present.*` under their Optimum names. The rotary
embeddings (ORT's RotaryEmbedding after export/rotary.py) move into the node (do_rotary, the same cos/sin
tables and `position_ids`). The lengths come from `attention_mask` alone: seqlens_k = its row sums - 1,
total_sequence_length = its width, causal masking inside the node (no attention bias, the model's mask
subgraph goes). So a past may be a larger buffer than its written length: when `present.*` is bound to the
same buffer (the "shared" layout, runtime/kv_decoder.py), ORT writes the new keys and values into it in place
(GQA, Ainslie et al., EMNLP 2023; the node ORT GenAI's model builder writes). Padding may only follow a
sequence's tokens (seqlens_k counts a row's ones): the runner refuses other masks. After the MatMulNBits
lowering merges q, k and v into one product, `pack_qkv` feeds it to the node whole (ORT's packed-QKV form).
Layers whose subgraph does not have this form (another attention, rope left unfused) are left as they are.
"""
from __future__ import annotations

import numpy as np

from edgeslim.export.graph_rewrite import Chains

MS = "com.microsoft"
_VIEW = ("Reshape", "Transpose")


# rotate-half rope (export/rotary.py) and a present that is past + new: Mistral's sliding-window cache slices it
FAMILIES = frozenset({"llama", "qwen2", "phi3", "gemma"})


def shared_refusal(hf, positions: int | None, head_dims: list[int]) -> str | None:
    """Why the attention of `hf` (a Hugging Face causal LM) cannot be GroupQueryAttention here (None when it can)."""
    from edgeslim.export.rotary import rotary_tables
    family = getattr(hf.config, "model_type", "")
    if family not in FAMILIES:
        return f"{family or type(hf).__name__} is not a family it was checked on ({', '.join(sorted(FAMILIES))})"
    if _kernel_inputs() < 17:
        import onnxruntime
        return f"ONNX Runtime {onnxruntime.__version__}'s GroupQueryAttention takes no query_seqlens input"
    odd = next((d for d in head_dims if d % 16), None)
    if odd is not None:
        return f"heads of {odd}: ORT's GroupQueryAttention rotates multiples of 16 only"
    if rotary_tables(hf, positions) is None:
        return "its rotary embedding has no fixed tables over a known length (rope type, or no --positions limit)"
    return None


def _kernel_inputs() -> int:
    """How many inputs the installed ONNX Runtime's GroupQueryAttention takes (0 when it has none)."""
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
    except ImportError:
        return 0
    return next((len(s.inputs) for s in get_all_operator_schema() if s.name == "GroupQueryAttention" and s.domain == MS), 0)


def query_heads(hf) -> list[int] | None:
    """Query heads of every layer of a Hugging Face causal LM (pruned heads included), read from the
    attention weights of one short eager forward pass; None when the model does not return them."""
    import torch
    from edgeslim.core.onnx_io import _quiet_torch, eager_attention
    ids = torch.zeros((1, 2), dtype=torch.int64)
    try:
        with torch.inference_mode(), _quiet_torch(), eager_attention(hf):
            out = hf(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True)
    except (TypeError, ValueError, RuntimeError):
        return None
    weights = getattr(out, "attentions", None)
    return [int(w.shape[1]) for w in weights] if weights and all(w is not None for w in weights) else None


def fuse_group_query_attention(model, heads: list[int], kv_heads: list[int], head_dims: list[int]) -> int:
    """Rewrite each layer's attention subgraph of the cache graph `model` (a ModelProto, see the module
    docstring) in place; `heads`/`kv_heads`/`head_dims` per layer. Returns how many layers were fused.
    ORT's kernel rotates heads whose size is a multiple of 16 only: other layers are left as they are.
    The nodes read the past's length from `attention_mask` alone (never from the past's shape), so the past
    may be a larger buffer that `present.*` shares (the "shared" layout)."""
    from onnx import helper

    graph = model.graph
    names = {i.name for i in graph.input}
    if "attention_mask" not in names:
        return 0
    chains = Chains(graph)
    readers: dict[str, list] = {}
    for node in chains.nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    replaced, drop, fused = {}, set(), 0
    for layer, (h, kv, d) in enumerate(zip(heads, kv_heads, head_dims)):
        found = _layer(chains, readers, layer)
        if found is None or (found["q_rotary"] is not None and d % 16):
            continue
        rotary = found["q_rotary"]
        if (rotary is None) != (found["k_rotary"] is None) or \
                (rotary is not None and list(rotary.input[1:]) != list(found["k_rotary"].input[1:])):
            continue
        interleaved = next((helper.get_attribute_value(a) for a in rotary.attribute if a.name == "interleaved"), 0) \
            if rotary is not None else 0
        # inputs: query key value past_key past_value seqlens_k total_sequence_length cos_cache sin_cache
        # position_ids, then (16) query_seqlens; no attention_bias (causal inside the node)
        tables = [rotary.input[2], rotary.input[3], rotary.input[1]] if rotary is not None else ["", "", ""]
        replaced[id(found["out_node"])] = helper.make_node(
            "GroupQueryAttention", [found["q"], found["k"], found["v"], *found["past"], "gqa_seqlens_k",
                                    "gqa_total_length", *tables, "", "", "", "", "", "",
                                    "gqa_query_lengths"],
            [found["out"], f"present.{layer}.key", f"present.{layer}.value"], name=f"gqa_{layer}", domain=MS,
            num_heads=h, kv_num_heads=kv, scale=found["scale"], do_rotary=int(rotary is not None),
            rotary_interleaved=int(interleaved))
        drop.update(id(n) for n in found["concats"])
        fused += 1
    if not fused:
        return 0
    chains.rewrite(replaced, drop)
    nodes = _length_nodes(graph) + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
    return fused


def _length_nodes(graph) -> list:
    """seqlens_k [batch] int32 (each row's ones - 1), total_sequence_length (a scalar int32: the mask's width)
    and query_seqlens [batch] (the sequence, or a row's ones when fewer: a prompt padded after its tokens; ORT's
    CPU kernel takes several new tokens with a past for a batch of one only, unless told each entry's count),
    from `attention_mask` and `input_ids`."""
    from onnx import TensorProto, helper, numpy_helper
    graph.initializer.extend([numpy_helper.from_array(np.array(v, np.int64), name) for name, v in
                              (("gqa_c0", [0]), ("gqa_c1", 1), ("gqa_c1v", [1]))])
    return [
        helper.make_node("ReduceSum", ["attention_mask", "gqa_c1v"], ["gqa_rows64"], name="gqa_rows", keepdims=0),
        helper.make_node("Sub", ["gqa_rows64", "gqa_c1"], ["gqa_seqlens64"], name="gqa_last"),
        helper.make_node("Cast", ["gqa_seqlens64"], ["gqa_seqlens_k"], name="gqa_seqlens_cast", to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["gqa_mask_shape"], name="gqa_mask_shape"),
        helper.make_node("Gather", ["gqa_mask_shape", "gqa_c1"], ["gqa_total64"], name="gqa_total", axis=0),
        helper.make_node("Cast", ["gqa_total64"], ["gqa_total_length"], name="gqa_total_cast", to=TensorProto.INT32),
        helper.make_node("Slice", ["gqa_mask_shape", "gqa_c0", "gqa_c1v"], ["gqa_batch"], name="gqa_batch"),
        helper.make_node("Shape", ["input_ids"], ["gqa_ids_shape"], name="gqa_ids_shape"),
        helper.make_node("Gather", ["gqa_ids_shape", "gqa_c1"], ["gqa_new64"], name="gqa_new", axis=0),
        helper.make_node("Expand", ["gqa_new64", "gqa_batch"], ["gqa_new_rows64"], name="gqa_query_expand"),
        helper.make_node("Min", ["gqa_new_rows64", "gqa_rows64"], ["gqa_query64"], name="gqa_query_rows"),
        helper.make_node("Cast", ["gqa_query64"], ["gqa_query_lengths"], name="gqa_query_cast", to=TensorProto.INT32),
    ]


def _perm(node) -> list[int] | None:
    from onnx import helper
    return next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None)


def _heads_view(chains: Chains, name: str) -> tuple[str, object | None] | None:
    """The [batch, sequence, hidden] tensor that `name` [batch, heads, sequence, head_dim] is a view of
    (Reshape then Transpose 0,2,1,3, optionally rotated by a RotaryEmbedding), and that rotary node."""
    rotary = chains.only(name, "RotaryEmbedding")
    if rotary is not None:
        name = rotary.input[0]
    transpose = chains.only(name, "Transpose")
    if transpose is None or _perm(transpose) != [0, 2, 1, 3]:
        return None
    reshape = chains.only(transpose.input[0], "Reshape")
    return (reshape.input[0], rotary) if reshape is not None else None


def _layer(chains: Chains, readers: dict[str, list], layer: int) -> dict | None:
    """The pieces of layer `layer`'s attention subgraph, or None when it does not have the expected form."""
    producer = chains.producer
    present_k, present_v = f"present.{layer}.key", f"present.{layer}.value"
    concats = [producer.get(present_k), producer.get(present_v)]
    if any(c is None or c.op_type != "Concat" or len(c.input) != 2 for c in concats):
        return None
    past = (concats[0].input[0], concats[1].input[0])
    if past != (f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"):
        return None
    k, v = _heads_view(chains, concats[0].input[1]), _heads_view(chains, concats[1].input[1])
    if k is None or v is None or v[1] is not None:
        return None
    # present.key -> Transpose(0,1,3,2) -> MatMul(q, .) -> Mul(scale) -> [Reshape] -> Add(mask) -> [Reshape] -> Softmax
    kt = [n for n in readers.get(present_k, []) if n.op_type == "Transpose" and _perm(n) == [0, 1, 3, 2]]
    scores = [n for n in readers.get(kt[0].output[0], []) if n.op_type == "MatMul"] if len(kt) == 1 else []
    if len(scores) != 1 or len(readers.get(present_k, [])) != 1:
        return None
    query = scores[0].input[0]
    while chains.only(query, "Reshape") is not None:
        query = chains.producer[query].input[0]
    q = _heads_view(chains, query)
    node = _single_reader(readers, scores[0])
    if q is None or node is None or node.op_type != "Mul":
        return None
    scale = next((chains.scalar(i) for i in node.input if chains.scalar(i) is not None), None)
    node = _skip_views(readers, node)
    if scale is None or node is None or node.op_type != "Add":  # the model's causal and padding mask
        return None
    node = _skip_views(readers, node)
    if node is None or node.op_type != "Softmax":
        return None
    out = [n for n in readers.get(node.output[0], []) if n.op_type == "MatMul" and n.input[1] == present_v]
    if len(out) != 1 or len(readers.get(present_v, [])) != 1:
        return None
    tail, transposes = out[0], 0
    while True:
        nxt = _single_reader(readers, tail)
        if nxt is None or nxt.op_type not in _VIEW:
            break
        transposes += nxt.op_type == "Transpose" and _perm(nxt) == [0, 2, 1, 3]
        tail = nxt
    if tail.op_type != "Reshape" or transposes != 1:
        return None
    return {"q": q[0], "q_rotary": q[1], "k": k[0], "k_rotary": k[1], "v": v[0], "past": past, "scale": scale,
            "out": tail.output[0], "out_node": tail, "concats": concats}


def _single_reader(readers: dict[str, list], node):
    got = readers.get(node.output[0], [])
    return got[0] if len(got) == 1 else None


def _skip_views(readers: dict[str, list], node):
    """The first reader after `node` and any Reshapes that follow it alone."""
    nxt = _single_reader(readers, node)
    while nxt is not None and nxt.op_type == "Reshape":
        nxt = _single_reader(readers, nxt)
    return nxt


def pack_qkv(model) -> int:
    """Feed each GroupQueryAttention whose query, key and value are the three outputs of one Split (the q/k/v
    MatMulNBits merged by export/nbits.py) the Split's input whole, ORT's packed-QKV form; returns how many."""
    from onnx import helper
    chains = Chains(model.graph)
    drop = set()
    for node in chains.nodes:
        if node.op_type != "GroupQueryAttention" or node.domain != MS:
            continue
        split = chains.producer.get(node.input[0])
        axis = next((helper.get_attribute_value(a) for a in split.attribute if a.name == "axis"), 0) \
            if split is not None and split.op_type == "Split" else None
        if axis not in (-1, 2) or list(split.output) != list(node.input[:3]) or \
                any(chains.readers.get(o) != 1 for o in split.output):
            continue
        node.input[0], node.input[1], node.input[2] = split.input[0], "", ""
        drop.add(id(split))
    if drop:
        chains.rewrite({}, drop)
    return len(drop)
