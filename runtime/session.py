"""Sessions: one way to run a model per runtime, chosen by the target profile.

Every session takes and returns numpy arrays by input/output name, so the profiler and the
export checks treat PyTorch, ONNX Runtime and TensorRT alike. A session records the memory in use
just before its first call (weights loaded, nothing run yet) as `baseline_mem_bytes`; the profiler
reports growth over it. Taking it at the first call rather than at opening keeps out what the
process allocated in between (another session opened beside it).
"""
from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from edgeslim.core.errors import ConfigError, SourceError
from edgeslim.runtime.session_base import BaseSession, Session, check_file, require_cuda  # noqa: F401 (re-exported)
from edgeslim.runtime.targets import Profile, load_profile
from edgeslim.runtime.ort_session import OrtSession
from edgeslim.runtime.trt_session import TensorRTSession

ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan")
DEFAULT_PROFILE = {"module": "cpu-torch-fp32", ".onnx": "cpu-ort-fp32", ".engine": "cuda-trt-fp16", ".plan": "cuda-trt-fp16"}


def _forward_params(model: nn.Module) -> tuple[list[str], list[str]]:
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [p.name for p in params], [p.name for p in params if p.default is p.empty]


class TorchSession(BaseSession):
    """PyTorch eager: `model(**feeds)` under inference_mode, on the profile's device and precision.

    The caller's module is never changed: a copy is moved to CUDA / cast to fp16 / put in eval mode
    when needed. fp16 casts weights and float inputs to half (model.half()), outputs back to fp32.
    torch's intra-op thread count is process-wide: the profile's `threads` is set at the first run
    and the previous count restored by close() (changing it per call costs milliseconds).

    With `cuda_graph` (a CUDA profile), the forward pass is captured once per input shape as a CUDA
    graph (torch.cuda.CUDAGraph, after warm-up calls on a side stream) and each run copies the feeds
    into the graph's static inputs and replays it: kernel launches cost one call, not one per op.
    """

    def __init__(self, model: nn.Module, profile: Profile, inputs: Sequence[str] | None = None,
                 cuda_graph: bool = False) -> None:
        if profile.runtime != "torch":
            raise ConfigError(f"TorchSession needs a 'torch' profile, got '{profile.name}' ({profile.runtime})")
        self.profile, self.device = profile, profile.device
        if cuda_graph and self.device != "cuda":
            raise ConfigError(f"CUDA graphs need a CUDA profile; '{profile.name}' runs on {self.device}")
        if self.device == "cuda":
            require_cuda(profile)
        self._graphs: dict[tuple, tuple[Any, dict[str, torch.Tensor], Any]] | None = {} if cuda_graph else None
        self.memory_kind = "torch-cuda" if self.device == "cuda" else "rss"
        self._half = profile.precision == "fp16"
        if self.device != "cpu" or self._half or model.training:
            model = copy.deepcopy(model).eval().to(self.device)
            if self._half:
                model = model.half()
        self._model = model
        names, self._required = _forward_params(model)
        self.inputs = list(inputs) if inputs is not None else names
        self._threads_before: int | None = None

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Call the model once; outputs are named "output" (one tensor) or "output_0", "output_1", ..."""
        tensors = {}
        for name, array in feeds.items():
            t = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
            tensors[name] = t.half() if self._half and t.is_floating_point() else t
        if self.profile.threads and self._threads_before is None:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.profile.threads)
        if self._graphs is not None:
            out = self._replay(tensors)
        else:
            with torch.inference_mode():
                out = self._model(**tensors)
        if isinstance(out, torch.Tensor):
            return {"output": _to_numpy(out)}
        if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
            return {f"output_{i}": _to_numpy(o) for i, o in enumerate(out)}
        raise ConfigError(f"the model returned {type(out).__name__}; a session needs a tensor or a tuple of tensors")

    def _replay(self, tensors: dict[str, torch.Tensor]) -> Any:
        """Run through the CUDA graph captured for these input shapes (captured on first sight)."""
        key = tuple((n, tuple(t.shape), t.dtype) for n, t in sorted(tensors.items()))
        if key not in self._graphs:
            static = {n: t.clone() for n, t in tensors.items()}
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(3):  # warm-up outside the graph (allocator, cuBLAS workspaces)
                    self._model(**static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                out = self._model(**static)
            self._graphs[key] = (graph, static, out)
        graph, static, out = self._graphs[key]
        for name, t in tensors.items():
            static[name].copy_(t)
        graph.replay()
        return out

    def synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def close(self) -> None:
        self._model = None
        self._graphs = {} if self._graphs is not None else None
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.cpu().numpy()


def open_session(model_or_path: nn.Module | str | Path, profile: Profile | str | None = None,
                 inputs: Sequence[str] | None = None, cuda_graph: bool = False) -> Session:
    """Open a session for an nn.Module, an ONNX file or a TensorRT engine on a target profile.

    Args:
        model_or_path: an nn.Module (runtime "torch"), a .onnx file (runtime "onnxruntime") or a
            .engine/.plan file (runtime "tensorrt").
        profile: a Profile, a shipped profile name or a TOML path; None picks cpu-torch-fp32 for a
            module, cpu-ort-fp32 for .onnx, cuda-trt-fp16 for an engine.
        inputs: input names of an nn.Module when its forward signature does not say them.
        cuda_graph: an nn.Module on a CUDA profile runs as captured CUDA graphs (TorchSession).

    Raises:
        SourceError: the file is missing or the runtime cannot load it.
        ConfigError: the profile's runtime cannot run this kind of model (the message says how to get one).
        MissingDependencyError: the runtime, its provider or CUDA is absent.
    """
    if isinstance(model_or_path, nn.Module):
        kind = "module"
    else:
        path = Path(model_or_path)
        kind = path.suffix.lower()
        if kind not in ONNX_SUFFIXES + ENGINE_SUFFIXES:
            check_file(path)
            raise SourceError(f"cannot tell the runtime for {path}: suffix '{path.suffix}' is not one of "
                              f"{list(ONNX_SUFFIXES + ENGINE_SUFFIXES)}")
    if profile is None:
        profile = DEFAULT_PROFILE[kind]
    if not isinstance(profile, Profile):
        profile = load_profile(profile)
    needs = {"module": "torch", ".onnx": "onnxruntime"}.get(kind, "tensorrt")
    if profile.runtime != needs:
        how = {"onnxruntime": "export it to ONNX first (edgeslim.export.onnx.to_onnx)",
               "tensorrt": "build an engine first (edgeslim.export.tensorrt.to_tensorrt)",
               "torch": "open the nn.Module itself"}[profile.runtime]
        what = "an nn.Module" if kind == "module" else f"a '{kind}' file"
        raise ConfigError(f"profile '{profile.name}' runs '{profile.runtime}', which cannot open {what}: {how}")
    if kind == "module":
        return TorchSession(model_or_path, profile, inputs, cuda_graph)
    if kind in ONNX_SUFFIXES:
        return OrtSession(path, profile)
    return TensorRTSession(path, profile)


class OrtModule(nn.Module):
    """An ONNX file run in ONNX Runtime behind the nn.Module interface `model(**feeds) -> tensor`.

    What code written for torch models (upscaling, output comparisons) uses to run a model whose
    deployed form exists only as ONNX (an INT8 QDQ graph). Inference only: no gradients, CPU tensors.
    """

    def __init__(self, path: str | Path, profile: Profile | str = "cpu-ort-fp32") -> None:
        super().__init__()
        self.path = Path(path)
        self._session = OrtSession(self.path, profile if isinstance(profile, Profile) else load_profile(profile))

    def forward(self, **feeds: torch.Tensor) -> torch.Tensor:
        out = self._session.run({k: v.detach().cpu().numpy() for k, v in feeds.items()})
        values = [torch.from_numpy(np.ascontiguousarray(v)) for v in out.values()]
        return values[0] if len(values) == 1 else tuple(values)
