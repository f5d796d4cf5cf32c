"""The raw torch -> ONNX call and ONNX graph helpers shared by export/ and compress/ (a leaf module).

export/onnx.py wraps `export_graph` with validation; compress/quantize.py calls it to calibrate
INT8 on the same graph the pipeline later exports (same exporter, opset and names, so the same
tensor names).
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from edgeslim.errors import ExportValidationError
from edgeslim.specs import TensorSpec

# Sizes used for named dimensions when none are given: not 0 or 1, which torch.export specializes.
DEFAULT_DIMS = {"batch": 2, "sequence": 16, "height": 24, "width": 20}
OTHER_DIM = 8


def dims_for(inputs: Sequence[TensorSpec], dims: Mapping[str, int] | None = None) -> dict[str, int]:
    """Sizes of every named dimension of `inputs`: `dims` where given, else DEFAULT_DIMS / OTHER_DIM."""
    full = {d: DEFAULT_DIMS.get(d, OTHER_DIM) for s in inputs for d in s.shape if isinstance(d, str)}
    full.update(dims or {})
    return full


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Keep torch.export's own log lines, graph dumps and warnings off stdout/stderr while it runs."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(previous)


_CALL_SITE = re.compile(r'The following call raised this error:\s*File "([^"]+)", line (\d+), in (\w+)\s*\n\s*(.*)')


def export_cause(exc: BaseException) -> str:
    """One line for a failed torch.onnx.export: the innermost cause and, when torch names it, the model line."""
    inner = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(inner))
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    out = f"{type(inner).__name__}: {first}" if first else type(inner).__name__
    site = _CALL_SITE.search(re.sub(r"\x1b\[[0-9;]*m", "", str(exc))) or _CALL_SITE.search(text)
    if site:
        out += f" (at {Path(site[1]).name}:{site[2]} in {site[3]}: {site[4].strip()})"
    return out[:600]


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[list[str]]:
    """Switch every Hugging Face model inside `model` to transformers' eager attention while exporting.

    The SDPA path (transformers' default) exports its attention mask with `Where`/`IsNaN` nodes that
    cost ~15% of MiniLM's ONNX Runtime time; the eager path computes the same attention with a plain
    additive mask. Modules are matched by duck typing (`set_attn_implementation` and a config with
    `_attn_implementation`), so export/ needs no transformers import. Yields the switched modules'
    class names; the previous implementations are restored on exit.
    """
    switched: list[tuple[nn.Module, str]] = []
    try:
        for module in model.modules():
            current = getattr(getattr(module, "config", None), "_attn_implementation", None)
            if current not in (None, "eager") and callable(getattr(module, "set_attn_implementation", None)):
                module.set_attn_implementation("eager")
                switched.append((module, current))
        yield [type(m).__name__ for m, _ in switched]
    finally:
        for module, previous in reversed(switched):
            module.set_attn_implementation(previous)


def export_graph(model: nn.Module, inputs: Sequence[TensorSpec], feeds: Mapping[str, torch.Tensor], path: Path,
                 opset: int = 20, output_names: Sequence[str] = ("output",), lean_attention: bool = True) -> str:
    """torch.onnx.export (dynamo) of `model(**feeds)` to one file, every named dim of `inputs` dynamic;
    returns the exporter used: "dynamo", or "torchscript" for a model torch.export cannot trace.

    torch's own log lines, graph dumps and warnings are kept off stdout/stderr (logging restored after).

    Raises:
        ExportValidationError: both exporters failed (torch.export's innermost cause and model line named, chained).
    """
    dynamic = {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in inputs}
    lean = eager_attention(model) if lean_attention else contextlib.nullcontext()
    with _quiet_torch(), lean:
        try:
            torch.onnx.export(model, (), str(path), kwargs=dict(feeds), dynamo=True, external_data=False,
                              verbose=False, dynamic_shapes=dynamic, output_names=list(output_names),
                              opset_version=opset)
            return "dynamo"
        except Exception as exc:  # torch.export raises many unrelated classes; keep the cause chained
            # Some models trace in TorchScript but not in torch.export (transformers' T5 attention
            # reshapes a transposed tensor with symbolic sizes): fall back, validated the same way.
            # Never for data-dependent control flow: tracing would bake in the branch the example took.
            cause = export_cause(exc)
            if "DataDependent" in cause or "data-dependent" in cause.lower():
                raise ExportValidationError(f"torch.onnx.export failed for {type(model).__name__}: {cause}") from exc
            try:
                torch.onnx.export(model, (), str(path), kwargs=dict(feeds), dynamo=False, verbose=False,
                                  input_names=[s.name for s in inputs], output_names=list(output_names),
                                  dynamic_axes=dynamic, opset_version=opset)
                return "torchscript"
            except Exception:  # noqa: BLE001  (the first failure is the one to report)
                raise ExportValidationError(f"torch.onnx.export failed for {type(model).__name__}: {cause}") from exc
