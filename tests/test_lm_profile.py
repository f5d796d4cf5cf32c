"""LLM profiling: `profile` of a causal LM's cache graph reports time to first token, decode tokens/s,
the child's peak memory and the file size; candidates side by side with an HTML report; `eval --onnx`
scores perplexity through the cache graph."""
from __future__ import annotations

import json
import os

import pytest

transformers = pytest.importorskip("transformers")

from edgeslim.cli import main  # noqa: E402
from tiny_lm import llama_folder  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    base = tmp_path_factory.mktemp("lmprof")
    folder = llama_folder(base / "tiny-llama", positions=64)
    onnx = base / "lm.onnx"
    assert main(["export", str(folder), "--kv-cache", "-o", str(onnx)]) == 0
    return folder, onnx


def test_profile_schema(lm, capsys):
    folder, onnx = lm
    assert main(["profile", str(onnx), "--prompt", "8,24", "--new-tokens", "6", "--batch", "1,2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    (cand,) = res["candidates"]
    assert cand["file_bytes"] == onnx.stat().st_size
    assert cand["peak_rss_bytes"] >= cand["memory"]["loaded_rss_bytes"] > cand["memory"]["baseline_rss_bytes"] > 0
    assert [(r["batch"], r["prompt"]) for r in cand["rows"]] == [(1, 8), (1, 24), (2, 8), (2, 24)]
    for r in cand["rows"]:
        assert r["ttft_ms"] > 0 and r["decode_tokens_per_s"] > 0 and r["new_tokens"] == 6
        assert r["aggregate_tokens_per_s"] == pytest.approx(r["batch"] * r["decode_tokens_per_s"])
        assert ("decode_flatness" in r) == (r["batch"] == 1)
    assert res["measured_on"]["address"] == "local"


def test_profile_two_candidates_with_html(lm, tmp_path, capsys):
    folder, onnx = lm
    html = tmp_path / "lm.html"
    assert main(["profile", str(onnx), str(folder), "--prompt", "8", "--new-tokens", "4", "--rounds", "2",
                 "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert "TTFT" in out and "report:" in out
    page = html.read_text()
    assert "time to first token, batch 1, prompt 8" in page and "decode tokens/s" in page and "<img" in page


def test_profile_refusals(lm, capsys):
    folder, onnx = lm
    assert main(["profile", str(onnx), "--prompt", "60", "--new-tokens", "10"]) == 2  # 70 > 64 positions
    assert "positions" in capsys.readouterr().err
    assert main(["profile", str(onnx), "--new-tokens", "0", "--prompt", "8"]) == 2
    assert main(["profile", str(onnx), "--ops"]) == 2
    assert "do not apply" in capsys.readouterr().err


def test_eval_perplexity_through_the_cache_graph(lm, tmp_path, capsys):
    folder, onnx = lm
    docs = tmp_path / "docs.txt"
    docs.write_text("the quick brown fox jumps over the lazy dog\nhello world, this is a test of perplexity\n")
    assert main(["eval", str(folder), "--data", str(docs), "--json"]) == 0
    torch_ppl = json.loads(capsys.readouterr().out)
    assert main(["eval", str(folder), "--data", str(docs), "--onnx", str(onnx), "--json"]) == 0
    onnx_ppl = json.loads(capsys.readouterr().out)
    assert onnx_ppl["value"] == pytest.approx(torch_ppl["value"], rel=1e-4)
    assert onnx_ppl["metric"] == "perplexity" and onnx_ppl["metrics"]["tokens"] == torch_ppl["metrics"]["tokens"] > 10
    # the buffer layout (new keys/values only, written in place by the runner) scores the same
    buffered = tmp_path / "buffer.onnx"
    assert main(["export", str(folder), "--kv-cache", "--kv-layout", "buffer", "-o", str(buffered)]) == 0
    assert "buffer layout" in capsys.readouterr().out
    assert main(["eval", str(folder), "--data", str(docs), "--onnx", str(buffered), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["value"] == pytest.approx(onnx_ppl["value"], rel=1e-5)


def test_eval_through_the_shared_layout(tmp_path, capsys):
    """GroupQueryAttention's cache graph (heads of 16) scores a batch padded after its tokens as Optimum's does."""
    folder = llama_folder(tmp_path / "wide", hidden=64, positions=192)
    docs = tmp_path / "docs.txt"
    docs.write_text("the quick brown fox jumps over the lazy dog\nhello world, this is a test of perplexity\n")
    ppl = {}
    for layout in ("optimum", "shared"):
        assert main(["export", str(folder), "--kv-cache", "--kv-layout", layout, "-o", str(tmp_path / f"{layout}.onnx")]) == 0
        assert f"{layout} layout" in capsys.readouterr().out
        assert main(["eval", str(folder), "--data", str(docs), "--onnx", str(tmp_path / f"{layout}.onnx"), "--json"]) == 0
        ppl[layout] = json.loads(capsys.readouterr().out)["value"]
    assert ppl["shared"] == pytest.approx(ppl["optimum"], rel=1e-5)
