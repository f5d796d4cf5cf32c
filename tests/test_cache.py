"""The local cache of converted models: relocatable root, built once, list and clear (API and CLI)."""
import json
from pathlib import Path

import pytest

from edgeslim import cache
from edgeslim.cli import main
from edgeslim.core.errors import ConfigError
from edgeslim.core.files import OWNER


def test_entry_built_once_listed_and_cleared(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGESLIM_CACHE", str(tmp_path / "c"))
    assert cache.root() == tmp_path / "c" and cache.list_entries() == []
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "model.safetensors").write_bytes(b"x" * 10)

    path = cache.entry("m1", build)
    assert cache.entry("m1", build) == path and len(calls) == 1  # cached: not rebuilt
    assert (path / "model.safetensors").is_file()

    def broken(folder):
        (folder / "half").write_text("partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cache.entry("m2", broken)
    on_disk = 10 + (path / OWNER).stat().st_size  # the weights and edgeslim's ownership record
    assert [(e.name, e.size_bytes) for e in cache.list_entries()] == [("m1", on_disk)]  # nothing half-written
    with pytest.raises(ConfigError, match="plain folder name"):
        cache.entry("../x", build)
    assert main(["cache", "list"]) == 0 and "m1" in capsys.readouterr().out
    assert main(["cache", "list", "--json"]) == 0
    assert [(e["name"], e["size_bytes"]) for e in json.loads(capsys.readouterr().out)["entries"]] == [("m1", on_disk)]
    assert main(["cache", "clear", "nope"]) == 2
    assert main(["cache", "clear"]) == 0 and cache.list_entries() == []


def test_clear_removes_only_what_edgeslim_wrote(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGESLIM_CACHE", str(tmp_path))  # a cache root that also holds the user's own folders
    path = cache.entry("m1", lambda folder: (folder / "model.safetensors").write_bytes(b"x"))
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "model.safetensors").write_bytes(b"looks like an entry")  # not written by edgeslim
    grown = tmp_path / "m2"  # an entry edgeslim wrote, with a file the user added since
    cache.entry("m2", lambda folder: (folder / "model.safetensors").write_bytes(b"y"))
    (grown / "notes.txt").write_text("mine")
    assert [e.name for e in cache.list_entries()] == ["m1"]
    capsys.readouterr()
    assert main(["cache", "clear", "photos"]) == 2 and "left alone" in capsys.readouterr().err
    assert main(["cache", "clear"]) == 0
    assert not path.exists() and (mine / "model.safetensors").is_file() and (grown / "notes.txt").is_file()


def test_profiling_an_artifact_exports_it_once(in_tmp, monkeypatch):
    from edgeslim import pipeline

    monkeypatch.setenv("EDGESLIM_CACHE", str(in_tmp / "cache"))
    assert main(["compress", "tiny-mlp", "-m", "svd", "--rank", "4", "--set", "align=4", "-o", "m.slim"]) == 0
    exports = []
    real = pipeline.export_model
    monkeypatch.setattr(pipeline, "export_model", lambda *a, **k: exports.append(a[2]) or real(*a, **k))
    for _ in range(2):
        assert main(["profile", "m.slim", "--batch", "1", "--iters", "2", "--warmup", "0"]) == 0
    assert len(exports) == 1  # the second profile reads the cached export
    assert [e.name for e in cache.list_entries()] == [Path(exports[0]).parent.name]
    assert main(["compress", "tiny-mlp", "-m", "svd", "--rank", "2", "--set", "align=2", "-o", "n.slim"]) == 0
    assert main(["profile", "n.slim", "--batch", "1", "--iters", "2", "--warmup", "0"]) == 0
    assert len(exports) == 2  # another artifact, another export


def test_upscaling_with_an_artifact_exports_it_once(in_tmp, monkeypatch):
    """`upscale --model X.slim` (an INT8 one: quantized in its ONNX graph) reads the export `profile` caches."""
    import numpy as np

    from edgeslim import images, pipeline

    monkeypatch.setenv("EDGESLIM_CACHE", str(in_tmp / "cache"))
    images.write_image("lr.png", np.random.default_rng(0).integers(0, 256, (12, 14, 3)).astype(np.uint8))
    exports = []
    real = pipeline.export_model
    monkeypatch.setattr(pipeline, "export_model", lambda *a, **k: exports.append(a[2]) or real(*a, **k))
    # compress measures its agreement on what the artifact deploys: the INT8 graph, exported into the cache
    assert main(["compress", "espcn-x2", "-m", "int8", "--calib", "random:4", "-o", "q.slim"]) == 0
    assert len(exports) == 1
    for out in ("a.png", "b.png"):
        assert main(["upscale", "lr.png", "-o", out, "--model", "q.slim", "--tile", "0"]) == 0
    assert len(exports) == 1  # both upscales run the cached graph
    assert np.array_equal(images.read_image("a.png"), images.read_image("b.png"))
    assert main(["profile", "q.slim", "--batch", "1", "--iters", "2", "--warmup", "0", "--dim", "height=8",
                 "--dim", "width=8"]) == 0
    assert len(exports) == 1  # profile on the default target reads the same export


def test_cache_lists_and_clears_the_measured_limits(tmp_path, monkeypatch, capsys):
    """The peaks and GEMM tables (runtime/peak.py) are listed with their age and load; `clear limits` forgets them."""
    from edgeslim.runtime import peak

    monkeypatch.setenv("EDGESLIM_CACHE", str(tmp_path / "models"))
    monkeypatch.setenv("EDGESLIM_CACHE_DIR", str(tmp_path / "limits"))
    peak.store_gemm("cpu-a|ort|threads=2", {"8x8x8": 0.01, "16x16x16": 0.02})
    peak._write_cache({**peak._read_cache(), "peak": {"cpu-b|ort|threads=2": {
        "fp32_gflops": 100.0, "int8_gops": None, "mem_gbps": 20.0, "load_avg": [0.4], "measured_at": "2026-12-07T00:00:00Z"}}})
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "cpu-a|ort|threads=2: no peak; 2 GEMM shapes timed" in out
    assert "cpu-b|ort|threads=2: peak measured 2026-12-07T00:00:00Z at load 0.40; 0 GEMM shapes timed" in out
    assert main(["cache", "list", "--json"]) == 0
    assert {r["machine"]: r["gemm_shapes"] for r in json.loads(capsys.readouterr().out)["limits"]} == {
        "cpu-a|ort|threads=2": 2, "cpu-b|ort|threads=2": 0}
    assert main(["cache", "clear"]) == 0 and peak.cache_path().is_file()  # entries only: limits need their name
    assert main(["cache", "clear", "limits"]) == 0 and not peak.cache_path().exists()
    assert peak.cached_limits() == []


def test_only_the_newest_exports_are_kept(monkeypatch, tmp_path):
    import os

    monkeypatch.setenv("EDGESLIM_CACHE", str(tmp_path))
    for i in range(4):
        path = cache.entry(f"export-{i}", lambda tmp: (tmp / "model.onnx").write_bytes(b"x" * i), kind=cache.EXPORT)
        os.utime(path, (1000 + i, 1000 + i))
    (tmp_path / "export-foreign").mkdir()  # not edgeslim's: never removed
    assert sorted(cache.keep_newest("export-", 2)) == ["export-0", "export-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export-2", "export-3", "export-foreign"]
