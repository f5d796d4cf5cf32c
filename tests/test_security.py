"""An artifact or model folder is data, never code: custom code named by a config is refused in one line."""
import hashlib
import io
import json
import sys

import pytest

from edgeslim.cli import main

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from test_tasks import bert64  # noqa: E402

EVIL = "import pathlib; pathlib.Path({!r}).write_text('ran')\n"


def _add_auto_map(config, ran):
    data = json.loads(config.read_text())
    data["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.Evil"}
    config.write_text(json.dumps(data))
    (config.parent / "evil.py").write_text(EVIL.format(str(ran)))


def _refused(capsys, args, code=3):
    assert main(args) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_a_model_folder_naming_custom_code_is_refused(in_tmp, capsys, monkeypatch):
    folder = bert64(in_tmp / "bert")
    _add_auto_map(folder / "config.json", in_tmp / "ran")
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))  # someone would answer transformers' prompt
    err = _refused(capsys, ["compress", str(folder), "-m", "svd", "--rank", "2", "-o", "a.slim"])
    assert "auto_map" in err and not (in_tmp / "ran").exists() and not (in_tmp / "a.slim").exists()


def test_an_artifact_naming_custom_code_is_refused(in_tmp, capsys, monkeypatch):
    folder = bert64(in_tmp / "bert")
    assert main(["compress", str(folder), "-m", "svd", "--rank", "2", "-o", "a.slim"]) == 0
    slim = in_tmp / "a.slim"
    _add_auto_map(slim / "source.config.json", in_tmp / "ran")
    (slim / "evil.py").unlink()
    manifest = json.loads((slim / "manifest.json").read_text())  # a forger rewrites the hashes too
    manifest["files"]["source.config.json"] = hashlib.sha256((slim / "source.config.json").read_bytes()).hexdigest()
    (slim / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    capsys.readouterr()
    for args in (["export", "a.slim", "-o", "a.onnx"],
                 ["compress", "a.slim", "-m", "svd", "--rank", "2", "-o", "b.slim"]):
        assert "auto_map" in _refused(capsys, args)
    assert not (in_tmp / "ran").exists() and not (in_tmp / "a.onnx").exists() and not (in_tmp / "b.slim").exists()


def test_no_library_reads_the_commands_stdin(monkeypatch):
    import types
    seen = []
    monkeypatch.setattr("edgeslim.cli.cli", types.SimpleNamespace(main=lambda **kw: seen.append(sys.stdin.read())))
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    assert main(["list", "profiles"]) == 0
    assert seen == [""] and sys.stdin.read() == "y\n"  # the command saw an empty stdin; the caller's is restored


@pytest.mark.parametrize("task", [None, "feature-extraction", "seq2seq"])
def test_a_speech_model_is_refused_in_one_line(in_tmp, capsys, task):
    import transformers
    config = transformers.WhisperConfig(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        decoder_start_token_id=3, d_model=16, encoder_layers=1, decoder_layers=1,
                                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                        decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=16,
                                        max_target_positions=16)
    transformers.WhisperForConditionalGeneration(config).save_pretrained(in_tmp / "whisper")
    capsys.readouterr()
    args = ["export", "whisper", "-o", "w.onnx"] + (["--task", task] if task else [])
    assert "speech model (whisper" in _refused(capsys, args, code=2) and not (in_tmp / "w.onnx").exists()
