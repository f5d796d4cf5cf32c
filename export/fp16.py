"""fp16 conversion of an exported ONNX file (for GPUs, and TensorRT 11, which builds strongly typed
networks only), checked against PyTorch at an fp16 tolerance."""
from __future__ import annotations

from pathlib import Path

from edgeslim.core.errors import ExportValidationError

FP16_REL_L2 = 1e-2  # fp16 keeps ~3 significant digits; a relative L2 error above 1 % is a broken graph


def to_fp16(onnx_in: str | Path, onnx_out: str | Path) -> None:
    """Convert float32 initializers and ops to float16, keeping float32 graph inputs and outputs
    (Cast nodes at the boundary), so callers feed the same arrays as before.

    Uses ONNX Runtime's converter (onnxruntime.transformers.float16), which leaves ops without an
    fp16 kernel in fp32 behind Casts.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(onnx_in))
    try:
        half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    except Exception as exc:  # the converter raises plain exceptions for graphs it cannot handle
        raise ExportValidationError(f"fp16 conversion of {onnx_in} failed: {exc}") from exc
    onnx.save(half, str(onnx_out))


def check_fp16(check: dict[str, float], path: str | Path) -> None:
    """Raise when an fp16 model's agreement with PyTorch is beyond the fp16 tolerance."""
    if check["rel_l2"] > FP16_REL_L2:
        raise ExportValidationError(f"{path}: fp16 output differs from PyTorch by a relative L2 error of "
                                    f"{check['rel_l2']:.3g} (> {FP16_REL_L2}; max |diff| {check['max_abs_diff']:.3g})")
