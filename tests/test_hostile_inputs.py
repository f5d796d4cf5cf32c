"""Hostile or broken inputs of every class named in the hardening review: each is one line with its documented
exit code, no traceback, and nothing written. One table; each row builds its input in an empty folder."""
import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from edgeslim.cli import main
from edgeslim.runtime import child
from test_bad_input import one_line_error

PROFILE = Path(__file__).parents[1] / "profiles" / "cpu-ort-fp32.toml"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A plain and an INT8 artifact of the tiny MLP, and its ONNX file (the rows copy what they tamper with)."""
    root = tmp_path_factory.mktemp("good")
    for args in (["compress", "tiny-mlp", "-m", "svd", "--rank", "4", "-o", str(root / "a.slim")],
                 ["compress", "tiny-mlp", "-m", "int8", "--calib", "random:16", "-o", str(root / "i8.slim")],
                 ["export", "tiny-mlp", "-o", str(root / "t.onnx")]):
        assert main(args) == 0
    return root


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels in a few bytes (the pixels never need to exist)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _manifest(name: str, edit):
    """Copy artifact `name` here as x.slim and edit its manifest (the last step for a step edit)."""
    def make(good: Path) -> None:
        shutil.copytree(good / name, "x.slim")
        data = json.loads(Path("x.slim", "manifest.json").read_text())
        edit(data)
        Path("x.slim", "manifest.json").write_text(json.dumps(data))
    return make


def _quantizers(**fields):
    return lambda m: [q.update(fields) for q in m["steps"][-1]["resolved"]["activations"].values()]


def _profile_with(line: str):
    return lambda good: Path("p.toml").write_text(PROFILE.read_text().replace("threads = 2", line))


def _crashing_children(good: Path, monkeypatch) -> None:
    shutil.copy(good / "t.onnx", "t.onnx")
    script = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    monkeypatch.setattr(child, "_command", lambda request: ["python3", "-c", script])


EXPORT_X = ["export", "x.slim", "-o", "x.onnx"]
# (id, make(good artifacts folder) in the empty current folder, command, exit code, part of the one line)
CASES = [
    ("recipe not UTF-8", lambda g: Path("r.toml").write_bytes(b'source = "tiny-mlp"\n# \xff\xfe\n'),
     ["run", "r.toml", "-o", "o"], 2, "not valid TOML"),
    ("recipe 5000 deep", lambda g: Path("r.toml").write_text('source = "tiny-mlp"\nx = ' + "[" * 5000 + "]" * 5000),
     ["run", "r.toml", "-o", "o"], 2, "nested too deeply"),
    ("gemm table 50000 deep", lambda g: Path("g.json").write_text("[" * 50000 + "]" * 50000),
     ["compress", "tiny-mlp", "-m", "svd", "--speedup", "1.5", "--gemm-table", "g.json", "--profile",
      "rpi5-ort-fp32", "-o", "g.slim"], 2, "not valid JSON"),
    ("dim not an ASCII number", lambda g: None, ["profile", "tiny-mlp", "--dim", "sequence=\u00b2"], 2, "--dim takes"),
    ("profile threads 10**9", _profile_with("threads = 1000000000"), ["profile", "tiny-mlp", "--profile", "p.toml"],
     2, "must be <= 1024"),
    ("profile threads 1e9", _profile_with("threads = 1e9"), ["profile", "tiny-mlp", "--profile", "p.toml"], 2,
     "of type int"),
    ("profile peak nan", lambda g: Path("p.toml").write_text(PROFILE.read_text().replace("= 147", "= nan")),
     ["profile", "tiny-mlp", "--profile", "p.toml"], 2, "finite number"),
    ("PNG bomb 20000x20000", lambda g: Path("b.png").write_bytes(_png_header(20000, 20000)),
     ["upscale", "b.png", "-o", "o.png", "--model", "bicubic-x2"], 3, "400000000 pixels"),
    ("PNG over edgeslim's pixel limit", lambda g: Path("b.png").write_bytes(_png_header(9000, 9000)),
     ["upscale", "b.png", "-o", "o.png", "--model", "bicubic-x2"], 3, "81,000,000 pixels, over the limit"),
    ("calib /dev/zero", lambda g: None, ["compress", "tiny-mlp", "-m", "fwsvd", "--calib", "/dev/zero", "-o", "z.slim"],
     3, "not a regular file"),
    ("eval --batch 0", lambda g: Path("t.txt").write_text("a text\n"),
     ["eval", "tiny-bert", "--data", "t.txt", "--batch", "0"], 2, "0 is not in the range"),
    ("int8 zero point int4", _manifest("i8.slim", _quantizers(dtype="int4")), EXPORT_X, 3, "'int4' is not one of"),
    ("int8 NaN scales", _manifest("i8.slim", _quantizers(scale=float("nan"))), EXPORT_X, 3, "not finite and positive"),
    ("int8 opset 99999", _manifest("i8.slim", lambda m: m["steps"][-1]["resolved"].update(opset=99999)), EXPORT_X,
     3, "INT8 opset 99999"),
    ("manifest dims huge", _manifest("a.slim", lambda m: m["dims"].update(batch=1 << 26)), EXPORT_X, 3,
     "a load may allocate"),
    ("artifact with an unlisted file", lambda g: shutil.copytree(g / "a.slim", "x.slim") and
     Path("x.slim", "run.py").write_text("print('hi')"), EXPORT_X, 3, "does not list (run.py)"),
    ("every profiling child crashed", _crashing_children, ["profile", "t.onnx", "--batch", "1,2"], 6,
     "every batch crashed (1, 2)"),
]


@pytest.mark.parametrize("name, make, args, code, message", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line(name, make, args, code, message, artifacts, in_tmp, capfd, monkeypatch):
    if make is _crashing_children:
        make(artifacts, monkeypatch)
    else:
        make(artifacts)
    before = sorted(p.name for p in in_tmp.iterdir())
    capfd.readouterr()
    assert main(args) == code
    err = capfd.readouterr().err
    one_line_error(err)
    assert message in err
    assert sorted(p.name for p in in_tmp.iterdir()) == before  # nothing written
