"""Memory of an inference measured in a fresh child process: what the inference holds, not growth in a
warm parent that has other models, arenas and libraries resident.

The child opens the model file itself (nothing is pickled: the feeds travel as an .npz read with
`allow_pickle=False`, the request and the answer as JSON files), imports only the runtime the file
needs (an ONNX file never imports torch, like a bare ONNX Runtime script), and records
- `baseline_rss_bytes`: resident memory after the imports, before the session opens;
- `loaded_rss_bytes`: after the session opened (weights resident, graph optimized);
- `peak_rss_bytes`: the child's peak resident set over its whole life (VmHWM, the figure
  `/usr/bin/time -v` reports as maximum resident set size), runs included.
A child that dies (a runtime crash, the kernel's out-of-memory killer, a timeout) is reported as an
`InferenceCrashError` that says how it died, and the caller (the profiler) carries on with the next
measurement instead of dying with it.

    python -I -c "...; main([REQUEST.json])"     # what the parent runs (see _command); not a user command
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edgeslim.core import errors
from edgeslim.core.errors import EdgeslimError, InferenceCrashError

CHILD_TIMEOUT_S = 900
_REPORTED = ("ConfigError", "SourceError", "MissingDependencyError")  # re-raised as themselves in the parent


@dataclass(frozen=True)
class ChildMemory:
    """Resident memory of one model's inference in its own process (bytes)."""

    baseline_rss_bytes: int  # interpreter + runtime libraries, before the session opens
    loaded_rss_bytes: int  # after the session opened
    peak_rss_bytes: int  # peak over the child's life (VmHWM), the runs included
    runs: int  # calls made (warm-up included)
    method: str  # how the figures were read
    runtime: dict[str, Any]  # runtime settings that change memory (ORT arena, threads, provider)

    @property
    def weights_resident_bytes(self) -> int:
        return max(0, self.loaded_rss_bytes - self.baseline_rss_bytes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"weights_resident_bytes": self.weights_resident_bytes}


_BOOT = ("import sys; sys.path[:] = sys.argv[1].split('\\n'); "
         "from edgeslim.runtime.child import main; sys.exit(main(sys.argv[2:]))")


def _command(request: Path) -> list[str]:
    """The child's command line: isolated (`-I`: no current folder, script folder, PYTHON* variables or user
    site on sys.path) with the parent's absolute import path minus the current folder, so that a `json.py`
    in the folder edgeslim is run from, or beside a model, is never imported."""
    here = Path.cwd().resolve()
    path = [p for p in sys.path if p and Path(p).is_absolute() and Path(p).resolve() != here]
    return [sys.executable, "-I", "-c", _BOOT, "\n".join(path), str(request)]


def _how_it_died(code: int, stderr: str) -> str:
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        cause = {"SIGKILL": " (the usual cause: the kernel's out-of-memory killer)",
                 "SIGSEGV": " (a crash inside the runtime)", "SIGABRT": " (the runtime aborted)"}.get(name, "")
        how = f"was killed by {name}{cause}"
    else:
        how = f"exited with status {code}"
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    return how + (f"; its last words: {last[:300]}" if last else "")


def child_memory(model: str | Path, profile: str | Path, feeds: Mapping[str, np.ndarray], warmup: int = 1,
                 iters: int = 2, timeout_s: float = CHILD_TIMEOUT_S) -> ChildMemory:
    """Run `model` (an .onnx or engine file) on `feeds` in a fresh process on `profile` and read its memory.

    Args:
        profile: a shipped profile name or a TOML path (the child loads it itself).
        warmup, iters: calls the child makes (the peak is reached in the first one or two).

    Raises:
        InferenceCrashError: the child died (signal, nonzero exit, timeout): the message says how.
        ConfigError, SourceError, MissingDependencyError: what the child itself refused (a bad file).
    """
    with tempfile.TemporaryDirectory(prefix="edgeslim-child-") as tmp:
        folder = Path(tmp)
        np.savez(folder / "feeds.npz", **{k: np.ascontiguousarray(v) for k, v in feeds.items()})
        profile = Path(profile).resolve() if Path(profile).is_file() else profile  # the child runs elsewhere
        result = _run_child(folder, {"model": str(Path(model).resolve()), "profile": str(profile),
                                     "feeds": str(folder / "feeds.npz"), "calls": warmup + iters},
                            f"the child process measuring {Path(model).name}", timeout_s)
    return ChildMemory(**result)


