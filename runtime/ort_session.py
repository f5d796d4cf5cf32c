"""ONNX Runtime session. Imports no torch, so a child process that measures an ONNX file's memory
(runtime/child.py) holds what a bare ONNX Runtime script holds."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeslim.core.errors import ConfigError, InferenceCrashError, MissingDependencyError, SourceError
from edgeslim.runtime.session_base import BaseSession, check_file
from edgeslim.runtime.targets import Profile

_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OrtSession(BaseSession):
    """ONNX Runtime InferenceSession with the profile's execution provider and intra-op threads."""

    def __init__(self, path: str | Path, profile: Profile) -> None:
        import onnxruntime as ort

        if profile.runtime != "onnxruntime":
            raise ConfigError(f"OrtSession needs an 'onnxruntime' profile, got '{profile.name}' ({profile.runtime})")
        self.profile, self.device, self.path = profile, profile.device, Path(path)
        check_file(self.path)
        available = ort.get_available_providers()
        if profile.provider not in available:
            hint = "pip install 'edgeslim[gpu]' (onnxruntime-gpu, replaces onnxruntime) and the CUDA libraries" \
                if profile.provider != "CPUExecutionProvider" else "reinstall onnxruntime"
            raise MissingDependencyError(f"profile '{profile.name}' needs ONNX Runtime's {profile.provider}, "
                                         f"which this onnxruntime lacks (has {available}): {hint}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = profile.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        providers = [profile.provider] + (["CPUExecutionProvider"] if profile.provider != "CPUExecutionProvider" else [])
        try:
            self._sess = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own pybind classes (InvalidProtobuf, Fail, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SourceError(f"ONNX Runtime cannot load {self.path}: {first}") from exc
        self.inputs = [i.name for i in self._sess.get_inputs()]
        self._float_type = {i.name: _ORT_FLOAT.get(i.type) for i in self._sess.get_inputs()}
        self.outputs = [o.name for o in self._sess.get_outputs()]
        gpu = self.device == "cuda" and "CUDAExecutionProvider" in self._sess.get_providers()
        self.memory_kind = "cuda-process" if gpu else "rss"
        self._required = self.inputs

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; float feeds are cast to the model's declared float type (fp32 or fp16)."""
        cast = {n: a.astype(self._float_type[n], copy=False)
                if self._float_type[n] is not None and a.dtype.kind == "f" else a for n, a in feeds.items()}
        try:
            return dict(zip(self.outputs, self._sess.run(None, cast)))
        except Exception as exc:  # noqa: BLE001  (ORT raises its own pybind classes: InvalidArgument, Fail, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            shapes = ", ".join(f"{n} {list(a.shape)}" for n, a in feeds.items())
            raise InferenceCrashError(f"ONNX Runtime failed running {self.path.name} on inputs {shapes}: "
                                      f"{first[:300]}") from exc

    def session_options(self) -> Any:
        """ONNX Runtime's SessionOptions of this session (arena and memory-pattern settings, threads)."""
        return self._sess.get_session_options()

    def close(self) -> None:
        self._sess = None
