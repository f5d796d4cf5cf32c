"""bench/llm_deploy.py --quick: a tiny random LLaMA through every edgeslim row of the deployment benchmark."""
import importlib.util
import json
from pathlib import Path

import pytest


def _bench():
    path = Path(__file__).parents[1] / "bench" / "llm_deploy.py"
    spec = importlib.util.spec_from_file_location("llm_deploy", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_retime_brackets_the_peers_and_a_failed_child_is_a_note(monkeypatch, tmp_path):
    from edgeslim.runtime import child
    bench = _bench()
    cfg = dict(bench.QUICK)
    buffer, shared = bench.headline_names(cfg)
    rows = [{"name": name, "decode_tokens_per_s_8": 100.0, "decode_tokens_per_s_16": 100.0}
            for name in (buffer, shared)]
    rows.append({"name": "llama.cpp Q4_0 (from Q4_1)", "decode_tokens_per_s_8": 1.0, "decode_tokens_per_s_16": 1.0})
    rates = {buffer: 95.0, shared: 80.0}  # within DRIFT, and not

    def fake_child(path, prompts, *args):
        name = next(n for n in rates if bench.row_file(tmp_path, n) == path)
        return {"rows": [{"prompt": p, "ttft_ms": 1.0, "decode_tokens_per_s": rates[name]} for p in prompts]}
    monkeypatch.setattr(child, "child_lm", fake_child)
    notes = bench.retime(cfg, tmp_path, rows)
    assert [r.get("drift_decode_16") for r in rows] == [0.95, 0.8, None]
    assert len(notes) == 2 and all(n.startswith(shared) and "not trustworthy" in n for n in notes)

    def crash(*args):
        raise RuntimeError("the child process died")
    monkeypatch.setattr(child, "child_lm", crash)
    notes = bench.retime(cfg, tmp_path, rows[:1])
    assert notes == [f"{buffer}: not timed again (RuntimeError: the child process died)"]


@pytest.mark.slow  # five causal-LM cache exports, each validated (~1-2 min on 2 cores)
def test_llm_deploy_quick_mode_runs_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("nncf")
    bench = _bench()
    bench.main(["--quick", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "llm_deploy.json").read_text())
    rows = {r["name"]: r for r in summary["rows"]}
    assert list(rows) == ["edgeslim fp32", "edgeslim wq int8 int8-act", "edgeslim wq int4 g16 (NNCF zero points)",
                          "edgeslim wq int4 g16 (NNCF zero points) int8-act", "edgeslim wq int4_min g16", "edgeslim wq int4_min g16 int8-act", "edgeslim wq int4_min g32 int8-act",
                          "edgeslim asvd 0.9 + wq int4_min g16 int8-act", "edgeslim wq int4_min g16 int8-act, Optimum layout",
                          "edgeslim wq int4_min g16 int8-act, shared layout"]
    # the tiny LLaMA's heads of 16: GroupQueryAttention's rotary takes them, so the shared row is in the shared layout
    assert [r["cache_layout"] for r in rows.values()] == ["buffer"] * 8 + ["optimum", "shared"]
    fp32 = rows["edgeslim fp32"]
    for name, row in rows.items():
        assert row["greedy_prompts_equal"] == (3 if "int8-act" not in name else row["greedy_prompts_equal"])
        assert row["perplexity"] > 1
        if row["nbits_accuracy_level"] or name == "edgeslim fp32":  # timed; level-0 rows are scored only
            assert row["peak_rss_bytes"] > 0 and row["ttft_ms_8"] > 0 and row["decode_tokens_per_s_16"] > 0
        else:
            assert "decode_tokens_per_s_16" not in row
        if name != "edgeslim fp32":  # integers in the file, the same tokens scored: perplexity stays close
            assert row["matmul_nbits"] > 0 and row["file_bytes"] < fp32["file_bytes"]
            assert abs(row["perplexity"] / fp32["perplexity"] - 1) < 0.05
    assert rows["edgeslim asvd 0.9 + wq int4_min g16 int8-act"]["matmul_nbits"] > rows["edgeslim wq int4_min g16"]["matmul_nbits"]
    # the headline int4 rows timed again at the end, bracketing the peers (a tiny model's rates may drift)
    for name in ("edgeslim wq int4_min g16 int8-act", "edgeslim wq int4_min g16 int8-act, shared layout"):
        row = rows[name]
        assert row["drift_decode_16"] == row["decode_tokens_per_s_16_end"] / row["decode_tokens_per_s_16"]
    assert summary["goals"]["int4_file_over_fp32"] < 1
    assert all("the machine's speed moved" in note for note in summary["notes"])
    assert summary["goals"]["int4_decode_flatness"] > 0
    assert summary["goals"]["int4_decode16_buffer_over_optimum_layout"] > 0
    assert summary["machine"]["cpu_model"] and "int8_features" in summary["machine"]
    assert (tmp_path / "llm_deploy_tokens_vs_perplexity.png").stat().st_size > 0
