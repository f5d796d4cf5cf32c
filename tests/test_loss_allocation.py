"""Loss-measured sensitivity allocation for the low-rank family (compress/sensitivity.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.compress.base import StatsRequest
from edgeslim.compress.statistics import collect_stats
from edgeslim.compress.replace import set_submodule
from edgeslim.compress.sensitivity import compress_by_loss, loss_per_error, mean_loss, profile_lowrank
from edgeslim.compress.svd import ASVD, SVD
from edgeslim.compress.train import teacher_targets
from edgeslim.core.errors import ConfigError

torch.set_num_threads(1)
TARGET = r"loud|quiet"


class TwoBranch(nn.Module):
    """Two linear maps with the SAME weight (same spectrum); the second one barely reaches the output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.loud, self.quiet, self.head = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        with torch.no_grad():
            self.quiet.weight.copy_(self.loud.weight)
            self.quiet.bias.copy_(self.loud.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.loud(x) + 0.01 * self.quiet(x)))


def calib() -> CalibData:
    g = torch.Generator().manual_seed(1)
    return CalibData("tiny", [{"x": torch.randn(64, 32, generator=g)} for _ in range(2)], None)


def test_loss_per_error_divides_and_floors():
    scales, floor = loss_per_error({"a": 2.0, "b": 0.5, "c": -1.0, "d": 0.0}, {"a": 0.5, "b": 0.25, "c": 0.1, "d": 0.2})
    assert floor == pytest.approx(0.01 * 4.0)  # positive raw values 2 and 4: median index 1 -> 4
    assert scales == pytest.approx({"a": 4.0, "b": 2.0, "c": floor, "d": floor})
    assert loss_per_error({"a": -1.0}, {"a": 1.0}) == ({"a": 1.0}, 1.0)  # nothing measurable: all equal


def test_profile_measures_each_layer_alone_at_the_uniform_probe():
    model, data = TwoBranch().eval(), calib()
    prof = profile_lowrank(SVD(), model, None, data, {"ratio": 0.5, "target": TARGET}, progress=False)
    assert set(prof.delta) == {"loud", "quiet"} and prof.probe_ranks == {"loud": 7, "quiet": 7}  # 7*64+32 <= 0.5*(1024+32)
    # recompute one delta by hand: the probe's factored layer alone, distillation loss against the original
    probe = SVD().compress(model, {"ratio": 0.5, "target": TARGET, "allocation": "uniform"})
    ref = teacher_targets(model, data)
    alone = TwoBranch().eval()
    set_submodule(alone, "loud", probe.model.get_submodule("loud"))
    assert prof.delta["loud"] == pytest.approx(mean_loss(alone, ref) - mean_loss(model, ref), rel=1e-6)
    assert prof.delta["loud"] > 100 * prof.delta["quiet"] > 0
    assert model.loud.__class__ is nn.Linear  # the original is put back


def test_allocation_follows_the_measured_loss_within_budget():
    model, data = TwoBranch().eval(), calib()
    config = {"ratio": 0.5, "target": TARGET}
    energy = SVD().compress(model, {**config, "allocation": "sensitivity"})  # same spectra: equal ranks
    assert abs(energy.resolved["ranks"]["loud"] - energy.resolved["ranks"]["quiet"]) <= 1  # a tie, broken by order
    prof = profile_lowrank(SVD(), model, None, data, config, progress=False)
    result = compress_by_loss(SVD(), model, None, config, prof)
    ranks = result.resolved["ranks"]
    assert ranks.get("loud", 32) >= ranks["quiet"] + 4  # "loud" may even stay dense
    assert result.params_after <= 0.5 * result.params_before + 64  # within one rank step of the budget
    assert result.config["allocation"] == "loss"  # the greedy on the measured scales
    assert {c.name: c.sensitivity for c in result.changes} == pytest.approx(prof.delta)
    ref = teacher_targets(model, data)
    assert mean_loss(result.model, ref) < mean_loss(energy.model, ref)


