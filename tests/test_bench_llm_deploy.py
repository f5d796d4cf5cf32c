"""bench/llm_deploy.py --quick: a tiny random LLaMA through every edgeslim row of the deployment benchmark."""
import importlib.util
import json
from pathlib import Path

import pytest


@pytest.mark.slow  # five causal-LM cache exports, each validated (~1-2 min on 2 cores)
def test_llm_deploy_quick_mode_runs_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("nncf")
    path = Path(__file__).parents[1] / "bench" / "llm_deploy.py"
    spec = importlib.util.spec_from_file_location("llm_deploy", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
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
    # the headline int4 rows timed again at the end, bracketing the peers (a tiny model's rates may well drift)
    for name in ("edgeslim wq int4_min g16 int8-act", "edgeslim wq int4_min g16 int8-act, shared layout"):
        assert rows[name]["drift_decode_16"] == rows[name]["decode_tokens_per_s_16_end"] / rows[name]["decode_tokens_per_s_16"]
    assert summary["goals"]["int4_file_over_fp32"] < 1
    assert all("the machine's speed moved" in note for note in summary["notes"])
    assert summary["goals"]["int4_decode_flatness"] > 0
    assert summary["goals"]["int4_decode16_buffer_over_optimum_layout"] > 0
    assert summary["machine"]["cpu_model"] and "int8_features" in summary["machine"]
    assert (tmp_path / "llm_deploy_tokens_vs_perplexity.png").stat().st_size > 0
