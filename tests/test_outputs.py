"""Data safety: outputs replace only edgeslim's own, never the input; a killed save loses nothing;
artifacts chain and move (compress -> compress the artifact -> load -> export -> compare)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeslim import artifact, pipeline
from edgeslim.cli import main
from edgeslim.core import files
from edgeslim.core.errors import ConfigError
from edgeslim.core.files import ARTIFACT, ONNX, TEMP_SUFFIX, clean_stale_temps, replace_output, write_owner

TESTS = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("make, args", [
    (lambda: Path("m.slim").mkdir() or Path("m.slim", "thesis.tex").write_text("years of work"),
     ["compress", "tiny-mlp", "-m", "svd", "-o", "m.slim"]),
    (lambda: Path("m.slim").write_text("a file"), ["compress", "tiny-mlp", "-m", "svd", "-o", "m.slim"]),
    (lambda: Path("notes.txt").write_text("keep me"), ["export", "tiny-mlp", "-o", "notes.txt"]),
    (lambda: Path("out").mkdir() or Path("out", "x.txt").write_text("mine"), ["export", "tiny-mlp", "-o", "out"]),
    (lambda: Path("photo").mkdir() or Path("photo", "a.txt").write_text("mine"),
     ["upscale", "in.png", "-o", "photo", "--model", "bicubic-x2"]),
    (lambda: Path("in.txt").write_text("x"), ["upscale", "in.png", "-o", "in.txt", "--model", "bicubic-x2"]),
    (lambda: Path("blocker").write_text("a file"), ["compress", "tiny-mlp", "-m", "svd", "-o", "blocker/m.slim"]),
    (lambda: Path("blocker").write_text("a file"), ["run", "r.toml", "-o", "blocker"]),
    (lambda: None, ["compress", "tiny-mlp", "-m", "svd", "-o", "."]),
    (lambda: None, ["export", "tiny-mlp", "-o", "."]),
    # a folder that looks like an artifact (a manifest) but that edgeslim did not write, with the user's files
    (lambda: Path("m.slim").mkdir() or Path("m.slim", "manifest.json").write_text("{}") or
     Path("m.slim", "thesis.tex").write_text("years of work"), ["compress", "tiny-mlp", "-m", "svd", "-o", "m.slim"]),
    (lambda: Path("b").mkdir() or Path("b", "bundle.json").write_text("{}") or Path("b", "x.txt").write_text("mine"),
     ["export", "tiny-mlp", "--bundle", "-o", "b"]),
    (lambda: None, ["upscale", "in.png", "-o", "in.png", "--model", "bicubic-x2"]),  # the input itself
    (lambda: None, ["upscale", "in.png", "-o", "o.png", "--compare", "in.png", "--model", "bicubic-x2"]),
    (lambda: __import__("PIL.Image").Image.new("RGB", (4, 4)).save("photo.png"),  # the user's image, not ours
     ["upscale", "in.png", "-o", "photo.png", "--model", "bicubic-x2"]),
    (lambda: Path("README.md").write_text("# my project"), ["profile", "t.onnx", "t.onnx", "--html", "README.md"]),
    (lambda: Path("data.json").write_text("{}"), ["profile", "t.onnx", "t.onnx", "--html", "data.json"]),
    (lambda: None, ["compress", "tiny-mlp", "-m", "svd", "-o", ""]),  # '' is no path, not the default
    (lambda: None, ["export", "tiny-mlp", "-o", ""]),
    (lambda: None, ["upscale", "in.png", "-o", " ", "--model", "bicubic-x2"]),
    (lambda: None, ["run", "r.toml", "-o", ""]),
    (lambda: None, ["profile", "t.onnx", "t.onnx", "--html", ""]),
])
def test_foreign_outputs_are_refused_and_untouched(in_tmp, capsys, make, args):
    from PIL import Image
    Image.new("RGB", (8, 8)).save("in.png")
    Path("r.toml").write_text('source = "tiny-mlp"\n[profile]\nname = "cpu-torch-fp32"\n')
    Path("t.onnx").write_bytes(b"")  # never read: the output is refused first
    make()
    before = tree(in_tmp)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert tree(in_tmp) == before


def test_output_equal_to_or_inside_the_input_is_refused(in_tmp, capsys):
    assert main(["compress", "tiny-mlp", "-m", "svd", "--rank", "4", "-o", "a.slim"]) == 0
    before = tree(in_tmp)
    for out in ("a.slim", "./a.slim/", "a.slim/inner.slim"):
        assert main(["compress", "a.slim", "-m", "svd", "--rank", "2", "-o", out]) == 2
        assert "is the input" in capsys.readouterr().err
    assert tree(in_tmp) == before


def test_output_holding_the_input_is_refused(in_tmp, capsys):
    assert main(["compress", "tiny-mlp", "-m", "svd", "--rank", "4", "-o", "inner.slim"]) == 0
    assert main(["compress", "tiny-mlp", "-m", "svd", "--rank", "8", "-o", "outer.slim"]) == 0
    os.rename("inner.slim", "outer.slim/inner.slim")  # the user keeps one artifact inside another
    before = tree(in_tmp)
    capsys.readouterr()
    for out in ("outer.slim", "."):
        assert main(["compress", "outer.slim/inner.slim", "-m", "svd", "--rank", "2", "-o", out]) == 2
        assert "a folder holding it" in capsys.readouterr().err
    assert tree(in_tmp) == before


def test_an_artifact_the_user_added_files_to_is_not_replaced(in_tmp, capsys):
    assert main(["compress", "tiny-mlp", "-m", "svd", "--rank", "4", "-o", "a.slim"]) == 0
    Path("a.slim", "notes.txt").write_text("mine")
    before = tree(in_tmp)
    capsys.readouterr()
    assert main(["compress", "tiny-mlp", "-m", "svd", "--rank", "2", "-o", "a.slim"]) == 2
    assert "holds files edgeslim did not write (notes.txt)" in capsys.readouterr().err and tree(in_tmp) == before
    assert main(["export", "a.slim", "-o", "a.onnx"]) == 3  # nor read: an artifact is exactly the files it lists
    assert "does not list (notes.txt)" in capsys.readouterr().err and not Path("a.onnx").exists()


def test_images_edgeslim_wrote_are_replaced_and_edited_ones_kept(in_tmp, capsys):
    from PIL import Image
    Image.new("RGB", (8, 8)).save("in.png")
    for _ in range(2):  # the second run replaces the first's output
        assert main(["upscale", "in.png", "-o", "o.png", "--model", "bicubic-x2"]) == 0
    Image.new("RGB", (4, 4)).save("o.png")  # the user edits it: no longer what edgeslim wrote
    assert main(["upscale", "in.png", "-o", "o.png", "--model", "bicubic-x2"]) == 2
    assert Image.open("o.png").size == (4, 4)


def test_edgeslim_outputs_are_replaced_whole(in_tmp):
    assert main(["compress", "tiny-mlp", "-m", "svd", "--rank", "8", "-o", "m.slim"]) == 0
    assert main(["export", "m.slim", "-o", "m.onnx"]) == 0
    first = (in_tmp / "m.onnx").read_bytes()
    assert main(["compress", "tiny-mlp", "-m", "svd", "--rank", "2", "-o", "m.slim"]) == 0
    assert json.loads((in_tmp / "m.slim" / "manifest.json").read_text())["steps"][0]["config"]["rank"] == 2
    assert main(["export", "m.slim", "-o", "m.onnx"]) == 0
    assert (in_tmp / "m.onnx").read_bytes() != first
    assert sorted(p.name for p in in_tmp.iterdir()) == ["m.onnx", "m.slim"]  # no temps left


def test_profile_writes_nothing(in_tmp, capsys):
    assert main(["export", "tiny-mlp", "-o", "tiny-mlp.onnx"]) == 0
    exported = (in_tmp / "tiny-mlp.onnx").read_bytes()
    assert main(["profile", "tiny-mlp", "--batch", "1", "--iters", "2", "--warmup", "0", "--json"]) == 0
    assert sorted(p.name for p in in_tmp.iterdir()) == ["tiny-mlp.onnx"]
    assert (in_tmp / "tiny-mlp.onnx").read_bytes() == exported


def test_run_checks_the_whole_recipe_before_any_work(in_tmp, capsys):
    for extra, message in (('[profile]\nname = "no-such"\n', "unknown profile"),
                           ('eval = "no-such-data"\n', "eval data"),
                           ('[profile]\nbatch = []\n', "non-empty list"),
                           ('name = "../../x"\n', "plain file name"),
                           (f'name = "{in_tmp}/abs"\n', "plain file name"),
                           ("export = 3\n", "must be a table")):
        top = not extra.startswith("[")
        Path("r.toml").write_text((extra if top else "") + 'source = "tiny-mlp"\n' + ("" if top else extra))
        assert main(["run", "r.toml", "-o", "out"]) == 2, extra
        assert message in capsys.readouterr().err
        assert sorted(p.name for p in in_tmp.iterdir()) == ["r.toml"]


def _save_then_hang(path: Path, marker: Path) -> str:
    """A script that saves an artifact at `path` but hangs half-way through writing its weights."""
    return textwrap.dedent(f"""
        import time, safetensors.torch as st
        from pathlib import Path
        from edgeslim import pipeline
        def hang(model, filename, *a, **k):
            Path(filename).write_bytes(b"half")
            Path({str(marker)!r}).write_text("writing")
            time.sleep(120)
        st.save_model = hang
        pipeline.compress_to_artifact("tiny-mlp", [{{"method": "svd", "rank": 2}}], {str(path)!r}, quiet=True)
    """)


def test_sigkill_during_save_keeps_the_old_artifact_and_next_run_cleans_up(in_tmp):
    assert main(["compress", "tiny-mlp", "-m", "svd", "--rank", "8", "-o", "a.slim"]) == 0
    before = tree(in_tmp / "a.slim")
    marker = in_tmp / "writing"
    proc = subprocess.Popen([sys.executable, "-c", _save_then_hang(in_tmp / "a.slim", marker)], env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    marker.unlink()
    stale = [p for p in in_tmp.iterdir() if p.name.endswith(TEMP_SUFFIX)]
    assert len(stale) == 1 and str(proc.pid) in stale[0].name
    assert tree(in_tmp / "a.slim") == before  # the old artifact is intact
    assert artifact.load(in_tmp / "a.slim").model(x=torch.zeros(1, 16)).shape == (1, 8)
    # this process started before the temp was made, so it leaves it; the next command cleans it
    assert clean_stale_temps(in_tmp) == []
    subprocess.run([sys.executable, "-m", "edgeslim", "compress", "tiny-mlp", "-m", "svd", "--rank", "2",
                    "-o", "b.slim"], env=ENV, cwd=in_tmp, check=True, capture_output=True)
    assert sorted(p.name for p in in_tmp.iterdir()) == ["a.slim", "b.slim"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temps_of_dead_old_writers_only(tmp_path):
    # older than the running command (this process, started when edgeslim was imported: a full suite on a slow
    # machine passes the hour mark before this test, so "an hour ago" would no longer be older)
    old = files._COMMAND_START - 3600
    dead, live = _dead_pid(), os.getppid()
    stale = tmp_path / f".m.slim.{dead}-0123abcd{TEMP_SUFFIX}"
    mid_swap = tmp_path / f".k.slim.{dead}-89abcdef{TEMP_SUFFIX}"  # killed between the two renames
    alive = tmp_path / f".m.slim.{live}-00000000{TEMP_SUFFIX}"
    fresh = tmp_path / f".n.slim.{dead}-11111111{TEMP_SUFFIX}"
    foreign = tmp_path / ".m.slim.tmp"
    for folder in (stale, mid_swap, alive, fresh, foreign):
        folder.mkdir()
    (mid_swap / "k.slim.old").mkdir()
    (mid_swap / "k.slim.old" / "manifest.json").write_text("{}")
    for folder in (stale, mid_swap, alive, foreign):
        os.utime(folder, (old, old))
    removed = clean_stale_temps(tmp_path)
    assert sorted(removed) == sorted([stale, mid_swap])
    assert (tmp_path / "k.slim" / "manifest.json").is_file()  # the old output moved aside is put back
    assert alive.exists() and fresh.exists() and foreign.exists()


def test_failure_inside_replace_output_keeps_the_old_output(tmp_path):
    old = tmp_path / "a.slim"
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    write_owner(old, ARTIFACT)
    with pytest.raises(RuntimeError, match="boom"):
        with replace_output(old, ARTIFACT) as tmp:
            tmp.mkdir()
            (tmp / "manifest.json").write_text("new")
            raise RuntimeError("boom")
    assert (old / "manifest.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["a.slim"]
    with pytest.raises(ConfigError, match="cannot write"):
        with replace_output(tmp_path / "a.slim" / "manifest.json" / "x.slim", ARTIFACT):
            pass


@pytest.mark.parametrize("name, kind", [("a.slim", ARTIFACT), ("a.onnx", ONNX)])
def test_a_failing_final_rename_keeps_the_old_output(tmp_path, monkeypatch, name, kind):
    old = tmp_path / name
    if kind.folder:
        old.mkdir()
        (old / "manifest.json").write_text("old")
        write_owner(old, kind)
    else:
        old.write_text("old")
    real = {"rename": os.rename, "replace": os.replace}

    def fail_bringing_the_new_one_in(op):
        def move(src, dst):
            if Path(src).parent.name.endswith(TEMP_SUFFIX) and Path(src).name == Path(dst).name == name:
                raise OSError(28, "No space left on device")
            return real[op](src, dst)
        return move

    for op in real:
        monkeypatch.setattr(os, op, fail_bringing_the_new_one_in(op))
    with pytest.raises(OSError, match="No space"):
        with replace_output(old, kind) as new:
            if kind.folder:
                new.mkdir()
                (new / "manifest.json").write_text("new")
            else:
                new.write_text("new")
    assert (old / "manifest.json" if kind.folder else old).read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary left beside it


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_chained_artifact_round_trip(tmp_path):
    _, first, _, a = pipeline.compress_to_artifact("tiny-mlp", [{"method": "svd", "rank": 8, "target": "fc1"}],
                                                   tmp_path / "a.slim", quiet=True)
    _, second, _, b = pipeline.compress_to_artifact(str(a), [{"method": "svd", "rank": 4, "target": "fc2"}],
                                                    tmp_path / "b.slim", quiet=True)
    manifest = json.loads((b / "manifest.json").read_text())
    assert manifest["source"]["identifier"] == "tiny-mlp"
    assert [s["config"]["target"] for s in manifest["steps"]] == ["fc1", "fc2"]
    loaded = artifact.load(b)
    assert [type(m).__name__ for m in loaded.model.modules()].count("LowRankLinear") == 2
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(x=x), second.model(x=x))
        assert not torch.equal(second.model(x=x), first.model(x=x))
    assert main(["export", str(b), "-o", str(tmp_path / "b.onnx")]) == 0
    np.testing.assert_allclose(_ort(tmp_path / "b.onnx", x.numpy()), loaded.model(x=x).detach().numpy(),
                               rtol=1e-4, atol=1e-5)
    _, third, _, c = pipeline.compress_to_artifact(str(b), [{"method": "svd", "rank": 2, "target": "head"}],
                                                   tmp_path / "c.slim", quiet=True)
    assert len(json.loads((c / "manifest.json").read_text())["steps"]) == 3
    assert torch.equal(artifact.load(c).model(x=x), third.model(x=x))


def test_factory_artifact_moves_without_its_weights_file(tmp_path):
    import edgeslim_test_factories as factories
    from safetensors.torch import save_model
    model = factories.tiny()
    with torch.no_grad():
        model.fc1.weight.mul_(3)  # weights the factory alone does not give
    save_model(model, str(tmp_path / "w.safetensors"))
    _, compressed, _, a = pipeline.compress_to_artifact(
        "edgeslim_test_factories:tiny", [{"method": "svd", "rank": 4}], tmp_path / "a.slim",
        weights=str(tmp_path / "w.safetensors"), inputs="x:batch,16", quiet=True)
    source = json.loads((a / "manifest.json").read_text())["source"]
    assert source["weights"] == "w.safetensors" and len(source["sha256"]) == 64
    (tmp_path / "w.safetensors").unlink()
    (tmp_path / "elsewhere").mkdir()
    moved = shutil.move(str(a), str(tmp_path / "elsewhere" / "a.slim"))
    from edgeslim.trust import Trust
    again = artifact.load(moved, Trust("edgeslim_test_factories:tiny"))
    x = torch.randn(3, 16)
    assert torch.equal(again.model(x=x), compressed.model(x=x))


def test_hf_artifact_loads_without_the_original_folder(tmp_path):
    pytest.importorskip("transformers")
    from edgeslim.sources import load_model
    tiny = load_model("tiny-bert")
    folder = tmp_path / "my-bert"
    tiny.model.hf.save_pretrained(folder, safe_serialization=True)
    from edgeslim.zoo import _tiny_tokenizer
    _tiny_tokenizer().save_pretrained(folder)
    _, compressed, _, a = pipeline.compress_to_artifact(str(folder), [{"method": "svd", "ratio": 0.5}],
                                                        tmp_path / "a.slim", quiet=True)
    source = json.loads((a / "manifest.json").read_text())["source"]
    assert source["identifier"] == "my-bert" and "config.json" in source["files"] and str(tmp_path) not in json.dumps(source)
    shutil.rmtree(folder)
    moved = Path(shutil.move(str(a), str(tmp_path / "b.slim")))
    again = artifact.load(moved)
    feeds = again.encode(["hello there", "edge devices"])
    with torch.no_grad():
        assert torch.equal(again.model(**feeds), compressed.model(**feeds))
