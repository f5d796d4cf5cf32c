"""The compressor registry, config validation and the shared budget."""
import subprocess
import sys

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


def test_list_compressors_shows_every_key_with_its_default_and_meaning(capsys):
    import dataclasses

    from edgeslim.cli import main
    from edgeslim.core.config import field_docs
    assert main(["list", "compressors"]) == 0
    text = capsys.readouterr().out
    for name, cls in list_compressors().items():
        assert f"\n{name} (" in f"\n{text}"
        for key, doc in field_docs(cls.Config).items():
            assert doc, f"{name}: config key '{key}' has no comment saying what it means"
            default = next(f.default for f in dataclasses.fields(cls.Config) if f.name == key)
            assert f"  {key} = " in text and doc in text
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                assert f"  {key} = {default:g}" in text or f"  {key} = {default}" in text


def test_the_torch_free_compressor_table_is_what_the_classes_say():
    """`list compressors` reads edgeslim/compressor_table.py (no torch): it must hold exactly the rows of
    the Config classes and the installed families."""
    from pathlib import Path

    from edgeslim import compressor_table
    from edgeslim.catalog import compressor_entry_points, compressor_table_source, describe_compressors
    from edgeslim.compress.base import ENTRY_POINT_GROUP, compressor_rows
    assert compressor_table.ROWS == compressor_rows() and compressor_table.GROUP == ENTRY_POINT_GROUP
    assert compressor_table.ENTRY_POINTS == compressor_entry_points(ENTRY_POINT_GROUP)
    assert describe_compressors(compressor_table.ROWS) == describe_compressors(compressor_rows())
    assert Path(compressor_table.__file__).read_text() == compressor_table_source(), \
        "regenerate: python -m edgeslim.catalog > edgeslim/compressor_table.py"


def test_list_compressors_reads_the_classes_when_the_installed_families_differ():
    """A family the table was not written from (another package's entry point): the rows come from the
    classes, which import it (torch then), never from a table that would leave it out."""
    code = ("import sys, edgeslim.catalog as c; from edgeslim import compressor_table as t; "
            "c.compressor_entry_points = lambda group: {**t.ENTRY_POINTS, 'mine': 'edgeslim.compress.svd'}; "
            "rows = c.compressor_rows(); print('torch' in sys.modules, rows == t.ROWS)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["True", "True"], done.stdout + done.stderr


def test_one_vocabulary_across_families():
    from edgeslim.compress.base import RatioBudgetConfig, TargetConfig
    from edgeslim.compress.train import HealingConfig
    configs = {name: cls.Config for name, cls in list_compressors().items()}
    for name, config in configs.items():  # target/exclude, heal_steps/heal_lr, profile_batches: declared once
        for key, home in (("exclude", TargetConfig), ("heal_steps", HealingConfig), ("profile_batches", None)):
            owners = [c for c in config.__mro__ if key in c.__dict__.get("__annotations__", {})]
            assert len(owners) <= 1 and (home is None or owners in ([], [home])), (name, key, owners)
    assert {n for n, c in configs.items() if getattr(c, "loss_allocation", False)} == {"svd", "fwsvd", "asvd", "mpo"}
    assert {n for n, c in configs.items() if "heal_steps" in c.__dataclass_fields__} == {"mpo", "prune"}
    prune = configs["prune"]
    assert issubclass(prune, RatioBudgetConfig) and not {"rank", "energy", "speedup"} & set(prune.__dataclass_fields__)
