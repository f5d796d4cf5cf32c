"""Recipes and the compress -> export -> profile pipeline on a tiny model."""
import json

import pytest
import torch

from edgeslim import artifact, pipeline
from edgeslim.core.errors import ConfigError, SourceError
from edgeslim.profiling import OP_ITERS
from edgeslim.recipe import load_recipe, parse_recipe
from edgeslim.runtime.op_profile import SHRUNK

RECIPE = {"source": "tiny-mlp", "step": [{"method": "svd", "ratio": 0.5}],
          "profile": {"name": "cpu-ort-fp32", "batch": [1, 4], "iters": 5, "warmup": 1}}


@pytest.mark.parametrize("bad, match", [
    ({"sorce": "x"}, r"unknown key\(s\) \['sorce'\]"),
    ({"step": []}, "'source' is required"),
    ({"source": "tiny-mlp", "step": [{"ratio": 0.5}]}, "needs a 'method'"),
    ({"source": "tiny-mlp", "step": [{"method": "svdd"}]}, "unknown compressor"),
    ({"source": "tiny-mlp", "step": [{"method": "svd", "rank": -1}]}, "rank must be"),
    ({"source": "tiny-mlp", "export": {"to": "tflite"}}, "'onnx' or 'tensorrt'"),
    ({"source": "tiny-mlp", "profile": {"batches": [1]}}, r"\[profile\]: unknown key"),
])
def test_recipe_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        parse_recipe(bad)


def test_recipe_files(tmp_path):
    with pytest.raises(SourceError, match="recipe not found"):
        load_recipe(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("source = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(tmp_path / "bad.toml")


@pytest.mark.parametrize("cpu_simd_width", [8, 16], indirect=True)  # a local CPU target: AVX2 and AVX-512
def test_profile_align_applies_to_steps_that_set_none(cpu_simd_width):
    from edgeslim.sources import load_model
    _, results = pipeline.apply_steps(load_model("tiny-mlp"), [{"method": "svd"}, {"method": "svd", "align": 2}],
                                      quiet=True, profile="cpu-ort-fp32")
    assert [r.config["align"] for r in results] == [cpu_simd_width, 2]
    _, (alone,) = pipeline.apply_steps(load_model("tiny-mlp"), [{"method": "svd"}], quiet=True)
    assert alone.config["align"] == 1  # no target profile: no rounding


@pytest.mark.parametrize("cpu_simd_width", [8, 16], indirect=True)  # a local CPU target: AVX2 and AVX-512
def test_run_writes_artifact_onnx_and_report(tmp_path, cpu_simd_width):
    summary = pipeline.run(parse_recipe(RECIPE), tmp_path, quiet=True)
    orig, comp = summary["models"]["original"], summary["models"]["compressed"]
    assert comp["params"] < orig["params"] and comp["flops"] < orig["flops"]
    assert [t["batch"] for t in comp["timings"]] == [1, 4]
    t = comp["timings"][1]
    assert t["p50_ms"] <= t["p90_ms"] <= t["p99_ms"] and 0 < t["roofline_fraction"]
    assert t["flops"] == 4 * comp["flops"]  # FLOPs scale with the batch for an MLP
    report = (tmp_path / "tiny-mlp-svd.report.md").read_text()
    assert "cpu_mem_arena True" in report  # the ORT settings that decide the arena's memory
    assert "Speedup or explain" in report and (tmp_path / "tiny-mlp-svd.report_latency.png").stat().st_size > 1000
    loaded = artifact.load(summary["artifact"])
    manifest = json.loads((tmp_path / "tiny-mlp-svd.slim" / "manifest.json").read_text())
    assert manifest["steps"][0]["config"]["align"] == cpu_simd_width  # the local CPU target's alignment
    ranks = [c["decision"] for c in manifest["steps"][0]["changes"] if c["status"] == "replaced"]
    assert ranks and all(r % cpu_simd_width == 0 for r in ranks)
    assert sum(p.numel() for p in loaded.model.parameters()) == comp["params"]
    assert 0 < summary["compare"]["max_abs_diff"] < 10
    ops = summary["op_breakdown"]  # ORT kernel time by op type, original beside compressed, at the largest batch
    assert ops["batch"] == 4 and {r["op"] for r in ops["rows"]} == set(orig["op_time_ms"]) | set(comp["op_time_ms"])
    assert any("Gemm" in r["op"] or "MatMul" in r["op"] for r in ops["rows"])
    assert sum(r["before_share"] for r in ops["rows"]) == pytest.approx(1)
    assert all(r["ratio"] is None or r["ratio"] >= SHRUNK for r in ops["rows"] if r["op"] in ops["not_shrunk"])
    assert "Where the time goes (batch 4)" in report and all(f"| {op} |" in report for op in ops["not_shrunk"])
    json.dumps(summary)  # JSON-ready as a whole


def test_run_cli_prints_the_op_breakdown_as_json(in_tmp, capsys):
    from edgeslim.cli import main
    (in_tmp / "r.toml").write_text('source = "tiny-mlp"\n[[step]]\nmethod = "svd"\nrank = 4\nalign = 1\n'
                                   '[profile]\nname = "cpu-ort-fp32"\nbatch = [2]\niters = 3\nwarmup = 1\n')
    assert main(["run", "r.toml", "-o", "out", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    ops = summary["op_breakdown"]
    assert ops["batch"] == 2 and ops["iters"] == OP_ITERS and summary["speed"][0]["batch"] == 2
    assert set(ops["not_shrunk"]) <= {r["op"] for r in ops["rows"]}
    assert "Where the time goes" in (in_tmp / "out" / "tiny-mlp-svd.report.md").read_text()


def test_op_breakdown_table_and_what_did_not_shrink(capsys):
    from edgeslim.cli import _console, _print_ops
    from edgeslim.runtime.op_profile import op_comparison

    before = {f"Op{i}": 10.0 - i for i in range(10)} | {"Where": 1.3}
    after = {f"Op{i}": (10.0 - i) / 2 for i in range(10)} | {"Where": 1.4, "Transpose": 2.0}
    breakdown = {"batch": 8, "iters": 3} | op_comparison(before, after)
    _print_ops(_console(), breakdown)
    out = " ".join(capsys.readouterr().out.split())
    assert "other (3)" in out and "Transpose" in out and "new" in out  # 8 largest, the new one, the rest summed
    assert ("did not shrink (time ratio 0.90x or more) at batch 8: Where (2% of the original's kernel time, 1.08x), "
            "Transpose (new: 6% of the compressed model's kernel time)") in out


def test_heal_step_distils_toward_the_original_model(tmp_path):
    recipe = {"source": "tiny-mlp", "step": [{"method": "svd", "rank": 2, "align": 1},
                                             {"method": "heal", "steps": 60, "lr": 1e-2, "calib": "random:64"}]}
    from edgeslim.sources import load_model
    original = load_model("tiny-mlp")
    _, compressed, results, path = pipeline.compress_to_artifact(
        recipe["source"], parse_recipe(recipe).steps, tmp_path / "h.slim", quiet=True)
    svd_only, _ = pipeline.apply_steps(original, recipe["step"][:1], quiet=True)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        err_svd = (svd_only.model(x=x) - original.model(x=x)).square().mean()
        err_healed = (compressed.model(x=x) - original.model(x=x)).square().mean()
    assert err_healed < err_svd
    assert torch.equal(artifact.load(path).model(x=x), compressed.model(x=x))
