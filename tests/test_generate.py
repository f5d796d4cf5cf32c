"""`edgeslim generate` and `export --kv-cache` on a tiny Hugging Face folder with a tokenizer and a chat
template: the text equals torch greedy decoding, the .onnx runs without torch, bad input is one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from edgeslim.cli import main  # noqa: E402
from edgeslim.zoo import _tiny_tokenizer  # noqa: E402
from tiny_lm import llama_folder  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    return llama_folder(tmp_path_factory.mktemp("lm") / "tiny-llama", chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def lm_onnx(lm_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "lm.onnx"
    assert main(["export", str(lm_folder), "--kv-cache", "-o", str(out)]) == 0
    return out


def test_export_kv_cache_json(lm_folder, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(lm_folder), "--kv-cache", "-o", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kv_cache"] and info["layers"] == 2 and info["kv_heads"] == [2, 2] and info["greedy_prompts_equal"] == 3
    assert max(info["max_abs_diff"].values()) < 1e-4


def test_export_buffer_layout_generates_the_same_text(lm_folder, lm_onnx, tmp_path, capsys):
    out = tmp_path / "buffer.onnx"
    assert main(["export", str(lm_folder), "--kv-cache", "--kv-layout", "buffer", "-o", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cache_layout"] == "buffer" and info["greedy_prompts_equal"] == 3
    assert main(["generate", str(out), "--prompt", "hello world", "-n", "20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 20
    from edgeslim.runtime.kv_decoder import open_cache_graph
    prompt = list(range(3, 40))
    tokens = [open_cache_graph(path).generate(prompt, 40).tokens for path in (lm_onnx, out)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 40
    assert main(["export", str(lm_folder), "--kv-layout", "buffer", "-o", str(tmp_path / "plain.onnx")]) == 2
    assert "--kv-layout applies to a --kv-cache export" in capsys.readouterr().err
    assert not (tmp_path / "plain.onnx").exists()


def test_generate_equals_torch_greedy(lm_folder, lm_onnx, capsys):
    assert main(["generate", str(lm_onnx), "--prompt", "hello world", "-n", "12", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    tok = transformers.AutoTokenizer.from_pretrained(lm_folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "hello world"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    assert res["prompt_tokens"] == len(ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(lm_folder).eval()
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          pad_token_id=0, eos_token_id=None)[0, len(ids):]
    assert res["new_tokens"] == 12 and res["stopped"] == "length"
    assert res["text"] == tok.decode(ref, skip_special_tokens=True)
    # streamed text (no --json) is the same text, then one line with tokens/s
    assert main(["generate", str(lm_onnx), "--prompt", "hello world", "-n", "12"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(res["text"]) and "tokens/s" in out
    # sampling: another run with the same seed gives the same text
    assert main(["generate", str(lm_onnx), "--prompt", "hi", "-n", "8", "--temperature", "0.8", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["text"]
    assert main(["generate", str(lm_onnx), "--prompt", "hi", "-n", "8", "--temperature", "0.8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == first


def test_generate_from_the_folder_itself(lm_folder, capsys):
    assert main(["generate", str(lm_folder), "--prompt", "abc", "-n", "4", "--raw", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 4


def test_onnx_generation_never_imports_torch(lm_onnx):
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
            "from edgeslim.generation import generate_text\n"
            f"r = generate_text({str(lm_onnx)!r}, 'hello', 5)\n"
            "print(r.new_tokens, 'torch' in sys.modules and sys.modules['torch'] is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["5", "False"]


@pytest.mark.parametrize("args, code, words", [
    (["-n", "0"], 2, "-n must be > 0"),
    (["-n", "-3"], 2, "-n must be > 0"),
    (["--prompt-x"], 2, "No such option"),
    (["--greedy", "--temperature", "0.5"], 2, "exclude each other"),
])
def test_generate_bad_options(lm_onnx, args, code, words, capsys):
    argv = ["generate", str(lm_onnx)] + (["--prompt", "x"] if "--prompt-x" not in args else []) + args
    assert main(argv) == code
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_generate_refusals(lm_folder, lm_onnx, tmp_path, capsys):
    # a prompt longer than the 160 positions
    assert main(["generate", str(lm_onnx), "--prompt", "a " * 200, "--raw"]) == 2
    assert "positions" in capsys.readouterr().err
    # generation that reaches the length limit stops and says so
    assert main(["generate", str(lm_onnx), "--prompt", "a " * 75, "--raw", "-n", "100"]) == 0
    assert "length limit" in capsys.readouterr().out
    # a non-causal model
    bert = tmp_path / "bert"
    transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=90, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(bert)
    _tiny_tokenizer().save_pretrained(bert)
    assert main(["generate", str(bert), "--prompt", "x"]) == 2
    assert "for causal LMs" in capsys.readouterr().err
    # a cache graph without a tokenizer; a plain (non-cache) graph; a missing file
    from edgeslim.export.kv_cache import to_onnx_cache
    bare = to_onnx_cache(transformers.AutoModelForCausalLM.from_pretrained(lm_folder), tmp_path / "bare.onnx").path
    assert main(["generate", str(bare), "--prompt", "x"]) == 2
    assert "carries no tokenizer" in capsys.readouterr().err
    plain = tmp_path / "plain.onnx"
    assert main(["export", str(lm_folder), "-o", str(plain)]) == 0
    capsys.readouterr()
    assert main(["generate", str(plain), "--prompt", "x"]) == 2
    assert "not a causal LM's key/value-cache graph" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nope.onnx"), "--prompt", "x"]) == 3
