"""Interleaved timing of several sessions and `edgeslim profile A B C` (ratios to the first, JSON, HTML)."""
import json

import numpy as np
import pytest

from edgeslim.cli import main
from edgeslim.core.errors import ConfigError
from edgeslim.runtime.measure import INTERLEAVED_MEM, interleave


class Recorder:
    """A session that records the order of its calls in a shared log."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def run(self, feeds):
        self.log.append(self.name)
        return {}


def test_interleave_alternates_round_by_round():
    log = []
    feeds = [{"x": np.zeros((2, 3))}, {"x": np.zeros((4, 3))}]
    a, b = interleave([Recorder("a", log), Recorder("b", log)], feeds, warmup=1, iters=5, rounds=2)
    assert log[:2] == ["a", "b"]  # one warm-up call each
    assert log[2:] == ["a"] * 3 + ["b"] * 3 + ["a"] * 2 + ["b"] * 2  # 5 calls split 3 + 2 over 2 rounds
    assert (a.iters, b.iters, a.batch, b.batch) == (5, 5, 2, 4)
    assert a.peak_mem_bytes is None and a.mem_method == INTERLEAVED_MEM


def test_interleave_clamps_rounds_to_iters():
    log = []
    interleave([Recorder("a", log), Recorder("b", log)], [{"x": np.zeros(1)}] * 2, warmup=0, iters=2, rounds=9)
    assert log == ["a", "b", "a", "b"]


@pytest.mark.parametrize("kwargs, message", [
    ({"rounds": 0}, "rounds >= 1"), ({"iters": 0}, "iters >= 1"), ({"feeds": [{"x": np.zeros(1)}]}, "one feeds dict"),
])
def test_interleave_refuses_bad_counts(kwargs, message):
    sessions = [Recorder("a", []), Recorder("b", [])]
    feeds = kwargs.pop("feeds", [{"x": np.zeros(1)}] * 2)
    with pytest.raises(ConfigError, match=message):
        interleave(sessions, feeds, **kwargs)


@pytest.fixture
def two_files(in_tmp):
    assert main(["export", "tiny-mlp", "-o", "orig.onnx"]) == 0
    assert main(["compress", "tiny-mlp", "-m", "svd", "--rank", "4", "--set", "align=4", "-o", "c.slim"]) == 0
    return "orig.onnx", "c.slim"


def test_profile_several_candidates_json_and_html(two_files, in_tmp, capsys):
    capsys.readouterr()
    code = main(["profile", *two_files, "--batch", "1,4", "--iters", "4", "--warmup", "1", "--rounds", "2", "--ops",
                 "--json", "--html", "cmp.html"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out)
    first, second = result["candidates"]
    assert [c["item"] for c in result["candidates"]] == list(two_files) and result["rounds"] == 2
    assert [r["batch"] for r in first["rows"]] == [1, 4] == [r["batch"] for r in second["rows"]]
    for ratio, ref, row in zip(result["ratios"], first["rows"], second["rows"]):
        assert ratio["latency_ratio"] == pytest.approx(row["p50_ms"] / ref["p50_ms"])
        assert ratio["flops_ratio"] < 1  # rank 4 of 16..64 wide layers: less work
        assert row["peak_rss_bytes"] > 0 and sum(row["op_time_share"].values()) == pytest.approx(1)
    assert first["file_bytes"] == (in_tmp / "orig.onnx").stat().st_size
    page = (in_tmp / "cmp.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "orig.onnx" in page and "c.slim" in page


def test_profile_several_candidates_table(two_files, capsys):
    capsys.readouterr()
    assert main(["profile", *two_files, "--batch", "2", "--iters", "2", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "2 candidates on cpu-ort-fp32, interleaved over 5 rounds" in out and "x first" in out


@pytest.mark.parametrize("args, message", [
    (["orig.onnx", "--html", "r.html"], "--html and --eval belong to a comparison: give two or more ITEMs"),
    (["orig.onnx", "c.slim", "--profile", "jetson-orin-nano"], "predicted, not measured"),
    (["orig.onnx", "c.slim", "--rounds", "0"], "--rounds must be >= 1"),
])
def test_profile_comparison_refusals(two_files, capsys, args, message):
    capsys.readouterr()
    assert main(["profile", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow  # ~12 s: bench/ --quick
def test_profile_sweep_quick_interleaves_and_records_the_machine(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).parents[1] / "bench" / "profile_sweep.py"
    res = subprocess.run([sys.executable, str(bench), "--quick", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "profile_sweep.json").read_text())
    assert summary["machine_info"]["cpu_model"] and "simd_flags" in summary["machine_info"]
    torch_rows = [r for r in summary["rows"] if r["runtime"] == "torch"]
    ort_rows = [r for r in summary["rows"] if r["runtime"] == "onnxruntime"]
    for t, o in zip(torch_rows, ort_rows):
        assert t["torch_over_ort_p50"] == pytest.approx(t["p50_ms"] / o["p50_ms"]) and t["mem_method"] == INTERLEAVED_MEM
    assert summary["peak"]["source"]


def test_compare_with_eval_draws_metric_against_latency(in_tmp, capsys):
    pytest.importorskip("transformers")
    assert main(["compress", "tiny-bert", "-m", "svd", "--rank", "4", "--set", "align=4", "-o", "b.slim"]) == 0
    capsys.readouterr()
    code = main(["profile", "tiny-bert", "b.slim", "--profile", "cpu-torch-fp32", "--batch", "2", "--iters", "2",
                 "--warmup", "0", "--eval", "sentences", "--json", "--html", "e.html"])
    out = capsys.readouterr()
    assert code == 0, out.err
    first, second = json.loads(out.out)["candidates"]
    assert first["eval"]["metric"] == second["eval"]["metric"]
    assert first["eval"]["value"] == pytest.approx(1.0) and first["eval_note"].startswith("the reference")
    assert second["eval"]["value"] < 1.0 and "eval_note" not in second  # rank 4 of 32: the embeddings move
    page = (in_tmp / "e.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<td>reference</td>" in page  # latency, size, metric
    assert "(reference)" in page and "speedup)" in page  # the first is the reference, the ratio says what it is
    main(["profile", "tiny-bert", "b.slim", "--profile", "cpu-torch-fp32", "--batch", "2", "--iters", "2",
          "--warmup", "0", "--eval", "sentences"])
    text = capsys.readouterr().out
    assert "tiny-bert: the reference the others' agreement is measured against" in text and "cosine 1.0000" not in text
