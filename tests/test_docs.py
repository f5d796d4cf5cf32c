"""docs/architecture.md tells the truth: it names every module, and its worked example of adding a
compressor is a family that passes the contract test."""
from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

import test_contract
from edgeslim.compress import base

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("edgeslim", "edgeslim/core", "compress", "export", "runtime")


def test_every_module_is_named_in_the_architecture():
    text = DOC.read_text()
    modules = [p for folder in PACKAGES for p in sorted((ROOT / folder).glob("*.py")) if p.name != "__init__.py"]
    assert len(modules) > 70
    missing = [str(p.relative_to(ROOT)) for p in modules if not re.search(rf"(?<![\w.]){re.escape(p.name)}", text)]
    assert not missing, f"docs/architecture.md does not name {missing}"


def test_the_modules_that_tie_the_packages_together_are_named():
    import ast
    rule = DOC.read_text().split("only the application ties them together", 1)[1].split("\n\n", 1)[0]
    for path in sorted((ROOT / "edgeslim").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        packages = {p for p in ("compress", "export", "runtime") if any(m.startswith(f"edgeslim.{p}") for m in imported)}
        if len(packages) > 1:
            assert f"`{path.name}`" in rule, f"{path.name} imports {sorted(packages)}: name it in the dependency rule"


def example() -> str:
    section = DOC.read_text().split("## Adding a compressor", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_worked_example_is_a_family_that_passes_the_contract(tmp_path, monkeypatch):
    (tmp_path / "family").mkdir()
    (tmp_path / "family" / "half_rank.py").write_text(example())
    monkeypatch.syspath_prepend(str(tmp_path / "family"))
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # registered for this test only
    monkeypatch.setitem(test_contract.CASES, "half_rank", test_contract.Case(
        test_contract.RANK4, {}, test_contract.random_inputs, lossless={}))  # the doc's contract case
    try:
        module = importlib.import_module("half_rank")
        comp = base.get_compressor("half_rank")
        assert type(comp) is module.HalfRank and comp.statistics(comp.make_config({})).input_moments
        test_contract.test_contract("half_rank", tmp_path)
        with pytest.raises(base.ConfigError, match="damping"):
            comp.make_config({"damping": 0})
    finally:
        sys.modules.pop("half_rank", None)


def test_the_cli_reference_is_the_commands_own_help():
    from edgeslim.cli_reference import reference

    assert (ROOT / "docs" / "cli.md").read_text() == reference(), \
        "docs/cli.md drifted from the commands: python -m edgeslim.cli_reference > docs/cli.md"
