"""Boards reached over SSH: the address, the transport and the runner's cache on the board.

A device is an address, `ssh://[user@]host[:port][?python=PATH]`. The transport is the system `ssh`
client called with an argument list (BatchMode: it never prompts; the user's agent, `~/.ssh/config`
and known hosts apply; `--identity KEY` adds a key; EDGESLIM_SSH_CONFIG names another config file). The
only programs started on the board are its Python with a fixed bootstrap (`-c`, below) and the runner
(runtime/device_runner.py) with fixed arguments; every word of the remote command line is quoted, and
the address itself is checked against plain host, user and path characters before anything runs.

Files on the board live in `~/.cache/edgeslim-device/`, named by their SHA-256: a second run copies
nothing. An upload is written to a temporary name, its hash checked there, then renamed in; requests
and feeds travel on stdin, answers on stdout, so a run leaves no other file behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import selectors
import shlex
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from edgeslim.core.errors import ConfigError, InferenceCrashError, MissingDependencyError, SourceError
from edgeslim.core.files import file_key, sha256_file
from edgeslim.runtime.address import Device

CACHE = ".cache/edgeslim-device"  # under the login's home folder on the board
CONNECT_TIMEOUT_S = 15
RUN_TIMEOUT_S = 1800
MIN_PYTHON = (3, 9)
_NAME = re.compile(r"(runner-)?[0-9a-f]{64}\.(py|onnx)")

# The bootstrap the board's Python runs (`python -I -c BOOTSTRAP have NAME... | put NAME`): what is cached,
# which Python and packages are there; or receive one file on stdin, checked against the SHA-256 in its name.
BOOTSTRAP = """\
import hashlib, json, os, sys
d = os.path.join(os.path.expanduser("~"), %r)
a = sys.argv[1:]
os.makedirs(d, mode=0o700, exist_ok=True)
if a[0] == "have":
    import importlib.util
    v = {n: importlib.util.find_spec(n) is not None for n in ("numpy", "onnxruntime")}
    print(json.dumps({"python": list(sys.version_info[:3]), "have": [n for n in a[1:] if os.path.isfile(os.path.join(d, n))], **v}))
