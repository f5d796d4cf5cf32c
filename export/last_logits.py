"""An optional cache-graph input `logits_to_keep`: logits for the last positions only (a prefill's first token).

A prefill of P tokens computes the LM head for all P positions (SmolLM2: 49152 x 576 per position, a fifth
of a token's work), while generation reads only the last row. Hugging Face's causal LMs take
`logits_to_keep` (an int, 0 for all, n for the last n); this pass gives the cache graph the same input,
as a graph input with a default initializer of 0 (ONNX Runtime's overridable initializer): a runner that
feeds Optimum's merged-decoder names only is unchanged (all positions), one that feeds `logits_to_keep=1`
gets logits [batch, 1, vocab]. The hidden states are sliced on the sequence axis just before the LM head
(the last MatMul on the way to `logits`): hidden[..., -n:, :], with -0 = 0 keeping every position.
"""
from __future__ import annotations

from edgeslim.runtime.kv_decoder import KEEP

HEADS = ("MatMul", "MatMulNBits", "Gemm")


def add_logits_to_keep(model) -> bool:
    """Add the `logits_to_keep` input to the ONNX cache graph `model` (a ModelProto, in place); False when
    no MatMul feeds `logits` through single-input element-wise ops (nothing changed)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    constants = {i.name for i in graph.initializer}
    node = producer.get("logits")
    while node is not None and node.op_type not in HEADS:
        live = [i for i in node.input if i and i not in constants]
        node = producer.get(live[0]) if len(live) == 1 else None
    if node is None or KEEP in {i.name for i in graph.input}:
        return False
    hidden = node.input[0]
    graph.input.append(helper.make_tensor_value_info(KEEP, TensorProto.INT64, []))
    graph.initializer.extend([numpy_helper.from_array(np.array(0, np.int64), KEEP),
                              numpy_helper.from_array(np.array([1], np.int64), f"{KEEP}_shape"),
                              numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), f"{KEEP}_end"),
                              numpy_helper.from_array(np.array([-2], np.int64), f"{KEEP}_axis")])
    sliced = f"{hidden}_kept"
    new = [helper.make_node("Reshape", [KEEP, f"{KEEP}_shape"], [f"{KEEP}_1d"], name=f"{KEEP}_1d"),
           helper.make_node("Neg", [f"{KEEP}_1d"], [f"{KEEP}_start"], name=f"{KEEP}_start"),
           helper.make_node("Slice", [hidden, f"{KEEP}_start", f"{KEEP}_end", f"{KEEP}_axis"], [sliced],
                            name=f"{KEEP}_slice")]
    nodes = list(graph.node)
    at = nodes.index(node)
    node.input[0] = sliced
    del graph.node[:]
    graph.node.extend(nodes[:at] + new + nodes[at:])
    after = {node.output[0]}  # the shapes recorded past the slice no longer hold: their sequence is n
    for n in nodes[at + 1:]:
        if after.intersection(n.input):
            after.update(n.output)
    kept = [v for v in graph.value_info if v.name not in after]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    for out in graph.output:
        if out.name == "logits" and len(out.type.tensor_type.shape.dim) == 3:
            out.type.tensor_type.shape.dim[1].dim_param = "logits_sequence"
    return True
