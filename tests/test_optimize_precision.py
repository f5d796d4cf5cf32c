"""optimize under a size budget: the per-weight precision of a wq stage (which weights stay fp32), measured on a tiny
model, allocated by the shared greedy, and compared with the wq stage alone."""
import itertools

import pytest
import torch
from torch import nn

from edgeslim.artifact import SourceSpec
from edgeslim.compress.sensitivity import mean_loss
from edgeslim.core.calib import CalibData
from edgeslim.core.specs import TensorSpec
from edgeslim.loaded import LoadedModel
from edgeslim.optimize_precision import PrecisionLayer, allocate_precision, kept_fp32, precision_layers
from edgeslim.optimize_search import Point, best_single, estimate, first_weight_mix, search
from edgeslim.optimize_space import Combo, Space, Stage, weight_bytes


class Tiny(nn.Module):  # not an nn.Sequential: NNCF adds its hook storage as a child module
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 8)])

    def forward(self, input):
        return self.layers[2](torch.relu(self.layers[1](torch.relu(self.layers[0](input)))))


def tiny():
    return Tiny()


def calib():
    g = torch.Generator().manual_seed(1)
    batches = [{"input": torch.randn(16, 64, generator=g)} for _ in range(2)]
    return CalibData("t", batches, [torch.randint(0, 8, (16,), generator=g) for _ in range(2)])


def quantized(model):
    from edgeslim.compress.base import CompressContext, get_compressor
    context = CompressContext(inputs=[TensorSpec("input", ("batch", 64))])
    return get_compressor("wq").compress(model, {"mode": "int8"}, context=context).model


