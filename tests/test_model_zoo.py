"""Every architecture the hardening review named, as a tiny random Hugging Face folder built here (nothing is
downloaded), through compress (svd, asvd, prune, int8) -> export (ONNX Runtime parity): each compresses right or
is refused in one line with the reason. Slow: about four minutes on two cores."""
import pytest
import torch

from edgeslim.cli import main
from test_tasks import VOCAB, bert64, gpt2, llama, save, t5_encoder, tokenizer, transformers, vit


def phi3(folder):
    config = transformers.Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     pad_token_id=0)
    return save(transformers.Phi3ForCausalLM(config), folder, tokenizer(pad=False))


def qwen2(folder):
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return save(transformers.Qwen2ForCausalLM(config), folder, tokenizer(pad=False))


def swin(folder):
    config = transformers.SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1],
                                     num_heads=[2, 2], window_size=4, num_labels=3)
    return save(transformers.SwinForImageClassification(config), folder,
                processor={"size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3})


BUILDERS = {"phi3": phi3, "qwen2": qwen2, "gpt2": gpt2, "llama": llama, "t5-encoder": t5_encoder, "bert": bert64,
            "vit": vit, "swin": swin}
METHODS = {"svd": [], "asvd": ["--calib", "random:8"], "prune": [], "int8": ["--calib", "random:16"]}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", BUILDERS)
def test_architecture_compresses_right_or_is_refused_with_the_reason(arch, method, in_tmp, capsys):
    torch.manual_seed(0)
    folder = BUILDERS[arch](in_tmp / arch)
    capsys.readouterr()
    code = main(["compress", str(folder), "-m", method, "--ratio", "0.5", *METHODS[method], "-o", "c.slim"]
                if method != "int8" else ["compress", str(folder), "-m", method, *METHODS[method], "-o", "c.slim"])
    err = capsys.readouterr().err  # an unexpected exception would have left main() and failed the test
    if code != 0:  # refused: one line that says why, nothing written
        assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and not (in_tmp / "c.slim").exists()
        return
    assert main(["export", "c.slim", "-o", "c.onnx"]) == 0  # parity with PyTorch checked in ONNX Runtime
