"""Work counted from an ONNX graph: FLOPs of its matrix products and convolutions, bytes it must move.

So `edgeslim profile FILE.onnx` gets a roofline without the PyTorch module. The input dims are fixed
to concrete sizes, ONNX shape inference (with data propagation, for Reshape targets computed in the
graph) gives every intermediate shape, and each node is counted from its shapes, a multiply-add
counting 2 FLOPs as in torch's FlopCounterMode:
- MatMul [..., m, k] @ [..., k, n]: 2 * prod(output) * k (batched and broadcast; attention's
  Q @ K^T and softmax(.) @ V are MatMuls in an exported graph, so they are counted here);
- Gemm (transA/transB): 2 * m * k * n;
- Conv with W [M, C/g, k1, k2, ...]: 2 * prod(output) * (C/g) * prod(k) (groups and dilation enter
  through W's shape and the output size);
- ConvTranspose with W [C, M/g, k...]: 2 * prod(input) * (M/g) * prod(k) (each input element is
  scattered over a kernel window of every output channel of its group).
Element-wise ops, norms and softmax are not counted (the GEMM/conv work, like `count_flops`). Bytes
moved is the lower bound of `min_bytes_moved`: every initializer read once at its stored width,
graph inputs read and outputs written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from math import prod
from pathlib import Path
from typing import Mapping

from edgeslim.core.errors import ConfigError, SourceError
from edgeslim.core.files import file_key

COUNTED = ("MatMul", "Gemm", "Conv", "ConvTranspose", "FusedMatMul", "MatMulInteger")


@dataclass(frozen=True)
class GraphWork:
    """What one run of a graph at fixed sizes costs."""

    flops: int
    bytes_moved: int
    by_op_type: dict[str, int]  # FLOPs per counted op type
    uncounted: list[str] = field(default_factory=list)  # counted-type nodes whose shapes stayed unknown


def _itemsize(elem_type: int) -> int:
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(elem_type).itemsize


def _fix_inputs(model, sizes: Mapping[str, int]) -> None:
    """Replace every symbolic input dim by its size; a dim without one is an error naming it."""
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        for d in inp.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                continue
            if d.dim_param not in sizes:
                raise ConfigError(f"input '{inp.name}' has a dynamic dim '{d.dim_param or '?'}' with no size: "
                                  f"give it with --dim {d.dim_param or 'NAME'}=SIZE")
            d.dim_value = int(sizes[d.dim_param])


def _shapes(model) -> dict[str, tuple[int, ...] | None]:
    shapes: dict[str, tuple[int, ...] | None] = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        known = all(d.HasField("dim_value") for d in dims) and vi.type.tensor_type.HasField("shape")
        shapes[vi.name] = tuple(d.dim_value for d in dims) if known else None
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def _attr(node, name: str, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def node_flops(node, shapes: Mapping[str, tuple[int, ...] | None]) -> int | None:
    """FLOPs of one counted node from its input/output shapes; None when a shape is unknown."""
    ins = [shapes.get(n) for n in node.input[:2]]
    out = shapes.get(node.output[0])
    if any(s is None for s in ins) or out is None:
        return None
    a, b = ins
    if node.op_type in ("MatMul", "FusedMatMul", "MatMulInteger"):
        k = a[-1] if len(a) > 1 or len(b) == 1 else a[0]
        if node.op_type == "FusedMatMul" and _attr(node, "transA", 0):
            k = a[-2]
        return 2 * prod(out) * k
    if node.op_type == "Gemm":
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return 2 * prod(out) * k
    if node.op_type == "Conv":
        return 2 * prod(out) * prod(b[1:])
    if node.op_type == "ConvTranspose":
        return 2 * prod(a) * prod(b[1:])
    return None


def graph_work(path: str | Path, sizes: Mapping[str, int]) -> GraphWork:
    """FLOPs and bytes moved of one run of the ONNX file with its dynamic dims set to `sizes`; reading a
    90 MB graph costs a good part of a second, so the same file (path, size, modification time unchanged)
    at the same sizes is read once.

    Raises:
        SourceError: the file cannot be read as ONNX.
        ConfigError: an input dim has no size in `sizes`.
    """
    try:
        key = file_key(path)
    except OSError as exc:
        raise SourceError(f"cannot read {path} as ONNX: {exc}") from exc
    return _graph_work(*key, tuple(sorted(sizes.items())))


@lru_cache(maxsize=256)
def _graph_work(path: str, size: int, mtime_ns: int, sizes: tuple[tuple[str, int], ...]) -> GraphWork:
    import onnx
    from onnx import shape_inference

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise SourceError(f"cannot read {path} as ONNX: {exc}") from exc
    _fix_inputs(model, dict(sizes))
    for out in model.graph.output:  # declared (often symbolic) output shapes: let inference fill them
        out.type.tensor_type.ClearField("shape")
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes = _shapes(model)
    by_type: dict[str, int] = {}
    uncounted = []
    for node in model.graph.node:
        if node.op_type not in COUNTED:
            continue
        f = node_flops(node, shapes)
        if f is None:
            uncounted.append(node.name or node.op_type)
            continue
        by_type[node.op_type] = by_type.get(node.op_type, 0) + f
    init_names = {i.name for i in model.graph.initializer}
    weights = sum(prod(i.dims) * _itemsize(i.data_type) for i in model.graph.initializer)
    io = 0
    for vi in [i for i in model.graph.input if i.name not in init_names] + list(model.graph.output):
        s = shapes.get(vi.name)
        if s is not None:
            io += prod(s) * _itemsize(vi.type.tensor_type.elem_type)
    return GraphWork(sum(by_type.values()), int(weights + io), by_type, uncounted)
