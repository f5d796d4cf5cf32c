"""The local cache of converted models: relocatable root, built once, list and clear (API and CLI)."""
import pytest

from edgeslim import cache
from edgeslim.cli import main
from edgeslim.core.errors import ConfigError
from edgeslim.core.files import OWNER


def test_entry_built_once_listed_and_cleared(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGESLIM_CACHE", str(tmp_path / "c"))
    assert cache.root() == tmp_path / "c" and cache.list_entries() == []
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "model.safetensors").write_bytes(b"x" * 10)

    path = cache.entry("m1", build)
    assert cache.entry("m1", build) == path and len(calls) == 1  # cached: not rebuilt
    assert (path / "model.safetensors").is_file()

    def broken(folder):
        (folder / "half").write_text("partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cache.entry("m2", broken)
    on_disk = 10 + (path / OWNER).stat().st_size  # the weights and edgeslim's ownership record
    assert [(e.name, e.size_bytes) for e in cache.list_entries()] == [("m1", on_disk)]  # nothing half-written
    with pytest.raises(ConfigError, match="plain folder name"):
        cache.entry("../x", build)
    assert main(["cache", "list"]) == 0 and "m1" in capsys.readouterr().out
    assert main(["cache", "clear", "nope"]) == 2
    assert main(["cache", "clear"]) == 0 and cache.list_entries() == []


def test_clear_removes_only_what_edgeslim_wrote(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGESLIM_CACHE", str(tmp_path))  # a cache root that also holds the user's own folders
    path = cache.entry("m1", lambda folder: (folder / "model.safetensors").write_bytes(b"x"))
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "model.safetensors").write_bytes(b"looks like an entry")  # not written by edgeslim
    grown = tmp_path / "m2"  # an entry edgeslim wrote, with a file the user added since
    cache.entry("m2", lambda folder: (folder / "model.safetensors").write_bytes(b"y"))
    (grown / "notes.txt").write_text("mine")
    assert [e.name for e in cache.list_entries()] == ["m1"]
    capsys.readouterr()
    assert main(["cache", "clear", "photos"]) == 2 and "left alone" in capsys.readouterr().err
    assert main(["cache", "clear"]) == 0
    assert not path.exists() and (mine / "model.safetensors").is_file() and (grown / "notes.txt").is_file()
