"""`--json` on compress, export and train, and the source options (--weights, --input, --task) that every
command taking a SOURCE shares: a user's own unmodified `pkg.mod:factory` model compresses, exports and
profiles."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeslim import cli
from edgeslim.cli import main

FACTORY = "edgeslim_test_factories:tiny"  # 16 -> 32 -> 4 MLP, parameters 16*32+32 + 32*4+4 = 676
TINY_PARAMS = 16 * 32 + 32 + 32 * 4 + 4


@pytest.fixture
def user_weights(in_tmp):
    """The user's trained weights for the factory (not the factory's seeded ones)."""
    from safetensors.torch import save_model

    from edgeslim_test_factories import tiny
    model = tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    save_model(model, str(in_tmp / "w.safetensors"))
    return model


def run_json(capsys, args):
    code = main(args + ["--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


@pytest.mark.parametrize("command", ["compress", "export", "profile"])
def test_every_source_command_has_the_same_source_options(command):
    params = {p.name: p for p in cli.cli.commands[command].params}
    assert {"weights", "inputs", "task"} <= set(params)
    assert params["inputs"].opts == ["--input"] and params["task"].help == cli.TASK_HELP


def test_compress_json(in_tmp, capsys, user_weights):
    out = run_json(capsys, ["compress", FACTORY, "--weights", "w.safetensors", "--input", "x:batch,16",
                            "-m", "svd", "--rank", "2", "-o", "m.slim"])
    path = Path(out["artifact"])
    assert path == Path("m.slim") and (in_tmp / "m.slim" / "manifest.json").is_file()
    assert out["artifact_bytes"] == sum(f.stat().st_size for f in (in_tmp / "m.slim").iterdir())
    assert out["params"]["model_before"] == TINY_PARAMS
    rows = out["steps"][0]["changes"]
    assert out["params"]["targeted_after"] == sum(r["params_after"] for r in rows) < out["params"]["targeted_before"]
    assert sum(out["modules"].values()) == 2  # both linears have a row
    manifest = json.loads((in_tmp / "m.slim" / "manifest.json").read_text())
    assert manifest["source"]["sha256"] is not None and manifest["steps"][0]["config"] == out["steps"][0]["config"]


def test_export_json_of_an_unmodified_factory_model_with_its_weights(in_tmp, capsys, user_weights):
    import onnxruntime as ort

    out = run_json(capsys, ["export", FACTORY, "--weights", "w.safetensors", "--input", "x:batch,16", "-o", "u.onnx"])
    assert out["onnx"] == "u.onnx" and out["onnx_bytes"] == (in_tmp / "u.onnx").stat().st_size
    assert out["params"] == TINY_PARAMS and out["precision"] == "fp32" and max(out["max_abs_diff"].values()) < 1e-5
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    got = ort.InferenceSession("u.onnx", providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        want = user_weights(torch.from_numpy(x)).numpy()  # the user's weights, not the factory's own
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("profile", ["cpu-torch-fp32", "cpu-ort-fp32"])
def test_profile_an_unmodified_factory_model(in_tmp, capsys, user_weights, profile):
    out = run_json(capsys, ["profile", FACTORY, "--weights", "w.safetensors", "--input", "x:batch,16",
                            "--profile", profile, "--batch", "1,4", "--iters", "2", "--warmup", "0"])
    rows = out["timings"]
    assert [r["batch"] for r in rows] == [1, 4]
    assert rows[1]["flops"] == 4 * rows[0]["flops"] > 0  # the work of the model given by --input, per batch


def test_profile_refuses_source_options_for_a_model_file(in_tmp, capsys):
    assert main(["export", "tiny-mlp", "-o", "m.onnx"]) == 0
    capsys.readouterr()
    assert main(["profile", "m.onnx", "--weights", "w.safetensors"]) == 2
    assert "--weights describe a model SOURCE; m.onnx is a model file" in capsys.readouterr().err


def test_task_reaches_the_loader_of_export_and_profile(in_tmp, capsys):
    transformers = pytest.importorskip("transformers")
    from edgeslim.zoo import _tiny_tokenizer

    config = transformers.BertConfig(vocab_size=90, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(in_tmp / "bert")
    _tiny_tokenizer().save_pretrained(in_tmp / "bert")
    default = run_json(capsys, ["export", "bert", "-o", "a.onnx"])
    asked = run_json(capsys, ["export", "bert", "--task", "feature-extraction", "-o", "b.onnx"])
    assert (default["task"], asked["task"]) == ("sequence-classification", "feature-extraction")
    assert asked["params"] < default["params"]  # no classifier head
    rows = run_json(capsys, ["profile", "bert", "--task", "feature-extraction", "--profile", "cpu-torch-fp32",
                             "--batch", "1", "--dim", "sequence=8", "--iters", "2", "--warmup", "0"])["timings"]
    head = run_json(capsys, ["profile", "bert", "--profile", "cpu-torch-fp32", "--batch", "1", "--dim",
                             "sequence=8", "--iters", "2", "--warmup", "0"])["timings"]
    assert rows[0]["flops"] < head[0]["flops"]  # the head's work is gone: --task was used


def test_train_espcn_json(in_tmp, capsys):
    pytest.importorskip("skimage")
    out = run_json(capsys, ["train", "espcn", "--scale", "2", "--steps", "2", "-o", "e.slim"])
    assert out["artifact"] == "e.slim" and out["params"] > 0 and out["steps"] == 2
    assert out["artifact_bytes"] == sum(f.stat().st_size for f in (in_tmp / "e.slim").iterdir())
    assert out["training"]["loss_first"] > 0 and out["architecture"]["scale"] == 2


def test_train_adapter_json(in_tmp, capsys):
    pytest.importorskip("transformers")
    lines = [{"text": t, "label": y} for t, y in [("good fine great", "pos"), ("bad awful poor", "neg")] * 4]
    (in_tmp / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = run_json(capsys, ["train", "adapter", "tiny-bert", "--data", "d.jsonl", "--eval", "d.jsonl", "-m", "head",
                            "--epochs", "1", "--batch", "4", "-o", "a.slim"])
    assert out["artifact"] == "a.slim" and out["labels"] == ["neg", "pos"]
    assert 0 < out["trainable_params"] < out["total_params"]
    assert out["eval"]["samples"] == 8 and 0 <= out["eval"]["accuracy"] <= 1
    assert out["weights_bytes"] == (in_tmp / "a.slim" / "weights.safetensors").stat().st_size


SHOUTING = """
import logging, os, sys
from edgeslim import cli
logging.getLogger("shout").addHandler(logging.StreamHandler(sys.stdout))  # a handle taken early, like NNCF's
real = cli.print_json
def noisy(obj):
    print("progress 100%")
    logging.getLogger("shout").warning("a library log line")
    os.write(1, b"a C-level write\\n")
    real(obj)
cli.print_json = noisy
sys.exit(cli.main(["compress", "tiny-mlp", "-m", "int8", "--calib", "random:16", "--json", "-o", "q.slim"]))
"""


def test_json_is_alone_on_stdout_even_when_a_library_prints(in_tmp):
    """NNCF prints progress bars and log lines to stdout from its own handles: --json moves them to stderr."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", SHOUTING], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["method"] == "int8"
    assert all(line in done.stderr for line in ("progress 100%", "a library log line", "a C-level write"))
