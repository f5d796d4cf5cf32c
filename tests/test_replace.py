"""Module selection by regex, exact name, dotted suffix, type and exclude."""
import pytest
from torch import nn

from edgeslim.compress.replace import count_params, select_modules, set_submodule
from edgeslim.core.errors import ConfigError


def model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(),
                         nn.Sequential(nn.Linear(8, 8), nn.Conv1d(1, 1, 3)), nn.Linear(8, 2))


def names(found):
    return [n for n, _ in found]


def test_select_all_linears_by_default():
    assert names(select_modules(model())) == ["0", "2.0", "3"]


def test_regex_is_fullmatch():
    assert names(select_modules(model(), target=r"\d")) == ["0", "3"]
    assert names(select_modules(model(), target=r"2\..*")) == ["2.0"]


def test_list_matches_exact_names_and_dotted_suffixes():
    assert names(select_modules(model(), target=["3", "0"])) == ["0", "2.0", "3"]  # "0" is also the suffix of 2.0
    assert names(select_modules(model(), target=["2.0"])) == ["2.0"]


def test_exclude_and_types():
    assert names(select_modules(model(), exclude=["3"])) == ["0", "2.0"]
    assert names(select_modules(model(), types=(nn.Conv1d,))) == ["2.1"]


def test_nothing_matches_lists_nearest_names():
    with pytest.raises(ConfigError, match=r"nearest names: \[.*'2\.0'"):
        select_modules(model(), target=r"2\.00")


def test_bad_regex_and_no_candidates():
    with pytest.raises(ConfigError, match="invalid module pattern"):
        select_modules(model(), target="(")
    with pytest.raises(ConfigError, match="no Embedding module"):
        select_modules(model(), types=(nn.Embedding,))


def test_set_submodule_and_count():
    m = model()
    set_submodule(m, "2.0", nn.Identity())
    assert isinstance(m[2][0], nn.Identity)
    assert count_params(m) == (4 * 8 + 8) + (3 + 1) + (8 * 2 + 2)
