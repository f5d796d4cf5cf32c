"""The raw torch -> ONNX call and ONNX graph helpers shared by export/ and compress/ (a leaf module).

export/onnx.py wraps `export_graph` with validation; compress/quantize.py calls it to calibrate
INT8 on the same graph the pipeline later exports (same exporter, opset and names, so the same
tensor names).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Mapping, Sequence

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


def export_graph(model: nn.Module, inputs: Sequence[TensorSpec], feeds: Mapping[str, torch.Tensor], path: Path,
                 opset: int = 20, output_names: Sequence[str] = ("output",)) -> None:
    """torch.onnx.export (dynamo) of `model(**feeds)` to one file, every named dim of `inputs` dynamic.

    The exporter's chatter is silenced and the `torch.onnx` logger's level restored.

    Raises:
        ExportValidationError: the exporter failed (its first message line is kept, the cause chained).
    """
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    dynamic = {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in inputs}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logger.setLevel(logging.ERROR)
        try:
            torch.onnx.export(model, (), str(path), kwargs=dict(feeds), dynamo=True, external_data=False,
                              verbose=False, dynamic_shapes=dynamic, output_names=list(output_names),
                              opset_version=opset)
        except Exception as exc:  # torch.export raises many unrelated classes; keep the cause chained
            raise ExportValidationError(f"torch.onnx.export failed for {type(model).__name__}: "
                                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        finally:
            logger.setLevel(level)