def test_loss_allocation_with_activation_statistics():
    model, data = TwoBranch().eval(), calib()
    stats = collect_stats(model, data, ["loud", "quiet"], StatsRequest(input_moments=True))
    prof = profile_lowrank(ASVD(), model, stats, data, {"ratio": 0.6, "target": TARGET}, progress=False)
    result = compress_by_loss(ASVD(), model, stats, {"ratio": 0.4, "target": TARGET}, prof)  # another ratio
    assert result.params_after <= 0.4 * result.params_before + 64
    assert result.resolved["ranks"].get("loud", 32) > result.resolved["ranks"]["quiet"]


def test_loss_profile_errors_are_named():
    model, data = TwoBranch().eval(), calib()
    with pytest.raises(ConfigError, match="needs a ratio"):
        profile_lowrank(SVD(), model, None, data, {"rank": 4, "target": TARGET}, progress=False)
    prof = profile_lowrank(SVD(), model, None, data, {"ratio": 0.5, "target": TARGET}, progress=False)
    with pytest.raises(ConfigError, match="cannot allocate 'asvd'"):
        compress_by_loss(ASVD(), model, None, {"ratio": 0.5, "target": TARGET}, prof)


def test_allocation_loss_is_a_config_value_of_the_low_rank_family():
    model, data = TwoBranch().eval(), calib()
    config = {"ratio": 0.5, "target": TARGET}
    via_config = SVD().compress(model, {**config, "allocation": "loss"}, data)
    by_hand = compress_by_loss(SVD(), model, None, config, profile_lowrank(SVD(), model, None, data, config, progress=False))
    assert via_config.resolved["ranks"] == by_hand.resolved["ranks"]
    assert via_config.config["allocation"] == "loss"  # the manifest says how the ranks were chosen
    assert via_config.resolved["loss_profile"]["layers"] == 2 and via_config.resolved["loss_profile"]["data"] == "tiny"
    assert model.loud.__class__ is nn.Linear  # the caller's model is untouched


def test_allocation_loss_honours_inplace():
    model, data = TwoBranch().eval(), calib()
    result = SVD().compress(model, {"ratio": 0.5, "target": TARGET, "allocation": "loss"}, data, inplace=True)
    assert result.model is model and model.loud.__class__ is not nn.Linear  # factored in the caller's model


def test_allocation_loss_errors_are_named():
    model, data = TwoBranch().eval(), calib()
    with pytest.raises(ConfigError, match="needs a ratio budget"):
        SVD().compress(model, {"rank": 4, "allocation": "loss"}, data)
    with pytest.raises(ConfigError, match="give some"):
        SVD().compress(model, {"ratio": 0.5, "allocation": "loss"})
    with pytest.raises(ConfigError, match="call compress"):
        SVD().compress_with_stats(model, {"ratio": 0.5, "allocation": "loss"}, None)
    from edgeslim.compress.prune import PruneConfig
    with pytest.raises(ConfigError, match="no loss-measured allocation"):
        PruneConfig(allocation="loss")


def test_cli_compress_with_loss_allocation_replays(in_tmp):
    from edgeslim import artifact
    from edgeslim.cli import main
    from edgeslim.trust import Trust
    code = main(["compress", "edgeslim_test_factories:tiny", "--input", "x:batch,16", "-m", "svd", "--ratio", "0.5",
                 "--set", "allocation=loss", "--set", "align=1", "--calib", "random:16", "-o", "m.slim"])
    assert code == 0
    loaded = artifact.load("m.slim", Trust(factory="edgeslim_test_factories:tiny"))
    step = loaded.steps[0]
    assert step["config"]["allocation"] == "loss" and step["resolved"]["loss_profile"]["data"] == "random:16"
    x = torch.randn(3, 16)
    assert loaded.model(x=x).shape == (3, 4)
