"""Pruning the architectures users bring (tiny random Hugging Face models built here, nothing downloaded):
fused projections cut in step, layers that would be emptied or silenced refused, what is left whole says why."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgeslim.compress import prune as prune_mod
from edgeslim.compress.prune import Prune
from edgeslim.core.calib import CalibData
from edgeslim.core.errors import ConfigError

transformers = pytest.importorskip("transformers")


class LM(nn.Module):
    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def phi3() -> LM:
    torch.manual_seed(0)
    config = transformers.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                                     pad_token_id=0)
    return LM(transformers.Phi3ForCausalLM(config)).eval()


IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def test_phi3_fused_gate_up_is_pruned_as_its_two_parts_in_step():
    model = phi3()
    result = Prune().compress(model, {"ratio": 0.5}, CalibData("t", [{"input_ids": IDS}]))
    mlp = result.model.lm.model.layers[0].mlp
    assert mlp.gate_up_proj.out_features == 2 * mlp.down_proj.in_features == 64
    kept = next(g["kept"] for g in result.resolved["groups"] if g["root"].endswith("gate_up_proj"))
    gate = kept[:32]
    assert kept[32:] == [i + 64 for i in gate]  # channel i of the gate with channel i of the up part
    silenced = copy.deepcopy(model)  # the same model with the removed intermediate neurons switched off
    removed = sorted(set(range(64)) - set(gate))
    with torch.no_grad():
        silenced.lm.model.layers[0].mlp.down_proj.weight[:, removed] = 0
        assert torch.allclose(result.model(IDS), silenced(IDS), atol=1e-5)
    assert "qkv_proj" in " ".join(result.resolved["skipped"])  # fused q/k/v: left whole, with the reason


def test_a_pruning_that_empties_or_silences_a_layer_is_refused(monkeypatch):
    """Without the in-step cut, Torch-Pruning keeps a share of one part: the MLP ends with 0 channels."""
    monkeypatch.setattr(prune_mod, "fused_parts", lambda g, channels: 1)
    with pytest.raises(ConfigError, match="0 channels|output zeros only"):
        Prune().compress(phi3(), {"ratio": 0.5}, CalibData("t", [{"input_ids": IDS}]))


def test_gpt2_conv1d_mlp_is_pruned_and_the_fused_qkv_left_whole_with_the_reason():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    model = LM(transformers.GPT2LMHeadModel(config)).eval()
    for criterion in ("l2", "taylor"):
        result = Prune().compress(model, {"ratio": 0.5, "criterion": criterion}, CalibData("t", [{"input_ids": IDS}]))
        mlp = result.model.lm.transformer.h[0].mlp
        assert mlp.c_fc.nf == mlp.c_proj.weight.shape[0] == 64 and mlp.c_fc.weight.shape == (32, 64)
        assert "c_attn" in " ".join(result.resolved["skipped"]) and result.model.lm.transformer.h[0].attn.c_attn.nf == 96
        kept = next(g["kept"] for g in result.resolved["groups"] if g["root"].endswith("c_fc"))
        silenced = copy.deepcopy(model)
        with torch.no_grad():
            silenced.lm.transformer.h[0].mlp.c_proj.weight[sorted(set(range(128)) - set(kept))] = 0
            assert torch.allclose(result.model(IDS), silenced(IDS), atol=1e-5)

def swin() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1],
                                     num_heads=[2, 2], window_size=4, num_labels=3)

    class Image(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf = transformers.SwinForImageClassification(config)

        def forward(self, pixel_values):
            return self.hf(pixel_values=pixel_values).logits
    return Image().eval()


PIXELS = CalibData("t", [{"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}])


def test_swin_heads_with_a_relative_position_bias_are_left_whole_with_the_reason():
    result = Prune().compress(swin(), {"ratio": 0.5}, PIXELS)
    biased = [k for k, why in result.resolved["skipped"].items() if "relative position bias" in why]
    assert biased and result.model(**PIXELS.batches[0]).shape == (2, 3)
    assert result.params_after < result.params_before  # the MLPs were pruned


def test_a_pruning_that_breaks_the_model_is_refused_not_saved(monkeypatch):
    monkeypatch.setattr(prune_mod, "relative_bias_projections", lambda model: {})  # as before: heads cut
    with pytest.raises(ConfigError, match="the pruned model no longer runs|0 channels|output zeros only"):
        Prune().compress(swin(), {"ratio": 0.5}, PIXELS)


def test_t5_heads_with_their_relative_bias_are_left_whole_and_the_ffn_pruned():
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf = transformers.T5EncoderModel(config)

        def forward(self, input_ids):
            return self.hf(input_ids=input_ids).last_hidden_state

    result = Prune().compress(Encoder().eval(), {"ratio": 0.5}, CalibData("t", [{"input_ids": IDS}]))
    assert any("relative position bias" in why for why in result.resolved["skipped"].values())
    block = result.model.hf.encoder.block[0]
    assert block.layer[0].SelfAttention.n_heads == 4 and block.layer[1].DenseReluDense.wi.out_features == 32
    assert result.model(IDS).shape == (2, 8, 32)


def test_inspect_lists_what_pruning_left_whole_and_why(in_tmp, capsys):
    from edgeslim.cli import main
    assert main(["compress", "tiny-mlp", "-m", "prune", "--ratio", "0.5", "-o", "p.slim"]) == 0
    capsys.readouterr()
    assert main(["inspect", "p.slim"]) == 0
    assert "left whole: head: left whole (its channels reach the model's output)" in capsys.readouterr().out