def test_with_distillation_targets_each_weight_is_measured_alone_with_its_stored_integers():
    pytest.importorskip("nncf")
    from edgeslim.compress.train import teacher_targets
    from edgeslim.compress.weight_quant import integer_weights
    model = tiny()
    data = teacher_targets(model, CalibData("t", calib().batches))  # float targets: every gradient is 0 here
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantized(model)
    layers = precision_layers(model, q, data)
    assert [l.name for l in layers] == ["layers.0", "layers.1", "layers.2"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # every weight put back
    base, ints = mean_loss(model, data), integer_weights(q)
    for layer in layers:
        w = model.get_submodule(layer.name).weight
        assert layer.dense_params == w.numel() * 4
        # int8 per output channel: one byte a weight, a scale and a zero point a row
        assert w.numel() < layer.quantized_cost <= w.numel() + w.shape[0] * 8
        saved = w.data
        w.data = ints[f"{layer.name}.weight"].dense().reshape(w.shape)
        assert layer.delta == pytest.approx(mean_loss(model, data) - base, abs=1e-7) and layer.delta > 0
        w.data = saved


def test_with_class_targets_the_loss_change_is_fishers_estimate():
    pytest.importorskip("nncf")
    from edgeslim.compress.train import task_loss
    from edgeslim.compress.weight_quant import integer_weights
    model, data = tiny(), calib()
    q = quantized(model)
    fisher = {}
    layers = precision_layers(model, q, data, fisher=fisher)
    assert sorted(fisher) == ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
    assert not any(p.requires_grad is False for p in model.parameters())  # requires_grad as it was (True)
    ints = integer_weights(q)
    for layer in layers:  # 0.5 * sum over weights of (mean over batches of the squared gradient) * dw**2
        w = model.get_submodule(layer.name).weight
        squares = []
        for batch, target in zip(data.batches, data.targets):
            model.zero_grad()
            task_loss(model(**batch), target).backward()
            squares.append(w.grad.square())
        dw = ints[f"{layer.name}.weight"].dense().reshape(w.shape) - w.detach()
        expected = 0.5 * float((sum(squares) / len(squares) * dw.square()).sum())
        assert expected > 0 and layer.delta == pytest.approx(expected, rel=1e-4)
    again = precision_layers(model, q, data, fisher={k: 2 * v for k, v in fisher.items()})  # the cache is used
    assert [a.delta for a in again] == pytest.approx([2 * l.delta for l in layers])


def test_the_allocation_keeps_the_most_loss_per_byte_fp32_within_the_budget():
    layers = [PrecisionLayer(str(i), 4000, 1000, d) for i, d in enumerate([0.5, 0.01, 0.3, -0.02, 0.2])]
    for room in range(6):  # room for `room` weights fp32 (each costs 3000 bytes more)
        budget = 5 * 1000 + room * 3000
        quantize = allocate_precision(layers, budget)
        fp32 = kept_fp32(layers, quantize)
        assert sum(4000 if n in fp32 else 1000 for n in quantize) <= budget
        lossy = [i for i in range(5) if layers[i].delta > 0]  # fp32 buys nothing back for the weight that loses none
        best = min(itertools.combinations(lossy, min(room, len(lossy))),
                   key=lambda keep: sum(max(layers[i].delta, 0) for i in range(5) if i not in keep))
        assert sorted(fp32) == sorted(str(i) for i in best)  # the exact optimum of equal-sized weights
        assert "3" not in fp32


def bytes_space(model, layers, wq_loss):
    loaded = LoadedModel(model, SourceSpec("zoo", "test"), [TensorSpec("input", ("batch", 64))], "generic", {})
    base = float(weight_bytes(model))
    quant_cost = base - sum(l.dense_params - l.quantized_cost for l in layers)
    wq = Combo((Stage("wq", "wq int8", {"method": "wq", "mode": "int8"}),), loaded, quant_cost, quant_cost, wq_loss,
               precision=layers)
    return Space([Combo((), loaded, base, base), wq], base, {}, None, 1)


def test_a_size_budget_with_slack_buys_loss_back_and_beats_the_stage_alone():
    model = tiny()
    layers = [PrecisionLayer(n, model.get_submodule(n).weight.numel() * 4, model.get_submodule(n).weight.numel() + 64,
                             d) for n, d in (("layers.0", 0.002), ("layers.1", 0.03),
                                                                         ("layers.2", 0.0005))]
    sp = bytes_space(model, layers, 0.033)
    aim = 1.6  # the whole stage is 3.8x smaller: room for the most sensitive weight (layers.1, 32 KB) in fp32
    e = estimate(sp.combos[1], sp, aim, "bytes")
    assert e.fp32 == ("layers.1",) and e.cost <= sp.base_cost / aim and e.loss == pytest.approx(0.033 - 0.03)
    steps = sp.combos[1].steps(e.ranks, "c", 1, e.fp32)
    assert steps == [{"method": "wq", "mode": "int8", "exclude": ["layers.1"]}]

    def verify(estimates, round_):  # the measured size is the estimate's; the metric drop is the estimated loss
        return [Point(e.label, e.families, [], e.gain, e.loss, e.gain, 1.0 - e.loss, e.loss, {}, e.combo.label,
                      round_, bool(e.fp32)) for e in estimates]

    outcome = search(sp, "bytes", aim, max_drop=0.01, verify=verify)
    assert outcome.met and outcome.chosen.mixed and outcome.chosen.label == "wq int8 (1 weights fp32)"
    alone = outcome.best_single["wq"]
    assert not alone.mixed and alone.label == "wq int8" and alone.drop > outcome.chosen.drop
    assert best_single(outcome.points, aim, 0.01)["wq"] is not outcome.chosen


def test_a_size_budget_also_verifies_the_greedys_first_weight_alone_and_keeps_the_better_measured_mix():
    """Each weight's loss is estimated alone, and those losses need not add (SmolLM2: the full mix measured worse
    than its first weight alone fp32): the search verifies both in its first round and chooses by measurement."""
    model = tiny()
    layers = [PrecisionLayer(n, model.get_submodule(n).weight.numel() * 4, model.get_submodule(n).weight.numel() + 64,
                             d) for n, d in (("layers.0", 0.002), ("layers.1", 0.03), ("layers.2", 0.0005))]
    sp = bytes_space(model, layers, 0.033)
    aim = 1.05  # room for every weight fp32 but the largest gain's margin
    full = estimate(sp.combos[1], sp, aim, "bytes")
    first = first_weight_mix(sp.combos[1], sp, aim)
    assert set(full.fp32) > {"layers.1"} and first.fp32 == ("layers.1",)  # the most loss per byte saved
    assert first.cost == pytest.approx(sp.combos[1].cost + layers[1].dense_params - layers[1].quantized_cost)
    assert first.loss == pytest.approx(0.033 - 0.03) and first.cost <= sp.base_cost / aim
    assert first_weight_mix(sp.combos[1], sp, sp.base_cost / (sp.combos[1].cost + 1000)) is None  # no room for it
    measured = {(): 0.033, ("layers.1",): 0.004}  # what the verification measures: the full mix loses more

    def verify(estimates, round_):
        return [Point(e.label, e.families, [], e.gain, e.loss, e.gain, 1.0 - measured.get(e.fp32, 0.02),
                      measured.get(e.fp32, 0.02), {}, e.combo.label, round_, bool(e.fp32)) for e in estimates]

    outcome = search(sp, "bytes", aim, max_drop=0.01, verify=verify, rounds=1)
    assert sorted(p.label for p in outcome.points) == ["wq int8", "wq int8 (1 weights fp32)",
                                                       f"wq int8 ({len(full.fp32)} weights fp32)"]
    assert outcome.met and outcome.chosen.label == "wq int8 (1 weights fp32)" and outcome.chosen.drop == 0.004


def test_an_int8_combo_is_costed_against_its_own_pruned_model():
    from edgeslim.optimize_space import set_dense_costs
    loaded = bytes_space(tiny(), [], 0.0).combos[0].loaded
    p75, p50 = (Stage("prune", f"prune {r}", {"method": "prune", "ratio": r}) for r in (0.75, 0.5))
    int8 = Stage("int8", "int8", {"method": "int8"})
    combos = [Combo(stages, loaded, cost) for stages, cost in
              [((), 10.0), ((p75,), 8.0), ((p50,), 5.0), ((int8,), 4.0), ((p75, int8), 3.0), ((p50, int8), 2.0)]]
    set_dense_costs(combos)
    assert [c.dense_cost for c in combos] == [10.0, 8.0, 5.0, 10.0, 8.0, 5.0]


@pytest.mark.slow
def test_tiny_bert_size_budget_keeps_wq_int8_when_int4_cannot_apply_and_fills_the_budget(in_tmp, capsys,
                                                                                        monkeypatch):
    """tiny-bert's linear maps take 32 inputs: wq int4's groups of 64 cannot apply, wq int8 still does."""
    import json
    from edgeslim.cli import main
    from edgeslim.sources import load_model
    monkeypatch.setenv("EDGESLIM_CACHE", str(in_tmp / "cache"))
    mb = weight_bytes(load_model("tiny-bert").model) / 1e6
    assert main(["optimize", "tiny-bert", "--size-mb", f"{mb * 0.8:.6f}", "--eval", "sentences", "--calib",
                 "sentences", "--max-drop", "0.05", "--families", "wq", "--rounds", "1", "-o", "out"]) == 0
    assert "stage wq int4 left out: group_size=64 does not divide" in capsys.readouterr().err
    summary = json.loads((in_tmp / "out" / "optimize.json").read_text())
    chosen = summary["chosen"]
    assert summary["met"] and chosen["mixed"] and chosen["steps"][0]["exclude"]
    assert 1 / 0.8 * 0.95 <= chosen["gain"] < 3  # within the budget, weights put back fp32 (int8 alone is ~3.9x)
    alone = [p for p in summary["points"] if p["label"] == "wq int8"]
    assert alone and alone[0]["gain"] > chosen["gain"]
