"""Build a TensorRT engine from an ONNX file for a target profile (TensorRT 10/11 Python API).

Shapes: every dynamic ONNX dimension gets a (min, opt, max) range for one optimization profile.
The batch dimension (named "batch", or any unnamed-size leading axis) spans the profile's batch
list, with opt at its middle entry; other named dimensions ("sequence", "height") come from
`dims`. Precision: TensorRT 10 takes BuilderFlag.FP16 / INT8 (weak typing, deprecated since
10.12); TensorRT 11 removed those flags and builds strongly typed networks only, so there the ONNX
file must already hold the precision (fp16 weights, or Q/DQ nodes for int8). INT8 always needs an
explicitly quantized (Q/DQ) model: implicit calibration is deprecated in 10.1 and removed in 11.
TensorRT could not be installed where this was written; it is tested where `tensorrt` imports.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import onnx

from edgeslim.core.errors import ConfigError, ExportValidationError, SourceError
from edgeslim.core.files import ENGINE, check_output, replace_output, sha256_file
from edgeslim.runtime.session_base import require_cuda
from edgeslim.runtime.targets import Profile, load_profile
from edgeslim.runtime.trt_session import gpu_name, import_tensorrt, write_sidecar

ShapeRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def _load_graph(onnx_path: Path) -> onnx.ModelProto:
    if not onnx_path.is_file():
        raise SourceError(f"ONNX file {onnx_path} does not exist")
    try:
        return onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a corrupt file
        raise SourceError(f"cannot read ONNX file {onnx_path}: {exc}") from exc


def engine_shapes(onnx_path: str | Path, profile: Profile,
                  dims: Mapping[str, int | tuple[int, int, int]] | None = None) -> dict[str, ShapeRange]:
    """(min, opt, max) shape of every ONNX graph input for one TensorRT optimization profile.

    Args:
        onnx_path: the ONNX model.
        profile: its batch list sets the batch range (min, middle entry, max).
        dims: sizes of the other named dimensions, an int (fixed) or a (min, opt, max) triple.
            The batch range always comes from profile.batch (change it with profile.override);
            a "batch" entry is ignored so that a model's default dims can be passed as they are.

    Raises:
        ConfigError: a dynamic dimension has no size (the message names input, axis and name).
    """
    dims = {k: v for k, v in (dims or {}).items() if k != "batch"}
    batches = sorted(profile.batch)
    model = _load_graph(Path(onnx_path))
    weights = {init.name for init in model.graph.initializer}
    shapes: dict[str, ShapeRange] = {}
    for inp in model.graph.input:
        if inp.name in weights:
            continue
        lo, opt, hi = [], [], []
        for axis, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                size = (d.dim_value,) * 3
            elif d.dim_param in dims:
                given = dims[d.dim_param]
                size = tuple(given) if isinstance(given, (tuple, list)) else (int(given),) * 3
            elif d.dim_param == "batch" or axis == 0:
                size = (batches[0], batches[len(batches) // 2], batches[-1])
            else:
                raise ConfigError(f"input '{inp.name}' axis {axis} is dynamic ('{d.dim_param or '?'}'): give its "
                                  f"size, e.g. dims={{'{d.dim_param or 'name'}': 128}}")
            if not (1 <= size[0] <= size[1] <= size[2]):
                raise ConfigError(f"input '{inp.name}' axis {axis}: need 1 <= min <= opt <= max, got {size}")
            lo.append(size[0])
            opt.append(size[1])
            hi.append(size[2])
        shapes[inp.name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


def _is_fp16(model: onnx.ModelProto) -> bool:
    half = onnx.TensorProto.FLOAT16
    return any(i.data_type == half for i in model.graph.initializer) or \
        any(i.type.tensor_type.elem_type == half for i in model.graph.input)


def _has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def _precision_flags(trt, model: onnx.ModelProto, precision: str) -> list:
    weak_typing = hasattr(trt.BuilderFlag, "FP16")  # removed in TensorRT 11
    if precision == "int8":
        if not _has_qdq(model):
            raise ConfigError("int8 TensorRT engines need an explicitly quantized ONNX model (Q/DQ nodes); "
                              "quantize it first (implicit INT8 calibration is deprecated/removed in TensorRT)")
        return [trt.BuilderFlag.INT8, trt.BuilderFlag.FP16] if weak_typing else []
    if precision == "fp16":
        if weak_typing:
            return [trt.BuilderFlag.FP16]
        if not _is_fp16(model):
            raise ConfigError(f"TensorRT {trt.__version__} builds strongly typed networks only: convert the ONNX "
                              "model to fp16 first (e.g. ModelOpt AutoCast) or use an fp32 profile")
    return []


def _parse(parser, onnx_path: Path) -> None:
    if parser.parse_from_file(str(onnx_path)):
        return
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        lines.append(f"  node {err.node()} ({err.node_name() or '?'}, {err.node_operator() or '?'}): {err.desc()}")
    raise ExportValidationError(f"TensorRT's ONNX parser rejected {onnx_path} with {parser.num_errors} error(s):\n"
                                + "\n".join(lines))


def default_timing_cache(trt) -> Path:
    """Per TensorRT version and GPU: tactic timings are only valid for the pair that measured them."""
    key = "".join(c if c.isalnum() else "-" for c in f"{trt.__version__}-{gpu_name()}")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeslim" / f"trt-timing-{key}.cache"


def to_tensorrt(onnx_path: str | Path, profile: Profile | str, path: str | Path,
                dims: Mapping[str, int | tuple[int, int, int]] | None = None,
                workspace_mib: int | None = None, timing_cache: str | Path | None = None) -> Path:
    """Build and write a serialized TensorRT engine (.engine/.plan) for `profile`, plus its JSON sidecar.

    Args:
        onnx_path: the ONNX model (external data next to it is read by the parser). For int8 it must
            hold Q/DQ nodes (edgeslim compress -m int8); for fp16 on TensorRT 11, fp16 weights
            (edgeslim export --precision fp16).
        profile: a tensorrt profile (Profile or name), e.g. "cuda-trt-fp16" or "cuda-trt-int8".
        path: where the engine goes; written to a temporary file, then moved into place.
        dims: sizes of named dynamic dimensions other than the batch (see engine_shapes).
        workspace_mib: builder workspace limit; default the profile's `workspace_mib`.
        timing_cache: tactic timing cache file, read when present and written back after the build
            (default: one per TensorRT version and GPU under ~/.cache/edgeslim).

    Returns:
        The engine path. Beside it, `<engine>.json` records the TensorRT version, GPU, precision,
        optimization-profile shapes and the ONNX file's SHA-256; TensorRTSession refuses an engine
        whose sidecar does not match the TensorRT and GPU at hand.

    Raises:
        MissingDependencyError: TensorRT or CUDA is absent.
        ConfigError: wrong profile, a dynamic dimension without a size, a precision the model cannot take.
        ExportValidationError: the parser rejects the model (every parser error listed) or the build fails.
    """
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    if profile.runtime != "tensorrt":
        raise ConfigError(f"profile '{profile.name}' runs '{profile.runtime}'; a TensorRT engine needs a "
                          "'tensorrt' profile such as cuda-trt-fp16")
    onnx_path, path = Path(onnx_path), Path(path)
    check_output(path, ENGINE)
    shapes = engine_shapes(onnx_path, profile, dims)
    model = _load_graph(onnx_path)
    trt = import_tensorrt()
    require_cuda(profile)
    flags = _precision_flags(trt, model, profile.precision)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10+
    parser = trt.OnnxParser(network, logger)
    _parse(parser, onnx_path)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, (workspace_mib or profile.workspace_mib) << 20)
    for flag in flags:
        config.set_flag(flag)
    cache_file = Path(timing_cache) if timing_cache else default_timing_cache(trt)
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in shapes:
            raise ConfigError(f"TensorRT network input '{name}' is not an ONNX graph input {sorted(shapes)}")
        opt_profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(opt_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportValidationError(f"TensorRT could not build an engine from {onnx_path} for profile "
                                    f"'{profile.name}' (see the TensorRT log above)")
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_bytes(memoryview(config.get_timing_cache().serialize()))
    with replace_output(path, ENGINE) as tmp:
        with open(tmp, "wb") as f:
            f.write(memoryview(serialized))
    write_sidecar(path, {"tensorrt": trt.__version__, "gpu": gpu_name(), "precision": profile.precision,
                         "profile": profile.name, "shapes": {k: [list(s) for s in v] for k, v in shapes.items()},
                         "workspace_mib": workspace_mib or profile.workspace_mib, "onnx": str(onnx_path),
                         "onnx_sha256": sha256_file(onnx_path)})
    return path
