"""`factorize` on trained CNNs: which convolutions it factors (depthwise skipped by default, only
parameter-saving ranks) and the data-aware allocation on the model's output change."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.compress.base import get_compressor
from edgeslim.compress.separable_conv import SeparableConv2d
from edgeslim.core.errors import ConfigError


class MobileBlock(nn.Module):
    """A stem, a depthwise 3x3 and a depthwise 5x5 with a 1x1 between, a 1x1 head (MobileNet-like)."""

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.dw3 = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.mix = nn.Conv2d(width, 2 * width, 1)
        self.dw5 = nn.Conv2d(2 * width, 2 * width, 5, padding=2, groups=2 * width)
        self.head = nn.Conv2d(2 * width, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.dw3(torch.relu(self.stem(x))))
        return self.head(torch.relu(self.dw5(torch.relu(self.mix(y))))).mean((2, 3))


def calib_batches(n: int = 2, cin: int = 3, size: int = 10) -> CalibData:
    return CalibData("rand", [{"x": torch.randn(4, cin, size, size, generator=torch.Generator().manual_seed(i))}
                              for i in range(n)])


def test_depthwise_convs_are_skipped_by_default_and_named():
    comp = get_compressor("factorize")
    model = MobileBlock()
    result = comp.compress(model, comp.make_config({"ratio": 0.6, "n_iter": 10}))
    status = {c.name: c.status for c in result.changes}
    assert [c.name for c in result.changes] == ["stem", "dw3", "mix", "dw5", "head"]  # model order
    assert status["dw3"] == status["dw5"] == "skipped"
    assert sorted(result.resolved["skipped"]) == ["dw3", "dw5"]
    reason = result.resolved["skipped"]["dw3"]
    assert "depthwise 3x3" in reason and "depthwise = true" in reason
    assert isinstance(result.model.dw3, nn.Conv2d) and isinstance(result.model.dw5, nn.Conv2d)
    assert all(c.params_after == c.params_before for c in result.changes if c.status == "skipped")
    # opting in: a depthwise 3x3 saves only at rank 1 (8C < 9C weights), so a rank budget of 1 factors it
    opted = comp.compress(model, comp.make_config({"rank": 1, "depthwise": True, "n_iter": 10}))
    assert isinstance(opted.model.dw3, SeparableConv2d) and opted.resolved["skipped"] == {}
    # replay rebuilds only what was factored
    replayed = comp.replay(MobileBlock(), result.resolved, [])
    replayed.load_state_dict(result.model.state_dict(), strict=True)


@pytest.mark.parametrize("rank", [1, 2, 3, 6])
def test_a_layer_is_factored_only_when_it_keeps_fewer_parameters(rank):
    comp = get_compressor("factorize")
    model = MobileBlock()
    for init in ("cp", "fresh"):
        result = comp.compress(model, comp.make_config({"rank": rank, "depthwise": True, "init": init, "n_iter": 10}))
        for change in result.changes:
            conv = model.get_submodule(change.name)
            factored = SeparableConv2d.param_count(conv.in_channels, conv.out_channels, conv.kernel_size, rank,
                                                   conv.groups, bias=conv.bias is not None)
            dense = conv.weight.numel() + conv.bias.numel()
            new = result.model.get_submodule(change.name)
            assert (change.status == "replaced") == (factored < dense) == isinstance(new, SeparableConv2d), change
            assert change.params_after == (factored if factored < dense else dense)
            assert change.params_after == sum(p.numel() for p in new.parameters())
    # the depthwise 3x3 (9C weights) saves at rank 1 only, the 5x5 (25C) up to rank 2 (24C)
    assert (rank == 1) == ("dw3" in result.resolved["ranks"]) and (rank <= 2) == ("dw5" in result.resolved["ranks"])
    # ratio budgets never pick a rank that does not save either
    for data in (None, calib_batches()):
        ratio = comp.compress(model, comp.make_config({"ratio": 0.7, "depthwise": True, "n_iter": 10}), data)
        assert all(c.params_after < c.params_before for c in ratio.changes if c.status == "replaced")


class TwoBranches(nn.Module):
    """y = a(x) + 0.001 * b(x) with identical kernels: equal kernel errors, b barely moves the output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.b.load_state_dict(self.a.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + 1e-3 * self.b(x)


def test_calibration_data_allocates_on_the_output_change():
    comp = get_compressor("factorize")
    model = TwoBranches()
    cfg = comp.make_config({"ratio": 0.5, "n_iter": 30})
    blind = comp.compress(model, cfg)  # no data: "auto" is uniform on equal layers
    assert blind.config["allocation"] == "uniform" and blind.resolved["ranks"]["a"] == blind.resolved["ranks"]["b"]
    measured = comp.compress(model, cfg, calib_batches(cin=8))
    assert measured.config["allocation"] == "sensitivity"  # "auto" with data: the output-change greedy
    rows = {c.name: c for c in measured.changes}
    assert all(c.sensitivity is not None for c in rows.values())
    assert rows["b"].sensitivity < 1e-3 * rows["a"].sensitivity + 1e-12
    # the budget goes where the output needs it: a keeps a higher rank than b
    assert measured.resolved["ranks"].get("a", 10 ** 9) > measured.resolved["ranks"]["b"]
    x = calib_batches(1, cin=8).batches[0]["x"]
    with torch.no_grad():
        reference = model(x)
        err = {k: float((r.model(x) - reference).square().sum() / reference.square().sum())
               for k, r in (("blind", blind), ("measured", measured))}
    assert err["measured"] < err["blind"]
    assert sum(c.params_after for c in measured.changes) <= 0.5 * sum(c.params_before for c in measured.changes)


def test_selection_errors_are_clear():
    comp = get_compressor("factorize")
    only_depthwise = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6))
    with pytest.raises(ConfigError, match="depthwise"):
        comp.compress(only_depthwise, comp.make_config({"ratio": 0.5}))
    with pytest.raises(ConfigError, match="depthwise"):
        comp.make_config({"depthwise": "maybe"})
    with pytest.raises(ConfigError, match="sensitivity_batches"):
        comp.make_config({"sensitivity_batches": 0})


def test_greedy_weighs_dense_against_full_rank_kernels_and_fills_the_budget():
    """Full-rank 1x1 kernels at their largest saving rank keep nearly every parameter at a large error:
    the shared greedy (convex hull ending at dense) cuts 5% from the big layer alone, at the largest
    rank that fits, and leaves the small ones dense (the ladder without dense also cut a small one,
    at twice the total error)."""
    from edgeslim.compress.base import BudgetConfig
    from edgeslim.compress.factorized_conv import ConvBudgetLayer
    from edgeslim.compress.lowrank_budget import allocate

    torch.manual_seed(0)
    convs = {"big": nn.Conv2d(64, 64, 1), **{f"s{i}": nn.Conv2d(16, 16, 1) for i in range(4)}}
    layers = [ConvBudgetLayer(n, c, 10, 0) for n, c in convs.items()]
    for l in layers:
        l.errors = {r: l.kernel_error(r) for r in l.grid(1)}
    total = sum(l.dense_params for l in layers)
    ranks = allocate(layers, BudgetConfig(ratio=0.95, allocation="sensitivity", align=1))
    assert [n for n, r in ranks.items() if r is not None] == ["big"]
    kept = sum(l.dense_params if ranks[l.name] is None else l.params_at(ranks[l.name]) for l in layers)
    assert kept <= 0.95 * total < kept + 128  # rank + 1 (128 more parameters) would not fit
