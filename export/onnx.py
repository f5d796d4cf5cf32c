"""Export a model to ONNX with named inputs and dynamic axes, always validated in ONNX Runtime."""
from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from edgeslim.errors import ExportValidationError
from edgeslim.export.validate import OutputCheck, check_parity
from edgeslim.files import ONNX, replace_output
from edgeslim.specs import TensorSpec, example_feeds

# Sizes used for named dimensions when none are given: not 0 or 1, which torch.export specializes.
DEFAULT_DIMS = {"batch": 2, "sequence": 16, "height": 24, "width": 20}
OTHER_DIM = 8


@dataclass
class ExportResult:
    """What `to_onnx` wrote and how well it matched PyTorch."""

    path: Path
    file_bytes: int
    opset: int
    outputs: list[str]
    checks: list[OutputCheck] = field(default_factory=list)  # one per output per validation shape
    exporter: str = "dynamo"  # "dynamo", or "torchscript" when torch.export could not trace the model

    @property
    def max_abs_diff(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in self.checks:
            out[c.name] = max(out.get(c.name, 0.0), c.max_abs_diff)
        return out


def _dims_for(inputs: Sequence[TensorSpec], dims: Mapping[str, int] | None) -> dict[str, int]:
    full = {d: DEFAULT_DIMS.get(d, OTHER_DIM) for s in inputs for d in s.shape if isinstance(d, str)}
    full.update(dims or {})
    return full


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


def _shifted(dims: Mapping[str, int]) -> dict[str, int]:
    """Other sizes for every named dimension, to prove the exported axes really are dynamic."""
    return {k: v + 1 for k, v in dims.items()}


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


def to_onnx(model: nn.Module, inputs: Sequence[TensorSpec], path: str | Path, dims: Mapping[str, int] | None = None,
            atol: float = 1e-4, rtol: float = 1e-3, opset: int = 20, output_names: Sequence[str] = ("output",),
            validate_dims: Sequence[Mapping[str, int]] | None = None, lean_attention: bool = True) -> ExportResult:
    """Export `model` (called as `model(**feeds)`) to a single-file ONNX model and validate it.

    Every named dimension of `inputs` ("batch", "sequence", "height", ...) becomes a dynamic axis.
    The file is validated in ONNX Runtime against PyTorch at the export sizes and at a second set of
    sizes (each named dimension + 1), and only then moved into place. The model is exported and
    checked in eval mode and handed back in the mode it came in; torch's own log lines and warnings
    are kept off stdout/stderr while it runs (logging is restored after).

    Args:
        dims: sizes of the named dimensions for the example inputs (defaults: DEFAULT_DIMS).
        validate_dims: the sizes to validate at (default: `dims` and every named dimension + 1).
        lean_attention: export Hugging Face models through their eager attention path (see
            `eager_attention`); validation always runs the model as given, so it checks the switch too.

    Raises:
        ExportValidationError: an output differs beyond atol + rtol * |expected| (the message lists
            every output and the first diverging module); nothing is written then.
    """
    was_training = model.training
    model.eval()
    dims = _dims_for(inputs, dims)
    feeds = example_feeds(inputs, dims, seed=0)
    kwargs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    dynamic = {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in inputs}
    path = Path(path)
    try:
        with replace_output(path, ONNX) as tmp:
            lean = eager_attention(model) if lean_attention else contextlib.nullcontext()
            with _quiet_torch(), lean:
                try:
                    torch.onnx.export(model, (), str(tmp), kwargs=kwargs, dynamo=True, external_data=False,
                                      verbose=False, dynamic_shapes=dynamic, output_names=list(output_names),
                                      opset_version=opset)
                    exporter = "dynamo"
                except Exception as exc:  # torch.export raises many unrelated classes; keep the cause chained
                    # Some models trace in TorchScript but not in torch.export (transformers' T5 attention
                    # reshapes a transposed tensor with symbolic sizes): fall back, validated the same way.
                    try:
                        torch.onnx.export(model, (), str(tmp), kwargs=kwargs, dynamo=False, verbose=False,
                                          input_names=[s.name for s in inputs], output_names=list(output_names),
                                          dynamic_axes=dynamic, opset_version=opset)
                        exporter = "torchscript"
                    except Exception:  # noqa: BLE001  (the first failure is the one to report)
                        raise ExportValidationError(f"torch.onnx.export failed for {type(model).__name__}: "
                                                    f"{export_cause(exc)}") from exc
            checks: list[OutputCheck] = []
            for d in validate_dims or (dims, _shifted(dims)):
                checks += check_parity(tmp, model, example_feeds(inputs, _dims_for(inputs, d), seed=1), atol, rtol,
                                       label=str(path))
            size = tmp.stat().st_size
    finally:
        model.train(was_training)
    return ExportResult(path, size, opset, list(output_names), checks, exporter)


_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32"}


def onnx_inputs(path: str | Path) -> list[TensorSpec]:
    """Input specs read from an ONNX file's graph (named dims stay named)."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # protobuf DecodeError and friends
        from edgeslim.errors import SourceError
        raise SourceError(f"cannot read ONNX file {path}: {exc}") from exc
    inits = {i.name for i in graph.initializer}
    return [TensorSpec(i.name, tuple(d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim),
                       _ONNX_DTYPES.get(i.type.tensor_type.elem_type, "float32"))
            for i in graph.input if i.name not in inits]
