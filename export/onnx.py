"""Export a model to ONNX with named inputs and dynamic axes, always validated in ONNX Runtime."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

import contextlib
import shutil
import tempfile

from edgeslim.core.errors import ExportValidationError
from edgeslim.export.validate import OutputCheck, check_parity
from edgeslim.core.files import ONNX, ONNX_DATA, replace_output
from edgeslim.core.onnx_io import EXTERNAL_DATA_BYTES, export_cause, export_graph, weight_bytes  # noqa: F401 (re-exported)
from edgeslim.core.onnx_io import dims_for as _dims_for
from edgeslim.core.specs import TensorSpec, example_feeds


@dataclass
class ExportResult:
    """What `to_onnx` wrote and how well it matched PyTorch."""

    path: Path
    file_bytes: int
    opset: int
    outputs: list[str]
    checks: list[OutputCheck] = field(default_factory=list)  # one per output per validation shape
    exporter: str = "dynamo"  # "dynamo", or "torchscript" when torch.export could not trace the model
    slimmed: bool = False  # onnxslim's clean-up applied (and validated after it)
    data_path: Path | None = None  # the external-data file beside `path` (weights over the threshold)
    notes: list[str] = field(default_factory=list)  # e.g. why the graph was not slimmed

    @property
    def max_abs_diff(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in self.checks:
            out[c.name] = max(out.get(c.name, 0.0), c.max_abs_diff)
        return out


def _shifted(dims: Mapping[str, int]) -> dict[str, int]:
    """Other sizes for every named dimension, to prove the exported axes really are dynamic."""
    return {k: v + 1 for k, v in dims.items()}


def to_onnx(model: nn.Module, inputs: Sequence[TensorSpec], path: str | Path, dims: Mapping[str, int] | None = None,
            atol: float = 1e-4, rtol: float = 1e-3, opset: int = 20, output_names: Sequence[str] = ("output",),
            validate_dims: Sequence[Mapping[str, int]] | None = None, lean_attention: bool = True,
            slim: bool = True, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> ExportResult:
    """Export `model` (called as `model(**feeds)`) to a single-file ONNX model and validate it.

    Every named dimension of `inputs` ("batch", "sequence", "height", ...) becomes a dynamic axis.
    The graph is cleaned up by onnxslim, then validated in ONNX Runtime against PyTorch at the export
    sizes and at a second set of sizes (each named dimension + 1); when the slimmed graph fails that
    and the plain one passes, the plain one is kept (with a note). Only then is it moved into place.
    A model whose weights exceed `external_data_bytes` is written as `path` + `<path>.data`. The model is exported and
    checked in eval mode and handed back in the mode it came in; torch's own log lines and warnings
    are kept off stdout/stderr while it runs (logging is restored after).

    Args:
        dims: sizes of the named dimensions for the example inputs (defaults: DEFAULT_DIMS).
        validate_dims: the sizes to validate at (default: `dims` and every named dimension + 1).
        slim: run onnxslim (validated after it); external_data_bytes: the external-data threshold.
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
    path = Path(path)
    external = weight_bytes(model) > external_data_bytes
    data_path = path.with_name(path.name + ".data") if external else None
    torch_feeds = {k: torch.from_numpy(v) for k, v in feeds.items()}

    def write(target: Path, slimmed: bool) -> tuple[str, str | None, list[OutputCheck]]:
        exporter, note = export_graph(model, inputs, torch_feeds, target, opset, output_names,
                                      lean_attention=lean_attention, external=external, slim=slimmed)
        checks: list[OutputCheck] = []
        for d in validate_dims or (dims, _shifted(dims)):
            checks += check_parity(target, model, example_feeds(inputs, _dims_for(inputs, d), seed=1), atol, rtol,
                                   label=str(path))
        return exporter, note, checks

    try:
        with replace_output(path, ONNX) as tmp, \
                (replace_output(data_path, ONNX_DATA) if external else contextlib.nullcontext()) as tmp_data, \
                tempfile.TemporaryDirectory(prefix="edgeslim-export-", dir=path.parent) as work:
            target = Path(work) / path.name  # external data is referenced by this name: keep it
            notes = []
            try:
                exporter, note, checks = write(target, slim)
            except ExportValidationError as exc:
                if not slim or "ONNX Runtime output differs" not in str(exc):
                    raise
                exporter, note, checks = write(target, False)
                note = f"not slimmed: onnxslim's graph failed validation ({str(exc).splitlines()[0][:300]})"
            notes += [note] if note else []
            shutil.move(str(target), tmp)
            if external:
                shutil.move(str(target.with_name(target.name + ".data")), tmp_data)
        size = path.stat().st_size + (data_path.stat().st_size if external else 0)
    finally:
        model.train(was_training)
    return ExportResult(path, size, opset, list(output_names), checks, exporter, slimmed=slim and note is None,
                        data_path=data_path, notes=notes)


_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32"}


def read_onnx_header(path: str | Path):
    """An ONNX file's graph and metadata, without its external weights.

    Raises:
        SourceError: the file is not an ONNX model.
    """
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        from edgeslim.core.errors import SourceError
        raise SourceError(f"cannot read ONNX file {path}: {exc}") from exc


def onnx_inputs(model) -> list[TensorSpec]:
    """Input specs of an ONNX file (a path) or of a model `read_onnx_header` read (named dims stay named)."""
    graph = (read_onnx_header(model) if isinstance(model, (str, Path)) else model).graph
    inits = {i.name for i in graph.initializer}
    return [TensorSpec(i.name, tuple(d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim),
                       _ONNX_DTYPES.get(i.type.tensor_type.elem_type, "float32"))
            for i in graph.input if i.name not in inits]
