"""RMSNorm as one ONNX Runtime node: `SimplifiedLayerNormalization`.

torch exports a LLaMA-style RMSNorm (LLaMA, Qwen2, Mistral, Phi-3, Gemma) as seven nodes, x * 1/sqrt(mean(x^2)
+ eps) * w: Pow (or Mul x x), ReduceMean over the last axis, Add eps, Sqrt, Reciprocal (or a Div), Mul, Mul.
ONNX Runtime fuses that chain only in the Div form, so each norm of a decoded token ran as seven kernels
(two per layer: 14 of the ~73 nodes a SmolLM2 layer ran per token). This pass rewrites each such chain in a
graph file into ONNX Runtime's `SimplifiedLayerNormalization` (its CPU kernel, ai.onnx domain as ONNX
Runtime registers it; its model builder writes the same node), which computes the same fp32 sums.
"""
from __future__ import annotations

from edgeslim.export.graph_rewrite import Chains


def fuse_rms_norms(model) -> int:
    """Rewrite every RMSNorm chain of the ONNX `model` (a ModelProto) in place; returns how many were fused."""
    from onnx import helper

    chains = Chains(model.graph)
    only, scalar, consts = chains.only, chains.scalar, chains.consts
    fused, drop = 0, set()
    replaced: dict[int, object] = {}
    for node in chains.nodes:
        if node.op_type != "Mul" or len(node.input) != 2:
            continue
        weight = next((i for i in node.input if i in consts and consts[i].ndim == 1 and consts[i].size > 1), None)
        other = next((i for i in node.input if i != weight), None)
        chain = _chain(other, only, scalar, consts) if weight is not None else None
        if chain is None:
            continue
        replaced[id(node)] = helper.make_node(
            "SimplifiedLayerNormalization", [chain["x"], weight], [node.output[0]], name=f"{node.name or weight}_rms",
            axis=-1, epsilon=chain["eps"], stash_type=1)
        drop.update(id(n) for n in chain["nodes"])
        fused += 1
    if fused:
        chains.rewrite(replaced, drop)
    return fused


def _chain(normed: str, only, scalar, consts) -> dict | None:
    """The nodes of x * rsqrt(mean(x^2) + eps) making `normed` (x read elsewhere too), or None."""
    scale = only(normed, "Mul") or only(normed, "Div")
    if scale is None:
        return None
    if scale.op_type == "Div":
        x, root = scale.input
        inverse, sqrt = None, only(root, "Sqrt")
    else:
        inverse = next((only(i, "Reciprocal") for i in scale.input if only(i, "Reciprocal")), None)
        if inverse is None:
            return None
        x = next(i for i in scale.input if i != inverse.output[0])
        sqrt = only(inverse.input[0], "Sqrt")
    add = only(sqrt.input[0], "Add") if sqrt is not None else None
    if add is None:
        return None
    eps = next((scalar(i) for i in add.input if scalar(i) is not None), None)
    mean = next((only(i, "ReduceMean") for i in add.input if only(i, "ReduceMean")), None)
    if eps is None or mean is None or not _last_axis_kept(mean, consts):
        return None
    square = only(mean.input[0], "Pow") or only(mean.input[0], "Mul")
    if square is None or square.input[0] != x or (
            square.input[1] != x if square.op_type == "Mul" else scalar(square.input[1]) != 2.0):
        return None
    return {"x": x, "eps": eps, "nodes": [n for n in (square, mean, add, sqrt, inverse, scale) if n is not None]}


def _last_axis_kept(mean, consts) -> bool:
    """ReduceMean over the last axis only, keepdims on (axes as attribute before opset 18, input after)."""
    attrs = {a.name: a for a in mean.attribute}
    if "keepdims" in attrs and attrs["keepdims"].i == 0:
        return False
    axes = list(attrs["axes"].ints) if "axes" in attrs else (
        consts[mean.input[1]].reshape(-1).tolist() if len(mean.input) > 1 and mean.input[1] in consts else None)
    return axes == [-1]
