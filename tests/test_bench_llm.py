"""bench/lowrank_llm.py --quick: a tiny random LLaMA through the whole benchmark."""
import importlib.util
import json
from pathlib import Path

import pytest


@pytest.mark.slow  # two causal-LM exports (~30 s)
def test_lowrank_llm_quick_mode_runs_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    path = Path(__file__).parents[1] / "bench" / "lowrank_llm.py"
    spec = importlib.util.spec_from_file_location("lowrank_llm", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "lowrank_llm.json").read_text())
    plain = [r for r in summary["rows"] if not r["healed"]]
    assert {r["method"] for r in plain} == {"svd", "fwsvd", "asvd", "asvd+loss"}
    for row in plain:
        assert row["params"] < summary["original"]["params"] and row["perplexity"] > 1
        assert row["targeted_kept"] <= row["ratio"] + 0.05
    assert [r["ratio"] for r in summary["rows"] if r["healed"]] == [0.8]
    prof = summary["loss_profile"]  # every decoder linear map factored alone, its loss change measured
    assert len(prof["layers"]) == summary["targeted_layers"] and prof["probe_ratio"] == 0.8
    assert all(layer["scale"] > 0 for layer in prof["layers"])
    assert summary["expectations"]["loss_over_energy_allocation_ppl_ratio"].keys() == {"0.8"}
    assert "hf.lm_head" not in summary["skipped"]  # the head is not in the decoder target; tied anyway
    lat = summary["latency"]
    assert [r["batch"] for r in lat["rows"]] == [1, 2] and min(lat["onnx_bytes"].values()) > 0
    assert max(lat["parity_max_abs_diff"].values()) < 1e-3
    assert "cpu" in json.dumps(summary["machine"]).lower()
    assert (tmp_path / "lowrank_llm_perplexity.png").stat().st_size > 0
