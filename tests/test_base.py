"""The compressor registry, config validation and the shared budget."""
import pytest
import torch

from edgeslim.core.calib import CalibData
from edgeslim.compress.base import BudgetConfig, Compressor, get_compressor, list_compressors, register
from edgeslim.core.errors import ConfigError


def test_registry_lists_families_and_rejects_duplicates():
    names = list_compressors()
    assert {"svd", "fwsvd", "asvd", "heal", "espcn", "deconv_to_subpixel"} <= set(names)

    class Clash(Compressor):
        name = "svd"

    with pytest.raises(ValueError, match="registered twice"):
        register(Clash)
    assert list_compressors()["svd"] is not Clash


def test_unknown_compressor_lists_available():
    with pytest.raises(ConfigError, match="available: .*svd"):
        get_compressor("svdd")


@pytest.mark.parametrize("bad, match", [
    ({"ratio": 0.5, "rank": 4}, "one budget form"),
    ({"ratio": 1.5}, "ratio must be"),
    ({"energy": 0.0}, "energy must be"),
    ({"rank": 0}, "rank must be"),
    ({"allocation": "greedy"}, "allocation"),
    ({"align": 0}, "align"),
    ({"target": 3}, "target"),
])
def test_budget_validation(bad, match):
    with pytest.raises(ConfigError, match=match):
        BudgetConfig.from_dict(bad)


def test_config_unknown_key_lists_allowed():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['ratoi'\].*allowed"):
        get_compressor("svd").make_config({"ratoi": 0.5})


def test_budget_default_and_list_targets():
    cfg = BudgetConfig.from_dict({"target": ["fc1", "fc2"]})
    assert cfg.ratio == 0.5 and cfg.target == ("fc1", "fc2")
    hash(cfg)  # frozen and hashable


def test_calib_data_checks_lengths():
    with pytest.raises(ConfigError, match="no batches"):
        CalibData("x", [])
    with pytest.raises(ConfigError, match="1 targets for 2 batches"):
        CalibData("x", [{"x": torch.zeros(1)}] * 2, [torch.zeros(1)])
