"""Hostile artifacts: each case tampers with a good artifact; every command that loads it refuses.

HOSTILE is the one table of cases. Every case runs through every loading command (export, profile,
compress, upscale --model, run) and `inspect`; each must exit with its code and a one-line message,
print no traceback, leave no output, and change no file anywhere under the test folder (the "outside"
folder beside the artifact holds the files a hostile manifest reaches for).

Extending it: a new file kind adds its cases to HOSTILE (or a list appended to it) with `base` naming
the good artifact it starts from, built in `good_artifacts`:
  - adapter artifacts naming a base: a base of the wrong hash, a base path from the manifest, ...;
  - INT8 parameters: scales/zero points of the wrong shape or dtype, a missing scale file, ...;
  - engine sidecars: an engine not listed in `files`, an engine for another ONNX hash, ...
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

import edgeslim_test_factories as factories
from edgeslim import pipeline
from edgeslim.cli import main
from edgeslim.core.files import sha256_file
from edgeslim.recipe import load_recipe

Tamper = Callable[[Path, Path], None]  # (artifact folder, a folder outside it) -> make the artifact hostile


@dataclass(frozen=True)
class Case:
    name: str
    tamper: Tamper
    code: int  # exit code of every command that loads the artifact
    message: str  # part of the one-line error
    base: str = "zoo"  # the good artifact it starts from (a key of good_artifacts)
    inspect_code: int | None = None  # `inspect` reads no decisions and no code: its code when it differs


def manifest(edit: Callable[[dict[str, Any], Path, Path], Any]) -> Tamper:
    """A tamper that edits manifest.json in place: edit(manifest, artifact, outside)."""
    def tamper(art: Path, outside: Path) -> None:
        data = json.loads((art / "manifest.json").read_text())
        edit(data, art, outside)
        (art / "manifest.json").write_text(json.dumps(data))
    return tamper


def raw(text: str) -> Tamper:
    def tamper(art: Path, outside: Path) -> None:
        (art / "manifest.json").write_text(text)
    return tamper


def _source(**fields: Any) -> Callable[[dict, Path, Path], None]:
    return lambda m, art, out: m["source"].update(fields)


def _secret_listed(name_of: Callable[[Path], str]) -> Callable[[dict, Path, Path], None]:
    def edit(m: dict, art: Path, outside: Path) -> None:
        m["files"][name_of(outside)] = sha256_file(outside / "secret.txt")
    return edit


def _symlink_weights(art: Path, outside: Path) -> None:
    shutil.copy(art / "weights.safetensors", outside / "weights.safetensors")
    (art / "weights.safetensors").unlink()
    (art / "weights.safetensors").symlink_to(outside / "weights.safetensors")


def _symlink_manifest(art: Path, outside: Path) -> None:
    shutil.copy(art / "manifest.json", outside / "manifest.json")
    (art / "manifest.json").unlink()
    (art / "manifest.json").symlink_to(outside / "manifest.json")


def _flip_weights(art: Path, outside: Path) -> None:
    data = bytearray((art / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (art / "weights.safetensors").write_bytes(bytes(data))


def _drop_weights_entry(m: dict, art: Path, outside: Path) -> None:
    _flip_weights(art, outside)  # tampered weights that no longer need to match a hash
    del m["files"]["weights.safetensors"]


def _first_step(**fields: Any) -> Callable[[dict, Path, Path], None]:
    return lambda m, art, out: m["steps"][0].update(fields)


def _rank(value: Any) -> Callable[[dict, Path, Path], None]:
    def edit(m: dict, art: Path, outside: Path) -> None:
        ranks = m["steps"][0]["resolved"]["ranks"]
        ranks[next(iter(ranks))] = value
    return edit


def _version_1(**source: Any) -> Callable[[dict, Path, Path], None]:
    def edit(m: dict, art: Path, outside: Path) -> None:
        m["format_version"] = 1
        m["source"].update(source)
    return edit


HOSTILE: list[Case] = [
    # 1. the manifest's source never names code to run
    Case("zoo name that is a module:function", manifest(_source(identifier="tempfile:mkdtemp")), 3, "unknown zoo model"),
    Case("zoo name of a test factory", manifest(_source(identifier="edgeslim_test_factories:explode")), 3,
         "unknown zoo model"),
    Case("factory source, not allowed", lambda art, out: None, 3, "--trust-source", base="factory", inspect_code=0),
    Case("factory swapped for another", manifest(_source(identifier="edgeslim_test_factories:explode")), 3,
         "--source edgeslim_test_factories:explode", base="factory", inspect_code=0),
    Case("factory os:abort", manifest(_source(kind="factory", identifier="os:abort")), 3, "--trust-source",
         inspect_code=0),
    Case("factory this:s", manifest(_source(kind="factory", identifier="this:s")), 3, "--trust-source", inspect_code=0),
    Case("factory name that is not one", manifest(_source(kind="factory", identifier="os.path; rm")), 3,
         "not pkg.mod:factory"),
    Case("source is the artifact itself", manifest(lambda m, art, out: m["source"].update(kind="artifact",
                                                                                        identifier=str(art))),
         3, "source kind 'artifact'"),
    Case("hf source without stored files", manifest(_source(kind="hf", identifier="/etc")), 3, "config.json"),
    Case("hf source file outside", manifest(_source(kind="hf", files=["../../outside/secret.txt"])), 3,
         "plain file names"),
    Case("source kind missing", manifest(lambda m, art, out: m["source"].pop("kind")), 3, "source kind"),
    # 2. every file the loader reads is listed and verified
    Case("weights dropped from files", manifest(_drop_weights_entry), 3, "weights.safetensors is read by the loader"),
    Case("files emptied", manifest(lambda m, art, out: m.update(files={})), 3, "not listed"),
    Case("files a list", manifest(lambda m, art, out: m.update(files=list(m["files"]))), 3, "'files' must be"),
    Case("weights modified", _flip_weights, 3, "does not match its SHA-256"),
    Case("weights missing", lambda art, out: (art / "weights.safetensors").unlink(), 3, "is missing"),
    Case("digest not hex", manifest(lambda m, art, out: m["files"].update({"weights.safetensors": "x"})), 3,
         "SHA-256 hex"),
    # 3. names are plain names inside the folder; symlinks refused
    Case("file name ../../outside", manifest(_secret_listed(lambda out: "../../outside/secret.txt")), 3, "plain name"),
    Case("absolute file name", manifest(_secret_listed(lambda out: str(out / "secret.txt"))), 3, "plain name"),
    Case("file name manifest.json", manifest(lambda m, art, out: m["files"].update({"manifest.json": "0" * 64})), 3,
         "plain name"),
    Case("weights a symlink", _symlink_weights, 3, "symbolic link"),
    Case("manifest a symlink", _symlink_manifest, 3, "symbolic link"),
    # manifest fields of the wrong JSON type or value
    Case("not JSON", raw("{not json"), 3, "corrupt manifest"),
    Case("JSON list", raw("[1, 2]"), 3, "not a JSON object"),
    Case("deeply nested JSON", raw("[" * 100_000 + "]" * 100_000), 3, "corrupt manifest"),
    Case("format 99", manifest(lambda m, art, out: m.update(format_version=99)), 3, "unknown artifact format version"),
    Case("format '2'", manifest(lambda m, art, out: m.update(format_version="2")), 3, "unknown artifact format version"),
    Case("format true", manifest(lambda m, art, out: m.update(format_version=True)), 3, "unknown artifact format"),
    Case("steps a dict", manifest(lambda m, art, out: m.update(steps={})), 3, "'steps' must be"),
    Case("step without method", manifest(lambda m, art, out: m["steps"][0].pop("method")), 3, "has no 'method'"),
    Case("step without config", manifest(lambda m, art, out: m["steps"][0].pop("config")), 3, "'config' must be"),
    Case("changes of the wrong type", manifest(_first_step(changes=[{"params_before": "many"}])), 3, "'changes'"),
    Case("rank 'abc'", manifest(_rank("abc")), 3, "cannot be replayed", inspect_code=0),
    Case("rank too large", manifest(_rank(10 ** 9)), 3, "cannot be replayed", inspect_code=0),
    Case("unknown method", manifest(_first_step(method="nosuch")), 3, "unknown compressor", inspect_code=0),
    Case("resolved a list", manifest(_first_step(resolved=[1])), 3, "'resolved' must be"),
    Case("input shape -1", manifest(lambda m, art, out: m["inputs"][0].update(shape=["batch", -1])), 3, "shape"),
    Case("input dtype float128", manifest(lambda m, art, out: m["inputs"][0].update(dtype="float128")), 3, "dtype"),
    Case("input name a path", manifest(lambda m, art, out: m["inputs"][0].update(name="../x")), 3, "valid name"),
    Case("input of 10**12 elements", manifest(lambda m, art, out: m["inputs"][0].update(shape=[10 ** 6, 10 ** 6])),
         3, "elements"),
    Case("dims 10**13", manifest(lambda m, art, out: m["dims"].update(batch=10 ** 13)), 3, "dim 'batch'"),
    Case("task a number", manifest(lambda m, art, out: m.update(task=3)), 3, "'task' must be"),
    # 10. format 1: migrated when safe, else refused with how to re-create it
    Case("format 1 of a Hugging Face folder", manifest(_version_1(kind="hf", identifier="/etc")), 3,
         "re-create it from that source"),
    Case("format 1 with weights unlisted", manifest(lambda m, art, out: (_version_1()(m, art, out),
                                                                         _drop_weights_entry(m, art, out))),
         3, "weights.safetensors is read by the loader"),
]

def _adapter_step(**fields: Any) -> Callable[[dict, Path, Path], None]:
    return lambda m, art, out: m["steps"][-1]["resolved"].update(fields)


def _adapter_site(name: str) -> Callable[[dict, Path, Path], None]:
    return lambda m, art, out: m["steps"][-1]["resolved"]["sites"][0].update(name=name)


# adapter artifacts: the base is the zoo model named or one the user names, checked by its hash
HOSTILE += [
    Case("adapter: base of another hash", manifest(lambda m, art, out: m.update(base_sha256="0" * 64)), 3,
         "was trained on base", base="adapter", inspect_code=0),
    Case("adapter: factory base", manifest(_source(kind="factory", identifier="os:abort")), 3,
         "names code to run", base="adapter", inspect_code=0),
    Case("adapter: site of a missing module", manifest(_adapter_site("hf.no.such.module")), 3,
         "adapter step in the manifest is malformed", base="adapter", inspect_code=0),
    Case("adapter: stored tensors not the trained ones", manifest(_adapter_step(trainable=["head.weight"])), 3,
         "does not fit the adapter's structure", base="adapter", inspect_code=0),
    Case("adapter: huge bottleneck", manifest(lambda m, art, out: m["steps"][-1]["resolved"]["sites"][0].update(
        bottleneck="many")), 3, "adapter step in the manifest is malformed", base="adapter", inspect_code=0),
]

COMMANDS = [
    ["export", "a.slim", "-o", "out.onnx"],
    ["profile", "a.slim", "--profile", "cpu-torch-fp32", "--batch", "1", "--iters", "1", "--warmup", "0"],
    ["compress", "a.slim", "-m", "svd", "--rank", "2", "-o", "b.slim"],
    ["upscale", "in.png", "-o", "up.png", "--model", "a.slim"],
    ["run", "recipe.toml", "-o", "run-out"],
]
OUTPUTS = ("out.onnx", "b.slim", "up.png", "run-out", "edgeslim-out")


@pytest.fixture(scope="module")
def good_artifacts(tmp_path_factory) -> dict[str, Path]:
    """One good artifact per base kind (the cases start from a copy)."""
    root = tmp_path_factory.mktemp("good")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["compress", "tiny-mlp", "-m", "svd", "--rank", "4", "--set", "align=1", "-o", "zoo.slim"]) == 0
        assert main(["compress", "edgeslim_test_factories:tiny", "--input", "x:batch,16", "-m", "svd",
                     "--rank", "4", "--set", "align=1", "-o", "factory.slim"]) == 0
        Path("train.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in
                                               [("good fine", "pos"), ("bad poor", "neg")] * 2))
        assert main(["train", "adapter", "tiny-bert", "--data", "train.jsonl", "-m", "compacter_pp", "--set",
                     "reduction=4", "--epochs", "1", "-o", "adapter.slim"]) == 0
    finally:
        os.chdir(cwd)
    return {"zoo": root / "zoo.slim", "factory": root / "factory.slim", "adapter": root / "adapter.slim"}


def snapshot(root: Path) -> dict[str, Any]:
    """Every path under `root` with its bytes (or link target), without following symlinks."""
    out: dict[str, Any] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder, name)
            key = str(p.relative_to(root))
            out[key] = ("link", os.readlink(p)) if p.is_symlink() else ("dir" if p.is_dir() else p.read_bytes())
    return out


def hostile_folder(tmp_path: Path, good: Path, case: Case) -> Path:
    work, outside = tmp_path / "work", tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("root:x:0:0")
    shutil.copytree(good, work / "a.slim")
    from PIL import Image
    Image.new("RGB", (12, 12)).save(work / "in.png")
    (work / "recipe.toml").write_text('source = "a.slim"\n\n[profile]\nname = "cpu-torch-fp32"\nbatch = [1]\n')
    case.tamper(work / "a.slim", outside)
    return work


@pytest.mark.parametrize("case", HOSTILE, ids=[c.name for c in HOSTILE])
def test_hostile_artifact_is_refused_everywhere(case, good_artifacts, tmp_path, monkeypatch, capfd):
    work = hostile_folder(tmp_path, good_artifacts[case.base], case)
    monkeypatch.chdir(work)
    monkeypatch.setenv(factories.CALLED, str(tmp_path / "factory-ran"))
    had_this = "this" in sys.modules
    before = snapshot(tmp_path)
    for args in COMMANDS + [["inspect", "a.slim"]]:
        code = case.inspect_code if args[0] == "inspect" and case.inspect_code is not None else case.code
        rc = main(list(args))
        out, err = capfd.readouterr()
        assert rc == code, (args, out, err)
        assert "Traceback" not in out + err, args
        if code:
            assert case.message in err, (args, err)
            assert len(err.strip().splitlines()) == 1 or err.count("warning:") == len(err.strip().splitlines()) - 1
        assert not any((work / o).exists() for o in OUTPUTS), args
        assert snapshot(tmp_path) == before, args
    assert not (tmp_path / "factory-ran").exists()
    assert ("this" in sys.modules) == had_this


def test_good_artifacts_load_and_factory_needs_to_be_named(good_artifacts, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch_profile = ["--profile", "cpu-torch-fp32", "--batch", "1", "--iters", "1", "--warmup", "0"]
    assert main(["profile", str(good_artifacts["zoo"])] + torch_profile) == 0
    factory = str(good_artifacts["factory"])
    assert main(["export", factory, "-o", "f.onnx"]) == 3
    assert main(["export", factory, "-o", "f.onnx", "--source", "edgeslim_test_factories:raises"]) == 3
    assert "you named 'edgeslim_test_factories:raises'" in capsys.readouterr().err
    assert main(["export", factory, "-o", "f.onnx", "--source", "not a factory"]) == 2
    assert not Path("f.onnx").exists()
    assert main(["export", factory, "-o", "f.onnx", "--source", "edgeslim_test_factories:tiny"]) == 0
    assert main(["profile", factory, "--trust-source"] + torch_profile) == 0
    Path("r.toml").write_text(f'source = "{factory}"\n[profile]\nname = "cpu-torch-fp32"\n')
    assert main(["run", "r.toml", "-q", "-o", "out"]) == 3 and not Path("out").exists()
    Path("r.toml").write_text(f'source = "{factory}"\nsource_factory = "edgeslim_test_factories:tiny"\n')
    recipe = load_recipe("r.toml")
    pipeline.compress_to_artifact(recipe.source, recipe.steps, "out.slim", quiet=True, trust=recipe.trust)
    assert main(["inspect", "out.slim"]) == 0