else:
    n = a[1]
    p = os.path.join(d, ".part-%%s-%%d" %% (n, os.getpid()))
    h = hashlib.sha256()
    try:
        with open(p, "wb") as f:
            for b in iter(lambda: sys.stdin.buffer.read(1 << 20), b""):
                h.update(b)
                f.write(b)
        if h.hexdigest() != n.split(".")[0].split("-")[-1]:
            raise ValueError("the copy arrived with another SHA-256")
        os.replace(p, os.path.join(d, n))
        print(json.dumps({"ok": n}))
    except BaseException as e:
        if os.path.exists(p):
            os.remove(p)
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
""" % CACHE


# Runs the cached runner by its name (the login's home folder decides where the cache is, as for BOOTSTRAP).
LAUNCH = ("import os, runpy, sys; name = sys.argv.pop(1); "
          f"runpy.run_path(os.path.join(os.path.expanduser('~'), {CACHE!r}, name), run_name='__main__')")


def runner_file() -> Path:
    """The torch-free runner module, the file copied to every board."""
    return Path(__file__).with_name("device_runner.py")


def _ssh_failure(device: Device, stderr: str) -> SourceError:
    last = next((ln.strip() for ln in reversed(stderr.splitlines()) if ln.strip()), "no message")
    if "Permission denied" in stderr:
        return SourceError(f"{device} refused the login ({last}): load the key in your SSH agent or give --identity KEY")
    if "Host key verification failed" in stderr or "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        return SourceError(f"{device}: its host key is unknown or changed ({last}); connect once with ssh to check "
                           "and accept it")
    return SourceError(f"cannot reach {device}: {last}")


class Board:
    """One device over SSH: check what it has, copy what it lacks, run the runner, trust only checked answers."""

    def __init__(self, device: Device, identity: str | None = None, timeout_s: float = RUN_TIMEOUT_S) -> None:
        if identity is not None and not Path(identity).is_file():
            raise SourceError(f"--identity {identity}: no such key file")
        self.device, self.identity, self.timeout_s = device, identity, timeout_s
        self.copied: list[str] = []  # names uploaded by this object (a second run copies nothing)
        self.present: set[str] = set()  # names this object saw in the board's cache: not looked up again
        self._hashes: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> SHA-256 of a local file

    def sha256(self, path: Path) -> str:
        """The SHA-256 of a local file, computed once while its size and modification time stay the same."""
        key = file_key(path)
        if key not in self._hashes:
            self._hashes[key] = sha256_file(path)
        return self._hashes[key]

    def _ssh(self) -> list[str]:
        control = Path(tempfile.gettempdir()) / f"edgeslim-ssh-{os.getuid()}"
        control.mkdir(mode=0o700, exist_ok=True)
        config = os.environ.get("EDGESLIM_SSH_CONFIG")
        # one shared connection per board, key and config: a login with another key never rides on this one
        login = hashlib.sha256(f"{self.identity}|{config}".encode()).hexdigest()[:12]
        command = ["ssh", "-T", "-e", "none", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
                   "-o", "ServerAliveInterval=15", "-o", "ControlMaster=auto", "-o", f"ControlPath={control}/{login}-%C",
                   "-o", "ControlPersist=60"]
        if config:
            command += ["-F", config]
        if self.identity:
            command += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        if self.device.port:
            command += ["-p", str(self.device.port)]
        who = f"{self.device.user}@" if self.device.user else ""
        return command + ["--", who + self.device.host.strip("[]")]

    def _call(self, words: Sequence[str], data: bytes = b"") -> dict[str, Any]:
        """Run `words` (quoted) on the board with `data` on stdin; its one JSON line as a dict."""
        try:
            done = subprocess.run(self._ssh() + [shlex.join(words)], input=data, capture_output=True,
                                  timeout=CONNECT_TIMEOUT_S * 4 + len(data) / 1e6)
        except subprocess.TimeoutExpired as exc:
            raise SourceError(f"{self.device} did not answer within {exc.timeout:.0f} s") from exc
        return self._answer(done.returncode, done.stdout, done.stderr.decode(errors="replace"))

    def _answer(self, code: int, stdout: bytes, stderr: str) -> dict[str, Any]:
        if code == 255 and stderr.strip():  # ssh's own failure (a program killed on the board: 255 and no words)
            raise _ssh_failure(self.device, stderr)
        if code == 127:
            raise MissingDependencyError(f"no Python at '{self.device.python}' on {self.device}: install Python >= "
                                         "3.9 there (apt install python3) or name one with ?python=PATH")
        line = next((ln for ln in reversed(stdout.decode(errors="replace").splitlines()) if ln.startswith("{")), None)
        if line is None:
            last = next((ln.strip() for ln in reversed(stderr.splitlines()) if ln.strip()), "")
            raise InferenceCrashError(f"the runner on {self.device} {_died(code)}" + (f"; its last words: {last[:300]}"
                                                                                        if last else ""))
        return json.loads(line)

    def check(self, names: Sequence[str]) -> dict[str, Any]:
        """Which of `names` the board's cache holds, its Python version and whether numpy and onnxruntime are
        there (found, not imported: the runner reports their versions); refuses a board
        without Python >= 3.9, numpy or onnxruntime with what to install there."""
        info = self._call([self.device.python, "-I", "-c", BOOTSTRAP, "have", *names])
        if tuple(info["python"]) < MIN_PYTHON:
            raise MissingDependencyError(f"{self.device} has Python {'.'.join(map(str, info['python']))}; the runner "
                                         "needs >= 3.9 (name another with ?python=PATH)")
        missing = [p for p in ("numpy", "onnxruntime") if not info.get(p)]
        if missing:
            raise MissingDependencyError(f"{self.device} lacks {', '.join(missing)} for {self.device.python}: run "
                                         f"'{self.device.python} -m pip install numpy onnxruntime' on the board")
        return info

    def ensure(self, files: dict[str, Path]) -> None:
        """Copy each {cache name: local file} the board lacks (names carry the SHA-256, so a copy is checked)."""
        for name in files:
            if not _NAME.fullmatch(name):
                raise ConfigError(f"not a cache name: {name!r}")
        if set(files) <= self.present:
            return
        have = set(self.check(list(files))["have"])
        for name, path in files.items():
            if name in have:
                self.present.add(name)
                continue
            answer = self._call([self.device.python, "-I", "-c", BOOTSTRAP, "put", name], Path(path).read_bytes())
            if "error" in answer:
                full = "No space left" in answer["message"] or answer["error"] == "OSError"
                raise SourceError(f"copying {Path(path).name} to {self.device}:~/{CACHE} failed: {answer['message']}"
                                  + (" (free space on the board)" if full else ""))
            self.copied.append(name)
            self.present.add(name)

    def run(self, command: str, header: dict[str, Any], payload: Sequence[bytes] = (),
            started: Callable[[], None] | None = None) -> dict[str, Any]:
        """The runner's `command` with a JSON header and payload on stdin; its answer once checked;
        `started()` is called once the board has every file and the runner starts.

        stdin stays open while the runner works: closing it (Ctrl-C, a timeout here) makes the runner stop
        its children and remove its temporary folder on the board.

        Raises:
            InferenceCrashError: the runner died (out of memory, killed) or ran past the timeout.
            SourceError: an answer from a runner of another version.
        """
        runner = runner_file()
        name = f"runner-{self.sha256(runner)}.py"
        files = {name: runner, **header.pop("files", {})}
        self.ensure(files)
        if started:
            started()
        answer = self._run_once(name, command, header, payload)
        if answer.get("error") == "CacheMiss":  # removed on the board since it was seen there: copy, ask again
            self.present -= set(answer.get("names", ()))
            self.ensure(files)
            answer = self._run_once(name, command, header, payload)
        if "error" in answer:
            cls = {"MissingDependencyError": MissingDependencyError, "ConfigError": ConfigError}.get(answer["error"],
                                                                                                   InferenceCrashError)
            raise cls(f"the runner on {self.device}: {answer['message']}")
        return answer

    def _run_once(self, name: str, command: str, header: dict[str, Any], payload: Sequence[bytes]) -> dict[str, Any]:
        """One start of the cached runner `name`; its answer once its version is checked (errors included)."""
        words = [self.device.python, "-I", "-c", LAUNCH, name, command]
        body = json.dumps({**header, "payload": [len(p) for p in payload]}).encode() + b"\n" + b"".join(payload)
        with subprocess.Popen(self._ssh() + [shlex.join(words)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) as proc:  # its pipes closed on the way out
            try:
                proc.stdin.write(body)
                proc.stdin.flush()
                line = _read_line(proc, self.timeout_s)
            except BaseException:  # Ctrl-C or a timeout: closing stdin makes the runner clean up on the board
                _stop(proc)
                raise
            proc.stdin.close()
            stderr = proc.stderr.read().decode(errors="replace")
            code = proc.wait()
        if line is None:
            raise InferenceCrashError(f"the runner on {self.device} ran past {self.timeout_s:.0f} s and was stopped")
        answer = self._answer(code if not line else 0, line, stderr)
        if answer.get("runner_version") != _runner_version():
            raise SourceError(f"the runner on {self.device} answered as version {answer.get('runner_version')!r}, "
                              f"not {_runner_version()!r}: result not trusted")
        return answer

    def measure(self, files: Sequence[Path], feeds: Sequence[Mapping[str, np.ndarray]], threads: int, provider: str,
                warmup: int, iters: int, rounds: int, memory: bool = True,
                started: Callable[[], None] | None = None) -> dict[str, Any]:
        """The runner's `measure`: each model's memory in a fresh process (with `memory`), then the models
        timed interleaved on one feeds dict each; refused unless it ran exactly the files sent."""
        hashes = [self.sha256(f) for f in files]
        names = [f"{h}.onnx" for h in hashes]
        answer = self.run("measure", {"files": dict(zip(names, files)), "models": names, "threads": threads,
                                      "provider": provider, "warmup": warmup, "iters": iters, "rounds": rounds,
                                      "memory": memory}, [_npz(f) for f in feeds], started)
        if answer["sha256"] != hashes:
            raise SourceError(f"{self.device} ran a model whose SHA-256 is not the one sent: result not trusted")
        return answer

    def gemm(self, shapes: Sequence[tuple[int, int, int]], threads: int) -> dict[str, Any]:
        """The runner's `gemm`: {"MxKxN": fastest ms} of ONNX Runtime's fp32 MatMul on the board."""
        with _gemm_model() as (name, path):
            return self.run("gemm", {"files": {name: path}, "gemm_model": name, "threads": threads,
                                     "shapes": [list(s) for s in shapes]})

    def probe(self, threads: int, shapes: Sequence[tuple[int, int, int]]) -> dict[str, Any]:
        """The runner's `probe`: CPU, features, RAM, OS, Python, ONNX Runtime, fp32 GEMM peak, copy
        bandwidth and the GEMM times of `shapes`."""
        with _gemm_model() as (name, path):
            return self.run("probe", {"files": {name: path}, "gemm_model": name, "threads": threads,
                                      "shapes": [list(s) for s in shapes]})


def _npz(feeds: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.ascontiguousarray(v) for k, v in feeds.items()})
    return buffer.getvalue()


@contextlib.contextmanager
def _gemm_model() -> Iterator[tuple[str, Path]]:
    """(cache name, path) of a one-node MatMul ONNX file with free M, K, N, removed after the block."""
    import onnx

    from edgeslim.runtime.peak import matmul_model

    with tempfile.TemporaryDirectory(prefix="edgeslim-gemm-") as tmp:
        path = Path(tmp) / "gemm.onnx"
        onnx.save(matmul_model("M", "K", "N"), str(path))
        yield f"{sha256_file(path)}.onnx", path


def _runner_version() -> str:
    from edgeslim.runtime.device_runner import VERSION

    return VERSION


def _died(code: int) -> str:
    if code == 255:  # what ssh returns for a remote program ended by a signal
        return "was killed by a signal without an answer (the usual cause: out of memory on the board)"
    if code > 128:
        return f"was killed by signal {code - 128}" + (" (the usual cause: out of memory on the board)"
                                                       if code - 128 == 9 else "")
    return f"exited with status {code} without an answer"


def _read_line(proc: subprocess.Popen, timeout_s: float) -> bytes | None:
    """The first line of the runner's stdout (b"" when it closed without one), None past the timeout."""
    deadline = time.monotonic() + timeout_s
    buffer = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                _stop(proc)
                return None
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                return buffer
            buffer += chunk
    return buffer


def _stop(proc: subprocess.Popen) -> None:
    """Close the runner's stdin (it then cleans up on the board), give it a moment, then end ssh."""
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
