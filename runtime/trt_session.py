"""TensorRT engine session (TensorRT 10/11 Python API), with device buffers held as torch CUDA tensors.

Written against the name-based I/O API of TensorRT 10+ (num_io_tensors, get_tensor_name,
set_input_shape, set_tensor_address, execute_async_v3). TensorRT cannot be installed in the
workplace this was written in, so this path is tested only where `tensorrt` imports (tests marked
`tensorrt`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from edgeslim.core.errors import ConfigError, EdgeslimError, MissingDependencyError, SourceError
from edgeslim.runtime.session_base import BaseSession, check_file, require_cuda
from edgeslim.runtime.targets import Profile


def import_tensorrt():
    """Import tensorrt (major version 10 or later) or raise MissingDependencyError saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingDependencyError(
            "TensorRT is not installed: pip install 'edgeslim[tensorrt]' (wheels come from NVIDIA's package "
            "index and need a CUDA GPU); use an onnxruntime profile instead where it cannot be installed") from exc
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        raise MissingDependencyError(f"TensorRT {trt.__version__} is too old: edgeslim uses the TensorRT 10+ API "
                                     "(pip install 'edgeslim[tensorrt]')")
    return trt


def sidecar_path(engine: str | Path) -> Path:
    """The JSON file beside an engine that says what it was built for (`m.engine` -> `m.engine.json`)."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def gpu_name() -> str:
    """The current CUDA device's name and compute capability, as engines are keyed by it."""
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"


def check_sidecar(engine: str | Path, tensorrt_version: str, gpu: str, precision: str | None = None) -> dict[str, Any]:
    """Read an engine's sidecar and refuse an engine this TensorRT / GPU / profile cannot use.

    TensorRT engines are tied to the TensorRT version and the GPU model they were built with;
    deserializing another one fails obscurely or not at all, so it is refused here first.

    Raises:
        SourceError: no sidecar, an unreadable one, or a TensorRT version, GPU or precision that differs
            (both values named, and how to rebuild).
    """
    path = sidecar_path(engine)
    rebuild = f"rebuild it: edgeslim export MODEL --to tensorrt -o {Path(engine).name}"
    if not path.is_file():
        raise SourceError(f"{engine} has no sidecar {path.name} saying which TensorRT and GPU built it; {rebuild}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise SourceError(f"cannot read the engine sidecar {path}: {exc}") from exc
    checks: list[tuple[str, Any, Any]] = [("TensorRT version", meta.get("tensorrt"), tensorrt_version),
                                          ("GPU", meta.get("gpu"), gpu)]
    if precision is not None:
        checks.append(("precision", meta.get("precision"), precision))
    for what, built, here in checks:
        if built != here:
            raise SourceError(f"{engine} is stale: built for {what} {built!r}, but this is {here!r}; {rebuild}")
    return meta


def write_sidecar(engine: str | Path, meta: Mapping[str, Any]) -> Path:
    """Write the sidecar of `engine` (atomically)."""
    from edgeslim.core.files import JSON, replace_output
    path = sidecar_path(engine)
    with replace_output(path, JSON) as tmp:
        tmp.write_text(json.dumps(dict(meta), indent=2))
    return path


def _torch_dtype(trt, data_type) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=trt.nptype(data_type))).dtype


class TensorRTSession(BaseSession):
    """A deserialized engine and one execution context, run on torch's current CUDA stream.

    The execution context (which holds TensorRT's activation scratch memory) is created at the
    first run, so the profiler's memory growth includes it; memory is read as used device memory.
    """

    def __init__(self, path: str | Path, profile: Profile) -> None:
        if profile.runtime != "tensorrt":
            raise ConfigError(f"TensorRTSession needs a 'tensorrt' profile, got '{profile.name}' ({profile.runtime})")
        trt = import_tensorrt()
        require_cuda(profile)
        self.profile, self.device, self.path, self._trt = profile, "cuda", Path(path), trt
        check_file(self.path)
        check_sidecar(self.path, trt.__version__, gpu_name(), profile.precision)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise SourceError(f"TensorRT cannot deserialize {self.path}: the file is corrupt or was built by "
                              f"another TensorRT version or GPU (this is TensorRT {trt.__version__})")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self._dtype = {n: _torch_dtype(trt, self._engine.get_tensor_dtype(n)) for n in names}
        self._context = None
        self.memory_kind = "cuda-process"
        self._required = self.inputs

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy feeds to the GPU, set their shapes, execute, copy the outputs back."""
        if self._context is None:
            self._context = self._engine.create_execution_context()
        keep = []  # the tensors whose addresses the context holds, alive until the run finishes
        for name in self.inputs:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to("cuda", dtype=self._dtype[name])
            if not self._context.set_input_shape(name, tuple(t.shape)):
                lo, _, hi = self._engine.get_tensor_profile_shape(name, 0)
                raise ConfigError(f"input '{name}' shape {tuple(t.shape)} is outside the engine's optimization "
                                  f"profile (min {tuple(lo)}, max {tuple(hi)}); rebuild it with other shapes")
            self._context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        outputs = {}
        for name in self.outputs:
            shape = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ConfigError(f"output '{name}' has a data-dependent shape {shape}, which this session "
                                  "does not support")
            outputs[name] = torch.empty(shape, dtype=self._dtype[name], device="cuda")
            self._context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise EdgeslimError(f"TensorRT execution of {self.path} failed (see the TensorRT log above)")
        stream.synchronize()
        return {n: (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).cpu().numpy()
                for n, t in outputs.items()}

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def close(self) -> None:
        self._context = self._engine = self._runtime = None
