"""Every bad input is one line with its exit code, never a traceback; and a property-based fuzz of
manifests, recipes and CLI options that holds every case to the same rule."""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeslim.cli import main
from edgeslim.core.errors import EdgeslimError
from edgeslim.recipe import ExportSection, ProfileSection, RecipeSection, parse_recipe

DOCUMENTED = {0, 1, 2, 3, 4, 5}  # README "Errors are one line with an exit code"
FACTORY = "edgeslim_test_factories:tiny"


def one_line_error(err: str) -> None:
    lines = [line for line in err.strip().splitlines() if not line.startswith(("warning:", "done "))]
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("error: "), err


def _bad_hf_folder() -> list[str]:
    Path("hf").mkdir()
    Path("hf", "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    Path("hf", "model.safetensors").write_bytes(b"\x00" * 64)
    return ["export", "hf", "-o", "hf.onnx"]


def _calib(tensors: dict) -> list[str]:
    from safetensors.torch import save_file
    save_file(tensors, "calib.safetensors")
    return ["compress", "tiny-mlp", "-m", "fwsvd", "--calib", "calib.safetensors", "-o", "m.slim"]


@pytest.mark.parametrize("make, code, message", [
    (lambda: ["compress", FACTORY, "--input", "x:a,b,c", "-m", "svd", "-o", "m.slim"], 2, "does not run on its inputs"),
    (lambda: ["compress", FACTORY, "--input", "x:batch,-3", "-m", "svd", "-o", "m.slim"], 2, "neither a positive"),
    (lambda: ["compress", FACTORY, "--input", "x:batch,99", "-m", "svd", "-o", "m.slim"], 2, "does not run on its inputs"),
    (lambda: ["compress", FACTORY, "--input", "x:batch,16:float128", "-m", "svd", "-o", "m.slim"], 2, "dtype"),
    (lambda: ["compress", FACTORY, "--input", ";", "-m", "svd", "-o", "m.slim"], 2, "names no input"),
    (lambda: ["compress", "edgeslim_test_factories:raises", "--input", "x:batch,16", "-m", "svd"], 3,
     "this factory is broken"),
    (lambda: ["compress", "no_such_module_xyz:f", "-m", "svd"], 3, "cannot import factory"),
    (lambda: ["compress", FACTORY, "--weights", "/etc/passwd", "--input", "x:batch,16", "-m", "svd"], 3,
     "cannot read weights file"),
    (lambda: ["compress", FACTORY, "--weights", "missing.pt", "--input", "x:batch,16", "-m", "svd"], 3, "not found"),
    (_bad_hf_folder, 3, "cannot load the Hugging Face folder"),
    (lambda: _calib({"x": torch.zeros(8, 3)}), 3, "has shape (8, 3)"),
    (lambda: _calib({"x": torch.zeros(8, 16, dtype=torch.int64)}), 3, "is int64"),
    (lambda: _calib({"y": torch.zeros(8, 16)}), 3, "no tensor for input"),
    (lambda: ["profile", "tiny-mlp", "--batch", "-1"], 2, "positive integers"),
    (lambda: ["profile", "tiny-mlp", "--batch", "1,x"], 2, "positive integers"),
    (lambda: ["profile", "tiny-mlp", "--dim", "batch=0"], 2, "positive SIZE"),
    (lambda: ["profile", "tiny-mlp", "--profile", "cpu-torch-fp32", "--batch", str(10 ** 12)], 2, "elements"),
    (lambda: ["profile", "tiny-mlp", "--iters", "0"], 2, "--iters"),
    (lambda: ["export", "edgeslim_test_factories:branchy", "-o", "b.onnx"], 5, "GuardOnDataDependentSymNode"),
    (lambda: ["upscale", "missing.png", "-o", "o.png", "--model", "bicubic-x2"], 3, "image file not found"),
    (lambda: ["compress", "tiny-mlp"], 2, "Missing option '-m'"),
    (lambda: ["compress", "tiny-mlp", "-m", "svd", "--bogus"], 2, "No such option"),
    (lambda: ["profile", "tiny-mlp", "--iters", "many"], 2, "'many' is not a valid integer"),
    (lambda: ["nosuchcommand"], 2, "No such command"),
])
def test_bad_input_is_one_line(in_tmp, capfd, make, code, message):
    args = make()
    before = sorted(p.name for p in in_tmp.iterdir())
    assert main(args) == code
    out, err = capfd.readouterr()
    one_line_error(err)
    assert message in err
    assert "W1201" not in err and "def forward" not in err  # torch's own log lines stay off stderr
    assert sorted(p.name for p in in_tmp.iterdir()) == before  # nothing written


def test_sixteen_bit_images_keep_their_precision(tmp_path):
    from PIL import Image

    from edgeslim.images import read_image
    values = np.array([[0, 257, 32896, 65535], [128, 65407, 1000, 40000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = read_image(tmp_path / "deep.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 4, 3)
    np.testing.assert_array_equal(rgb[..., 0], np.rint(values * (255 / 65535)).astype(np.uint8))
    assert main(["upscale", str(tmp_path / "deep.png"), "-o", str(tmp_path / "up.png"), "--model", "bicubic-x2"]) == 0


# ---- property-based fuzz: every case exits with a documented code, one line, no traceback, no output

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2, 10 ** 13) | st.floats(allow_nan=False) |
                    st.text(max_size=12) | st.sampled_from(["../x", "/etc/passwd", "tempfile:mkdtemp", "svd", "batch"]),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


@pytest.fixture(scope="module")
def good_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    assert main(["compress", "tiny-mlp", "-m", "svd", "--rank", "4", "--set", "align=1", "-o", str(root / "a.slim")]) == 0
    return root / "a.slim"


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.slow  # fuzzer
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_manifests(good_manifest, tmp_path, monkeypatch, capfd, data):
    """Replace one field (at any depth) of a good manifest with any JSON value, or drop it."""
    work = tmp_path / "w"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(good_manifest, work / "a.slim")
    (tmp_path / "secret.txt").write_text("outside")
    manifest = json.loads((work / "a.slim" / "manifest.json").read_text())
    path = data.draw(st.sampled_from([p for p in _paths(manifest) if p]))
    holder = manifest
    for key in path[:-1]:
        holder = holder[key]
    if data.draw(st.booleans()) and isinstance(holder, dict):
        del holder[path[-1]]
    else:
        holder[path[-1]] = data.draw(JSON)
    (work / "a.slim" / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(work)
    before = _snapshot(tmp_path)
    for args in (["inspect", "a.slim"], ["profile", "a.slim", "--profile", "cpu-torch-fp32", "--batch", "1",
                                         "--iters", "1", "--warmup", "0", "--json"]):
        rc = main(args)
        out, err = capfd.readouterr()
        assert rc in DOCUMENTED and "Traceback" not in err, (path, args, err)
        if rc:
            one_line_error(err)
        assert _snapshot(tmp_path) == before


def test_a_change_row_without_a_name_is_refused(good_manifest, tmp_path, capfd):
    """What the fuzz above found once: inspect read each change row's name unchecked (a KeyError traceback)."""
    shutil.copytree(good_manifest, tmp_path / "a.slim")
    manifest = json.loads((tmp_path / "a.slim" / "manifest.json").read_text())
    del manifest["steps"][0]["changes"][0]["name"]
    (tmp_path / "a.slim" / "manifest.json").write_text(json.dumps(manifest))
    assert main(["inspect", str(tmp_path / "a.slim")]) == 3
    err = capfd.readouterr().err
    one_line_error(err)
    assert "'changes' must be a list of rows with a name" in err


RECIPE_KEYS = [f.name for f in dataclasses.fields(RecipeSection)] + ["junk"]
SECTION_KEYS = [f.name for f in dataclasses.fields(ProfileSection) + dataclasses.fields(ExportSection)
                ] + ["junk"]
RECIPE_VALUES = JSON | st.sampled_from(["tiny-mlp", "cpu-ort-fp32", "onnx", "../../x", "/tmp/x", [1, 8], []]) | \
    st.dictionaries(st.sampled_from(SECTION_KEYS), JSON | st.sampled_from(["cpu-ort-fp32", "onnx", [1]]), max_size=3)


@pytest.mark.slow  # fuzzer
@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(RECIPE_KEYS), RECIPE_VALUES, max_size=6))
def test_fuzz_recipes(data):
    """A recipe is accepted whole (with a plain name) or refused with an edgeslim error, before any work."""
    try:
        recipe = parse_recipe(data)
    except EdgeslimError as exc:
        assert exc.exit_code in DOCUMENTED
        return
    assert "/" not in recipe.name and ".." not in recipe.name and isinstance(recipe.source, str)


TOKENS = st.sampled_from(["tiny-mlp", "-m", "svd", "fwsvd", "--rank", "0", "-1", "4", "abc", "--ratio", "2", "0.5",
                          "--energy", "--calib", "random:8", "nosuch", "--set", "align=4", "rnak=3", "--target",
                          "fc1", "[", "--weights", "/etc/passwd", "--input", "x:batch,16", "x:a,b", "-o", ".", "..",
                          "/", "m.slim", "x.onnx", "--source", "edgeslim_test_factories:raises", "--trust-source",
                          "--batch", "1,2",
                          "--dim", "batch=0", "--profile", "cpu-torch-fp32", "--iters", "1", "--to", "tflite"])


@pytest.mark.slow  # fuzzer
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["compress", "export", "profile"]), args=st.lists(TOKENS, max_size=7))
def test_fuzz_cli_options(tmp_path, monkeypatch, capfd, command, args):
    work = tmp_path / "w"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    if command == "profile":
        args = args + ["--iters", "1", "--warmup", "0"]
    rc = main([command] + args)
    out, err = capfd.readouterr()
    assert rc in DOCUMENTED and "Traceback" not in err, (command, args, err)
    if rc:
        one_line_error(err)
        assert sorted(p.name for p in work.iterdir()) == ["keep.txt"], (command, args)
    assert (work / "keep.txt").read_text() == "mine"
