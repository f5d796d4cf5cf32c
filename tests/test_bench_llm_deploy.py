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


def test_interleave_alternates_the_rows_and_the_goals_read_per_round_ratios():
    from edgeslim.core.errors import InferenceCrashError
    bench = _bench()
    cfg = dict(bench.QUICK, rounds=3)
    buffer, shared = bench.headline_names(cfg)
    q40, genai = bench.RIVALS
    # the machine slows down round by round (1.0, 0.8, 0.6): each round's ratio stays 0.5 against Q4_0
    speed = {buffer: 50.0, shared: 60.0, q40: 100.0, genai: 120.0}
    order = []

    def timer(name):
        def run():
            order.append(name)
            if name == genai and len(order) > 8:
                raise RuntimeError("the peer died")
            if name == shared and len(order) == 2:  # what child_lm raises for a crashed or stuck child
                raise InferenceCrashError("the child process measuring it died")
            slow = 1.0 - 0.2 * ((len(order) - 1) // 4)
            return {"decode_tokens_per_s_16": speed[name] * slow, "ttft_ms_16": 10.0 / slow}
        return run
    timers = {name: timer(name) for name in (q40, genai, shared, buffer, "edgeslim fp32")}
    rounds, notes = bench.interleave(cfg, timers)
    assert order == [buffer, shared, q40, genai, shared, q40, genai, buffer, q40, genai, buffer, shared]
    assert set(rounds) == {buffer, shared, q40, genai} and rounds[genai][2] is None and rounds[shared][0] is None
    assert f"{genai}: round 3 not timed (RuntimeError: the peer died)" in notes
    assert f"{shared}: round 1 not timed (InferenceCrashError: the child process measuring it died)" in notes
    assert any(n.startswith(f"{buffer}: decode_tokens_per_s_16 moved") for n in notes)
    assert bench.round_ratio(rounds, buffer, q40, "decode_tokens_per_s_16") == {"median": 0.5, "rounds": [0.5] * 3}
    assert bench.round_ratio(rounds, buffer, genai, "decode_tokens_per_s_16")["rounds"] == [50 / 120] * 2
    assert bench.round_ratio(rounds, buffer, "edgeslim fp32", "decode_tokens_per_s_16") is None
    assert bench.interleave(cfg, {q40: timers[q40], genai: timers[genai]}) == ({q40: [], genai: []}, [])  # no goal reads them
    # the rows, timed one after another while the machine slowed, would say 0.8; the goals say 0.5
    rows = [{"name": buffer, "decode_tokens_per_s_16": 50.0, "ttft_ms_16": 10.0},
            {"name": q40, "decode_tokens_per_s_16": 62.5, "ttft_ms_16": 10.0}]
    assert bench.goals(rows, cfg)["int4_decode_over_llama_cpp_q4_0"] == 0.8
    got = bench.goals(rows, cfg, rounds)
    assert got["int4_decode_over_llama_cpp_q4_0"] == 0.5 and got["int4_decode_over_llama_cpp_q4_0_rounds"] == [0.5] * 3


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
    # the headline int4 rows (no peers here) alternate over two rounds; their ratios are per round
    buffer, shared = "edgeslim wq int4_min g16 int8-act", "edgeslim wq int4_min g16 int8-act, shared layout"
    assert set(summary["interleaved"]) == {buffer, shared} and all(len(r) == 2 for r in summary["interleaved"].values())
    pairs = [s["decode_tokens_per_s_16"] / b["decode_tokens_per_s_16"]
             for s, b in zip(summary["interleaved"][shared], summary["interleaved"][buffer])]
    assert summary["goals"]["int4_decode16_shared_over_buffer_layout_rounds"] == pairs
    assert summary["goals"]["int4_file_over_fp32"] < 1
    assert all("the machine's speed moved" in note for note in summary["notes"])  # no row or round failed
    assert summary["goals"]["int4_decode_flatness"] > 0
    assert summary["goals"]["int4_decode16_buffer_over_optimum_layout"] > 0
    assert summary["machine"]["cpu_model"] and "int8_features" in summary["machine"]
    assert (tmp_path / "llm_deploy_tokens_vs_perplexity.png").stat().st_size > 0