def _run_child(folder: Path, request: dict[str, Any], what: str, timeout_s: float) -> dict[str, Any]:
    """Write `request` in `folder`, run the child on it, return its answer (or raise how it failed)."""
    path, answer = folder / "request.json", folder / "answer.json"
    path.write_text(json.dumps(request | {"answer": str(answer)}))
    try:
        done = subprocess.run(_command(path), capture_output=True, text=True, timeout=timeout_s, cwd=folder)
    except subprocess.TimeoutExpired as exc:
        raise InferenceCrashError(f"{what} ran past {timeout_s:.0f} s and was stopped") from exc
    result = json.loads(answer.read_text()) if answer.is_file() else None
    if result is not None and "error" in result:
        cls = getattr(errors, result["error"]) if result["error"] in _REPORTED else InferenceCrashError
        raise cls(f"{what}: {result['message']}")
    if done.returncode != 0 or result is None:
        raise InferenceCrashError(f"{what} {_how_it_died(done.returncode, done.stderr)}")
    return result


def child_lm(model: str | Path, prompts: Sequence[int], new_tokens: int, batches: Sequence[int] = (1,),
             threads: int | None = None, repeats: int = 3, timeout_s: float = CHILD_TIMEOUT_S) -> dict[str, Any]:
    """A causal LM's cache graph measured in a fresh process (runtime/lm_timing.py): {"rows": [...], "memory":
    ChildMemory fields}; the peak is the child's whole life (weights + cache at the longest prompt and batch).

    Raises:
        InferenceCrashError: the child died. ConfigError, SourceError: what it refused (not a cache graph).
    """
    with tempfile.TemporaryDirectory(prefix="edgeslim-child-") as tmp:
        result = _run_child(Path(tmp), {"model": str(Path(model).resolve()), "lm": {
            "prompts": list(prompts), "new_tokens": new_tokens, "batches": list(batches), "threads": threads,
            "repeats": repeats}}, f"the child process measuring {Path(model).name}", timeout_s)
    return result


def _serve_lm(request: Mapping[str, Any]) -> dict[str, Any]:
    """The child's side of `child_lm`."""
    import onnxruntime  # noqa: F401  (loaded before the baseline, as a bare script has it)

    from edgeslim.runtime.kv_decoder import open_cache_graph
    from edgeslim.runtime.lm_timing import lm_timings
    from edgeslim.runtime.memory import MemoryProbe

    lm = request["lm"]
    probe = MemoryProbe("rss")
    baseline = probe.current()
    graph = open_cache_graph(request["model"], lm["threads"])
    loaded = probe.current()
    rows = lm_timings(graph, lm["prompts"], lm["new_tokens"], lm["batches"], lm["repeats"])
    memory = {"baseline_rss_bytes": baseline, "loaded_rss_bytes": loaded, "peak_rss_bytes": probe.peak(),
              "runs": len(rows), "method": "VmHWM of a fresh child process (its whole life)",
              "runtime": {"runtime": "onnxruntime", "provider": "CPUExecutionProvider", "threads": lm["threads"]}}
    return {"rows": rows, "memory": memory}


def _serve(request: Mapping[str, Any]) -> dict[str, Any]:
    """The child's side: open, run, read memory (runs in the child process only)."""
    from edgeslim.runtime.memory import MemoryProbe
    from edgeslim.runtime.targets import load_profile

    prof = load_profile(request["profile"])
    path = Path(request["model"])
    if path.suffix == ".onnx":
        import onnxruntime  # noqa: F401  (loaded before the baseline, as a bare script has it)

        from edgeslim.runtime.ort_session import OrtSession as opener
    else:
        from edgeslim.runtime.trt_session import TensorRTSession as opener
    with np.load(request["feeds"], allow_pickle=False) as data:
        feeds = {k: data[k] for k in data.files}
    probe = MemoryProbe("rss")
    baseline = probe.current()
    session = opener(path, prof)
    loaded = probe.current()
    for _ in range(int(request["calls"])):
        session.run(feeds)
    peak = probe.peak()  # never reset: the whole life of the child
    runtime = {"runtime": prof.runtime, "provider": prof.provider, "threads": prof.threads}
    if path.suffix == ".onnx":  # the ORT settings that decide how much memory its arena keeps
        options = session.session_options()
        runtime |= {"cpu_mem_arena": options.enable_cpu_mem_arena, "mem_pattern": options.enable_mem_pattern}
    session.close()
    return {"baseline_rss_bytes": baseline, "loaded_rss_bytes": loaded, "peak_rss_bytes": peak,
            "runs": int(request["calls"]), "method": "VmHWM of a fresh child process (its whole life)",
            "runtime": runtime}


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text())
    try:
        out = _serve_lm(request) if "lm" in request else _serve(request)
    except EdgeslimError as exc:
        out = {"error": type(exc).__name__, "message": " ".join(str(exc).split())}
    Path(request["answer"]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
