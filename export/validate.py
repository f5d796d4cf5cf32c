"""Check an ONNX file against PyTorch in ONNX Runtime, and point at the first diverging module."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from edgeslim.core.errors import ExportValidationError, SourceError


@dataclass(frozen=True)
class OutputCheck:
    """One output compared: shapes, max abs diff, and whether it is within tolerance."""

    name: str
    torch_shape: tuple[int, ...]
    onnx_shape: tuple[int, ...]
    max_abs_diff: float
    ok: bool


def torch_outputs(model: nn.Module, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run `model(**feeds)` under inference mode; one array per output."""
    with torch.inference_mode():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o.detach().float().cpu().numpy() for o in outs]


def close(actual: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> bool:
    """|a - e| <= atol * max(1, max|e|) + rtol * |e| element-wise (same shapes).

    The absolute term scales with the output's largest magnitude: float32 error accumulates in
    proportion to it (a causal LM's logits of +-30 after 30 factored blocks differ by ~1e-3 near
    zero while matching to 1e-5 relative); for values within +-1 this is numpy's allclose.
    """
    e = expected
    scale = max(1.0, float(np.max(np.abs(e)))) if e.size and np.issubdtype(e.dtype, np.floating) else 1.0
    return bool(np.allclose(actual, e, atol=atol * scale, rtol=rtol, equal_nan=False))


def compare(names: list[str], expected: list[np.ndarray], actual: list[np.ndarray], atol: float,
            rtol: float) -> list[OutputCheck]:
    """Compare output lists element-wise with `close`."""
    rows = []
    for name, e, a in zip(names, expected, actual):
        same_shape = e.shape == a.shape
        diff = float(np.max(np.abs(a.astype(np.float64) - e))) if same_shape and e.size else (0.0 if same_shape else float("inf"))
        ok = same_shape and close(a, e, atol, rtol)
        rows.append(OutputCheck(name, tuple(e.shape), tuple(a.shape), diff, ok))
    return rows


def _ort_session(path: str | Path, extra_outputs: list[str] | None = None):
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not extra_outputs:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    known = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
    present = {o.name for o in model.graph.output}
    for name in extra_outputs:
        if name in known and name not in present:
            model.graph.output.append(known[name])
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def locate_divergence(path: str | Path, model: nn.Module, feeds: Mapping[str, np.ndarray], atol: float,
                      rtol: float) -> str | None:
    """Name the first module (in execution order) whose output differs between PyTorch and ONNX.

    Uses the `pkg.torch.onnx.name_scopes` metadata the dynamo exporter writes on every node: the last
    node inside a module's scope whose shape matches the module's output is taken as its output.
    """
    import onnx

    graph = onnx.load(str(path)).graph
    last_node_of: dict[str, str] = {}
    for node in graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            continue
        for scope in scopes[1:-1]:  # scopes[0] is the root, scopes[-1] the op itself
            if node.output:
                last_node_of[scope] = node.output[0]
    recorded: list[tuple[str, np.ndarray]] = []
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: recorded.append((name, out.detach().numpy()))
                                     if isinstance(out, torch.Tensor) else None)
             for name, m in model.named_modules() if name in last_node_of]
    try:
        torch_outputs(model, feeds)
    finally:
        for h in hooks:
            h.remove()
    wanted = [last_node_of[name] for name, _ in recorded]
    session = _ort_session(path, wanted)
    produced = {o.name for o in session.get_outputs()}
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, dict(feeds))))
    for name, expected in recorded:
        value = last_node_of[name]
        if value in produced and values[value].shape == expected.shape:
            if not close(values[value], expected, atol, rtol):
                return name
    return None


def check_parity(path: str | Path, model: nn.Module, feeds: Mapping[str, np.ndarray], atol: float = 1e-4,
                 rtol: float = 1e-3, locate: bool = True, label: str | None = None) -> list[OutputCheck]:
    """Run `path` in ONNX Runtime and `model` in PyTorch on `feeds`; raise once listing every output.

    Args:
        label: the name to use for the file in messages (default: `path`).

    Raises:
        SourceError: ONNX Runtime cannot load the file.
        ExportValidationError: any output differs in shape or beyond `close`'s tolerance; the
            message holds a table (output, shapes, max abs diff) and the first diverging module.
    """
    try:
        session = _ort_session(path)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph classes
        raise SourceError(f"ONNX Runtime cannot load {label or path}: {exc}") from exc
    names = [o.name for o in session.get_outputs()]
    rows = compare(names, torch_outputs(model, feeds), session.run(None, dict(feeds)), atol, rtol)
    if all(r.ok for r in rows):
        return rows
    table = "\n".join(f"  {r.name:<16} torch {r.torch_shape} onnx {r.onnx_shape} max|diff| {r.max_abs_diff:.3g}"
                      f" {'ok' if r.ok else 'FAIL'}" for r in rows)
    culprit = locate_divergence(path, model, feeds, atol, rtol) if locate else None
    where = f"\nfirst diverging module: {culprit}" if culprit else ""
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feeds.items())
    raise ExportValidationError(f"{label or path}: ONNX Runtime output differs from PyTorch (atol={atol}, rtol={rtol}) "
                                f"for inputs {shapes}:\n{table}{where}")


def agreement(path: str | Path, model: nn.Module, feeds: Mapping[str, np.ndarray]) -> dict[str, float]:
    """How closely a lossy ONNX file (INT8, fp16) follows the PyTorch model, instead of an allclose check.

    Returns the max abs diff, the relative L2 error ||onnx - torch|| / ||torch||, the SNR in dB of the
    first output, and for 2-D outputs (logits, embeddings) the top-1 agreement and mean cosine similarity.
    """
    session = _ort_session(path)
    expected = torch_outputs(model, feeds)[0].astype(np.float64)
    actual = session.run(None, dict(feeds))[0].astype(np.float64)
    if expected.shape != actual.shape:
        raise ExportValidationError(f"{path}: output shape {actual.shape} differs from PyTorch's {expected.shape}")
    err = float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))
    out = {"max_abs_diff": float(np.max(np.abs(actual - expected))), "rel_l2": err,
           "snr_db": float(-20 * np.log10(max(err, 1e-12)))}
    if expected.ndim == 2:
        e, a = expected, actual
        cos = (e * a).sum(1) / np.maximum(np.linalg.norm(e, axis=1) * np.linalg.norm(a, axis=1), 1e-30)
        out |= {"top1_agreement": float(np.mean(e.argmax(1) == a.argmax(1))), "cosine_mean": float(cos.mean())}
    return out
