"""Memory measured in a fresh child process, and the crash path: a child that dies is reported, not fatal."""
import sys

import numpy as np
import pytest

from edgeslim.core.errors import InferenceCrashError, SourceError
from edgeslim.runtime import child
from edgeslim.runtime.child import child_memory


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    import torch

    from edgeslim.export.onnx import to_onnx
    from edgeslim.core.specs import TensorSpec

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))
    path = tmp_path_factory.mktemp("child") / "m.onnx"
    to_onnx(model.eval(), [TensorSpec("input", ("batch", 256))], path)
    return path


def feeds(batch=4):
    return {"input": np.random.default_rng(0).standard_normal((batch, 256)).astype(np.float32)}


def test_child_reads_baseline_load_and_peak(onnx_file):
    mem = child_memory(onnx_file, "cpu-ort-fp32", feeds(), warmup=1, iters=2)
    assert 0 < mem.baseline_rss_bytes <= mem.loaded_rss_bytes <= mem.peak_rss_bytes
    weights = (256 * 1024 + 1024 + 1024 * 256 + 256) * 4  # ~2.1 MB of fp32 weights
    assert mem.weights_resident_bytes >= weights // 2  # the session holds (at least most of) its weights
    assert mem.runs == 3 and mem.runtime["threads"] == 2 and "child" in mem.method
    assert set(mem.to_dict()) >= {"peak_rss_bytes", "weights_resident_bytes", "runtime"}


def test_child_for_an_onnx_file_does_not_import_torch():
    import subprocess
    code = "import sys, edgeslim.runtime.child, edgeslim.runtime.ort_session; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_child_never_imports_from_the_current_or_the_model_folder(onnx_file, in_tmp, monkeypatch):
    """A `json.py` (or any module) where edgeslim runs, or beside the model, is not on the child's path."""
    evil = "import pathlib; pathlib.Path({!r}).write_text('ran'); raise SystemExit(9)\n"
    for folder in (in_tmp, onnx_file.parent):
        for name in ("json.py", "numpy.py", "edgeslim.py"):
            (folder / name).write_text(evil.format(str(in_tmp / "ran")))
    monkeypatch.setattr(sys, "path", ["", str(in_tmp), *sys.path])  # as under `python -m`, where '' is first
    try:
        mem = child_memory(onnx_file, "cpu-ort-fp32", feeds(), warmup=0, iters=1)
    finally:
        for name in ("json.py", "numpy.py", "edgeslim.py"):
            (onnx_file.parent / name).unlink()
    assert mem.runs == 1 and not (in_tmp / "ran").exists()


@pytest.mark.parametrize("script, message", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", r"was killed by SIGKILL \(the usual cause: the kernel's out-of-memory killer\)"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", r"was killed by SIGSEGV \(a crash inside the runtime\)"),
    ("import sys; sys.stderr.write('std::bad_alloc\\n'); sys.exit(3)", r"exited with status 3; its last words: std::bad_alloc"),
])
def test_a_child_that_dies_is_reported_with_how(onnx_file, monkeypatch, script, message):
    monkeypatch.setattr(child, "_command", lambda request: [sys.executable, "-c", script])
    with pytest.raises(InferenceCrashError, match=message):
        child_memory(onnx_file, "cpu-ort-fp32", feeds())


def test_a_child_past_its_time_is_stopped(onnx_file, monkeypatch):
    monkeypatch.setattr(child, "_command", lambda request: [sys.executable, "-c", "import time; time.sleep(30)"])
    with pytest.raises(InferenceCrashError, match="ran past 1 s and was stopped"):
        child_memory(onnx_file, "cpu-ort-fp32", feeds(), timeout_s=1)


def test_what_the_child_refuses_comes_back_as_its_own_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(SourceError, match="child process measuring bad.onnx: ONNX Runtime cannot load"):
        child_memory(bad, "cpu-ort-fp32", feeds())


def test_profile_goes_on_after_a_batch_whose_child_dies(onnx_file, monkeypatch):
    from edgeslim import pipeline, profiling

    real = child.child_memory

    def dies_at_batch_8(model, profile, f, **kw):
        if next(iter(f.values())).shape[0] == 8:
            raise InferenceCrashError("the child process measuring m.onnx was killed by SIGKILL")
        return real(model, profile, f, **kw)

    monkeypatch.setattr(child, "child_memory", dies_at_batch_8)
    with pipeline.profile_target(onnx_file, "cpu-ort-fp32", quiet=True) as (target, loaded):
        with pytest.warns(RuntimeWarning, match="batch 8: the child process measuring m.onnx was killed by SIGKILL"):
            rows = profiling.profile_file(target, loaded, "cpu-ort-fp32", [1, 8, 2], {}, warmup=0, iters=2)
    assert [r["batch"] for r in rows] == [1, 8, 2]
    assert "crashed" in rows[1] and "p50_ms" not in rows[1]
    assert rows[0]["peak_rss_bytes"] == rows[0]["memory"]["peak_rss_bytes"] > 0 and rows[2]["p50_ms"] > 0
