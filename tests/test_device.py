"""Profiling on boards over SSH, against real sshd "boards" on 127.0.0.1 (tests/loopback_ssh.py) whose
Python has numpy and onnxruntime but no torch: the runner's torch-free promise, the cache, faults."""
from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeslim.cli import main
from edgeslim.core.files import sha256_file
from edgeslim.core.errors import ConfigError, InferenceCrashError, SourceError
from edgeslim.runtime import remote
from edgeslim.runtime.address import parse_device
from edgeslim.runtime.remote import Board
from edgeslim.runtime.targets import Profile, load_profile

from loopback_ssh import Boards, device_python, missing

needs_sshd = pytest.mark.skipif(missing() is not None, reason=missing() or "")


def _model(path: Path, width: int = 64, seed: int = 0) -> Path:
    weight = np.random.default_rng(seed).standard_normal((width, width)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor("W", TensorProto.FLOAT, [width, width], weight.ravel().tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Two boards, a board Python without torch, one without onnxruntime, and two small models."""
    if missing():
        pytest.skip(missing())
    root = tmp_path_factory.mktemp("lab")
    boards = Boards(root / "ssh", count=2)
    lab = {"boards": boards, "python": device_python(root / "py"),
           "bare_python": device_python(root / "bare", packages=("numpy",)),
           "a": _model(root / "a.onnx"), "b": _model(root / "b.onnx", width=128, seed=1)}
    yield lab
    boards.stop()


@pytest.fixture
def env(lab, monkeypatch, tmp_path):
    monkeypatch.setenv("EDGESLIM_SSH_CONFIG", str(lab["boards"].config))
    monkeypatch.setenv("EDGESLIM_CONFIG_DIR", str(tmp_path / "config"))
    return lab


def _address(lab, i: int = 0, python: str = "python") -> str:
    return lab["boards"].boards[i].address(lab[python])


def _cache(lab, i: int = 0) -> Path:
    return lab["boards"].boards[i].home / remote.CACHE


@needs_sshd
def test_the_board_python_has_no_torch(env):
    done = subprocess.run([str(env["python"]), "-I", "-c", "import torch"], capture_output=True, text=True)
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr


@needs_sshd
def test_profile_over_ssh_has_the_local_schema_and_hash(env, tmp_path):
    from edgeslim.devices import profile_on_boards
    from edgeslim.pipeline import profile_target
    from edgeslim.profiling import profile_file

    address = _address(env)
    out = profile_on_boards(str(env["a"]), "cpu-ort-fp32", [address], None, [1, 4], {}, 2, 6, None, {}, True)
    rows = out["ssh://127.0.0.1:%d" % env["boards"].boards[0].port]
    with profile_target(str(env["a"]), "cpu-ort-fp32", True) as (target, loaded):
        local = profile_file(target, loaded, "cpu-ort-fp32", [1, 4], {}, 2, 6, roofline=False)
    assert [r["batch"] for r in rows] == [1, 4]
    for here, there in zip(local, rows):
        assert set(here) - {"peak_mem_bytes"} <= set(there)  # same fields (memory comes from the fresh process)
        assert set(here["memory"]) == set(there["memory"])
        assert there["iters"] == 6 and there["warmup"] == 2 and 0 < there["p50_ms"] <= there["p99_ms"]
        assert there["measured_on"]["address"].startswith("ssh://127.0.0.1:") and here["measured_on"]["address"] == "local"
        assert there["measured_on"]["onnxruntime"] == here["measured_on"]["onnxruntime"]
    assert rows[0]["peak_rss_bytes"] > rows[0]["memory"]["baseline_rss_bytes"] > 0


@needs_sshd
def test_second_run_copies_nothing_and_leaves_no_temp_files(env):
    from edgeslim.devices import measure_on
    from edgeslim.pipeline import profile_target

    prof = load_profile("cpu-ort-fp32")
    with profile_target(str(env["b"]), "cpu-ort-fp32", True) as (target, loaded):
        first = Board(parse_device(_address(env)))
        measure_on(first, [target], [loaded], prof, [1], {}, 1, 2, 1)
        again = Board(parse_device(_address(env)))
        measure_on(again, [target], [loaded], prof, [1], {}, 1, 2, 1)
    assert again.copied == []
    names = sorted(p.name for p in _cache(env).iterdir())
    assert f"{sha256_file(env['b'])}.onnx" in names and any(n.startswith("runner-") for n in names)
    assert not [n for n in names if n.startswith(("run-", ".part-"))]


@needs_sshd
def test_a_board_object_looks_up_its_cache_once_and_copies_again_what_vanished(env, monkeypatch):
    from edgeslim.devices import measure_on
    from edgeslim.pipeline import profile_target

    prof = load_profile("cpu-ort-fp32")
    board = Board(parse_device(_address(env)))
    checks = []
    real_check = board.check
    monkeypatch.setattr(board, "check", lambda names: checks.append(list(names)) or real_check(names))
    with profile_target(str(env["a"]), "cpu-ort-fp32", True) as (target, loaded):
        measure_on(board, [target], [loaded], prof, [1], {}, 0, 1, 1, False)
        measure_on(board, [target], [loaded], prof, [1], {}, 0, 1, 1, False)
        assert len(checks) == 1  # the second run trusts what the first saw: no lookup before it
        name = f"{sha256_file(env['a'])}.onnx"
        (_cache(env) / name).unlink()  # removed on the board behind this object's back
        rows = measure_on(board, [target], [loaded], prof, [1], {}, 0, 1, 1, False)[0]
    assert rows[0]["p50_ms"] > 0 and (_cache(env) / name).is_file() and len(checks) == 2


@needs_sshd
def test_a_cancelled_run_stops_the_runner_and_removes_its_files(env):
    board = Board(parse_device(_address(env)), timeout_s=4)
    name = f"{sha256_file(env['a'])}.onnx"
    feeds = remote._npz({"x": np.ones((1, 64), np.float32)})
    with pytest.raises(InferenceCrashError, match="ran past 4 s"):
        board.run("measure", {"files": {name: env["a"]}, "models": [name], "threads": 1,
                              "provider": "CPUExecutionProvider", "warmup": 0, "iters": 10 ** 8, "rounds": 1,
                              "memory": False}, [feeds])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (_runner_processes(env) or list(_cache(env).glob("run-*"))):
        time.sleep(0.1)
    assert not _runner_processes(env) and not list(_cache(env).glob("run-*"))


@needs_sshd
def test_a_killed_runner_is_a_crash_with_the_likely_cause(env):
    board = Board(parse_device(_address(env)))
    name = f"{sha256_file(env['a'])}.onnx"
    killer = threading.Timer(3, lambda: subprocess.run(["pkill", "-KILL", "-f", _runner_pattern(env)]))
    killer.start()
    try:
        with pytest.raises(InferenceCrashError, match="killed.*out of memory"):
            board.run("measure", {"files": {name: env["a"]}, "models": [name], "threads": 1,
                                  "provider": "CPUExecutionProvider", "warmup": 0, "iters": 10 ** 8, "rounds": 1,
                                  "memory": False}, [remote._npz({"x": np.ones((1, 64), np.float32)})])
    finally:
        killer.cancel()


@needs_sshd
def test_a_wrong_key_is_refused_in_one_line(env, tmp_path, monkeypatch):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")], check=True)
    config = tmp_path / "ssh_config"  # the board's host key is known, the user's key is not offered
    config.write_text(env["boards"].config.read_text().replace(f"IdentityFile {env['boards'].user_key}", ""))
    monkeypatch.setenv("EDGESLIM_SSH_CONFIG", str(config))
    code, err = _cli(["profile", str(env["a"]), "--device", _address(env), "--identity", str(tmp_path / "stranger")])
    assert code == 3 and "refused the login" in err and "--identity" in err and "Traceback" not in err


@needs_sshd
def test_a_board_without_onnxruntime_says_what_to_install(env):
    code, err = _cli(["profile", str(env["a"]), "--device", _address(env, python="bare_python")])
    assert code == 4 and "lacks onnxruntime" in err and "pip install numpy onnxruntime" in err


@needs_sshd
def test_a_board_without_that_python_says_so(env):
    address = f"ssh://127.0.0.1:{env['boards'].boards[0].port}?python=/nowhere/bin/python3"
    code, err = _cli(["profile", str(env["a"]), "--device", address])
    assert code == 4 and "no Python at '/nowhere/bin/python3'" in err


def test_an_unreachable_board_is_one_line(monkeypatch, tmp_path):
    if missing():
        pytest.skip(missing())
    from loopback_ssh import _free_port

    monkeypatch.setenv("EDGESLIM_SSH_CONFIG", str(tmp_path / "none"))
    (tmp_path / "none").write_text("")
    model = _model(tmp_path / "m.onnx")
    code, err = _cli(["profile", str(model), "--device", f"ssh://127.0.0.1:{_free_port()}"])
    assert code == 3 and "cannot reach ssh://127.0.0.1:" in err and len(err.strip().splitlines()) == 1


@needs_sshd
def test_the_board_reports_progress_while_it_works(env):
    code, err = _cli(["profile", str(env["a"]), "--device", _address(env), "--batch", "1,2", "--iters", "3"])
    lines = [ln for ln in err.splitlines() if ln.startswith("ssh://127.0.0.1:")]
    assert code == 0 and len(lines) == 4, err  # a line as each batch starts on the board and one as it ends
    assert "unclosed" not in err  # the ssh pipes are closed after each run
    assert "batch 1, 1 model(s)" in lines[0] and "batch 1 measured in" in lines[1] and "batch 2 measured" in lines[3]


@needs_sshd
def test_a_fleet_of_two_boards_in_one_report(env, tmp_path):
    html = tmp_path / "fleet.html"
    code, out = _cli(["profile", str(env["a"]), str(env["b"]), "--device", _address(env, 0), "--device",
                      _address(env, 1), "--batch", "1", "--iters", "4", "--warmup", "1", "--rounds", "2", "--json",
                      "--html", str(html)], stdout=True)
    assert code == 0
    result = json.loads(out)
    boards = [c["board"] for c in result["candidates"]]
    assert len(set(boards)) == 2 and len(boards) == 4 and result["board_errors"] == {}
    assert {c["item"].split(" @ ")[0] for c in result["candidates"]} == {"a.onnx", "b.onnx"}
    assert len(result["ratios"]) == 3 and html.read_text().count("@ 127.0.0.1:") >= 4


@needs_sshd
def test_probe_saves_a_profile_that_profile_then_measures_on(env):
    address = _address(env)
    code, out = _cli(["device", "probe", address, "--save", "loopback", "--threads", "1", "--json"], stdout=True)
    assert code == 0
    info = json.loads(out)
    assert info["fp32_gflops"] > 0 and info["mem_gbps"] > 0 and info["onnxruntime"] and info["cpu_model"]
    assert set(info["gemm_ms"]) == {"1x384x384", "8x384x1536", "128x384x384", "128x1536x384"}
    prof = load_profile("loopback")
    assert prof.address == address.partition("?")[0] and prof.python == str(env["python"]) and prof.remote
    assert prof.peak_gflops == pytest.approx(info["fp32_gflops"], rel=1e-3) and prof.threads == 1
    code, out = _cli(["profile", str(env["a"]), "--profile", "loopback", "--json", "--iters", "3"], stdout=True)
    rows = json.loads(out)["boards"][0]["timings"]
    assert code == 0 and rows[0]["measured_on"]["address"] == prof.address and not rows[0].get("predicted")


@needs_sshd
def test_probe_never_overwrites_a_profile_it_did_not_write(env):
    code, err = _cli(["device", "probe", _address(env), "--save", "cpu-ort-fp32"])
    assert code == 2 and "edgeslim did not write it" in err


@needs_sshd
def test_an_answer_from_another_runner_version_is_not_trusted(env, monkeypatch):
    from edgeslim.devices import profile_on_boards

    from edgeslim.runtime.device_runner import VERSION

    monkeypatch.setattr(remote, "_runner_version", lambda: "0")
    with pytest.raises(SourceError, match=f"answered as version '{VERSION}', not '0': result not trusted"):
        profile_on_boards(str(env["a"]), "cpu-ort-fp32", [_address(env)], None, [1], {}, 1, 2, None, {}, True)


@needs_sshd
def test_a_copy_that_arrives_with_another_hash_is_refused(env, tmp_path):
    board = Board(parse_device(_address(env)))
    wrong = tmp_path / "w.onnx"
    wrong.write_bytes(b"not what the name says")
    with pytest.raises(SourceError, match="another SHA-256"):
        board.ensure({"0" * 64 + ".onnx": wrong})
    assert not list(_cache(env).glob(".part-*")) and not (_cache(env) / ("0" * 64 + ".onnx")).exists()


@pytest.mark.parametrize("address", [
    "http://host", "ssh://host;touch /tmp/pwned", "ssh://-oProxyCommand=sh", "ssh://h?python=/bin/sh -c id",
    "ssh://user:secret@h", "ssh://h/path", "ssh://h?shell=1", "ssh://h:99999", "ssh://$(id)", "ssh://h?python=-c",
    "ssh://us er@h", "ssh://",
])
def test_bad_addresses_are_refused_before_anything_runs(address):
    with pytest.raises(ConfigError):
        parse_device(address)
    code, err = _cli(["profile", "x.onnx", "--device", address])
    assert code == 2 and err.startswith("error: --device") and len(err.strip().splitlines()) == 1


def test_a_profile_may_name_its_board_as_device(tmp_path):
    profile = Profile.from_dict("pi", {"device": "ssh://pi@raspberrypi.local", "runtime": "onnxruntime",
                                       "provider": "CPUExecutionProvider", "precision": "fp32", "peak_gflops": 153.6,
                                       "mem_gbps": 17.1, "remote": True, "python": "/home/pi/venv/bin/python"})
    assert (profile.device, profile.address) == ("cpu", "ssh://pi@raspberrypi.local")
    with pytest.raises(ConfigError, match="plain path"):
        Profile.from_dict("bad", {"address": "ssh://h", "python": "python; rm -rf ~", "device": "cpu",
                                  "runtime": "onnxruntime", "provider": "CPUExecutionProvider", "precision": "fp32",
                                  "peak_gflops": 1.0, "mem_gbps": 1.0})


def _runner_pattern(lab) -> str:
    """The runner on the board (its command line starts with the board's Python; the local ssh's with ssh)."""
    return f"^{lab['python']} -I -c .* runner-[0-9a-f]+[.]py measure$"


def _runner_processes(lab) -> list[str]:
    return subprocess.run(["pgrep", "-f", _runner_pattern(lab)], capture_output=True, text=True).stdout.split()


def _cli(args: list[str], stdout: bool = False) -> tuple[int, str]:
    """Run the CLI in a fresh process (as a user would) and return (exit code, stderr or stdout)."""
    import os
    import sys

    done = subprocess.run([sys.executable, "-m", "edgeslim", *args], capture_output=True, text=True,
                          env=os.environ | {"COLUMNS": "200"}, stdin=subprocess.DEVNULL, timeout=600)
    return done.returncode, done.stdout if stdout else done.stderr


@needs_sshd
def test_board_measure_times_a_layers_rank_ladder_in_one_visit_and_models_on_the_board(env, monkeypatch, tmp_path):
    from torch import nn

    from edgeslim.core.specs import TensorSpec
    from edgeslim.latency import BoardMeasure

    monkeypatch.setenv("EDGESLIM_CACHE_DIR", str(tmp_path / "cache"))
    assert _cli(["device", "probe", _address(env), "--save", "ladder", "--threads", "1"])[0] == 0
    measure = BoardMeasure("ladder", iters=2)
    visits = []
    gemm = measure.board.gemm
    monkeypatch.setattr(measure.board, "gemm", lambda shapes, threads: visits.append(len(shapes)) or gemm(shapes, threads))
    align = load_profile("ladder").align
    dense = measure.gemm_ms(8, 64, 48)
    ladder = [measure.gemm_ms(8, 64, r) + measure.gemm_ms(8, r, 48) for r in range(align, 48, align)]
    assert len(visits) == 1 and visits[0] == 1 + len(range(align, 48, align)) + len(range(align, 64, align))
    assert dense > 0 and all(t > 0 for t in ladder)
    assert BoardMeasure("ladder").gemm_ms(8, 64, 48) == dense  # kept in the cache for the next command
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 48)

        def forward(self, x):
            return self.fc(x).relu()

    net = Net()
    spec = (TensorSpec("x", ("batch", 64), "float32"),)
    assert measure.model_ms(net, spec, {"batch": 2}) > 0 and 0 < measure.speedup(net, net, spec, {"batch": 2})


@needs_sshd
def test_the_devices_page_block_runs_as_written(env, in_tmp):
    import re
    import shlex

    page = (Path(__file__).resolve().parents[1] / "docs" / "devices.md").read_text()
    block = re.search(r"# Measure on your board.*?```console\n(.*?)```", page, flags=re.S).group(1)
    assert main(["compress", "tiny-mlp", "-m", "svd", "--ratio", "0.5", "-o", "mlp-svd.slim"]) == 0
    assert main(["export", "mlp-svd.slim", "--to", "onnx", "-o", "mlp-svd.onnx"]) == 0
    boards = {"ssh://pi@raspberrypi.local": _address(env, 0), "ssh://ubuntu@n100.local": _address(env, 1)}
    for line in block.strip().splitlines():
        for name, address in boards.items():
            line = line.replace(name, address)
        args = shlex.split(line)
        assert args[0] == "edgeslim" and main(args[1:] + ["--iters", "3"] * (args[1] == "profile")) == 0, line
    assert Path("boards.html").read_text().count("@ 127.0.0.1:") >= 4


@needs_sshd
@pytest.mark.slow
def test_optimize_times_every_candidate_on_the_board(env, tmp_path, monkeypatch):
    """`optimize --device ssh://...` end to end: the stage combos and every verified candidate are timed on the
    board (their ONNX files land in its cache), and the chosen one's export is among them."""
    monkeypatch.setenv("EDGESLIM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["optimize", "tiny-bert", "--profile", "cpu-ort-fp32", "--device", _address(env), "--speedup", "1.1",
                 "--eval", "sentences", "--max-drop", "0.05", "--families", "prune", "--rounds", "1", "--top", "1",
                 "-o", str(out)]) == 0
    summary = json.loads((out / "optimize.json").read_text())
    assert summary["device"] == _address(env) and summary["points"]
    assert all(p["latency_ms"] > 0 for p in summary["points"])
    on_board = {p.name for p in _cache(env).iterdir()}
    candidates = sorted(Path(summary["work_folder"]).glob("*.onnx"))
    assert candidates and all(f"{sha256_file(c)}.onnx" in on_board for c in candidates)
    assert f"{sha256_file(out / 'best.onnx')}.onnx" in on_board
