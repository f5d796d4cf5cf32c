"""Real SSH "boards" on 127.0.0.1 for the device tests and bench/device_ssh.py: an `sshd` (Debian's
openssh-server) with a throw-away host key and user key, its own home folder, and a second Python
environment that has numpy and onnxruntime but no torch and no edgeslim, as a board has."""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import time
import venv
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def missing() -> str | None:
    """Why loopback boards cannot run here (None: they can)."""
    if not (Path(SSHD).is_file() and shutil.which("ssh") and shutil.which("ssh-keygen")):
        return "needs openssh-server and openssh-client (apt-get install openssh-server)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def device_python(folder: Path, packages: tuple[str, ...] = ("numpy", "onnxruntime")) -> Path:
    """A venv without site packages whose only packages are `packages`, linked from this environment."""
    venv.create(folder, with_pip=False, symlinks=True)
    libs = folder / "libs"
    libs.mkdir()
    for name in packages:
        site = Path(importlib.util.find_spec(name).origin).parent.parent  # where this environment has it
        for entry in (name, f"{name}.libs"):
            if (site / entry).exists():
                (libs / entry).symlink_to(site / entry)
    python = folder / "bin" / "python"
    inner = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    Path(inner, "board-libs.pth").write_text(str(libs) + "\n")
    return python


@dataclass
class Board:
    """One sshd on 127.0.0.1:port; its logins land with HOME=home."""

    port: int
    home: Path
    process: subprocess.Popen

    def address(self, python: Path | str) -> str:
        return f"ssh://127.0.0.1:{self.port}?python={python}"


class Boards:
    """Start `count` sshd "boards" sharing one user key and one ssh config (EDGESLIM_SSH_CONFIG)."""

    def __init__(self, folder: Path, count: int = 1) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.user_key = folder / "user_key"
        _keygen(self.user_key)
        (folder / "authorized_keys").write_text((folder / "user_key.pub").read_text())
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
        known, self.boards = [], []
        for i in range(count):
            host_key = folder / f"host_key{i}"
            _keygen(host_key)
            port, home = _free_port(), folder / f"home{i}"
            home.mkdir()
            config = folder / f"sshd_config{i}"
            config.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {folder}/sshd{i}.pid\n"
                              f"AuthorizedKeysFile {folder}/authorized_keys\nPasswordAuthentication no\n"
                              "KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\n"
                              f"StrictModes no\nSetEnv HOME={home}\n")
            process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                                       stderr=open(folder / f"sshd{i}.log", "wb"))
            known.append(f"[127.0.0.1]:{port} {' '.join(Path(str(host_key) + '.pub').read_text().split()[:2])}")
            self.boards.append(Board(port, home, process))
        (folder / "known_hosts").write_text("\n".join(known) + "\n")
        self.config = folder / "ssh_config"
        self.config.write_text(f"Host 127.0.0.1\n  IdentityFile {self.user_key}\n  IdentitiesOnly yes\n"
                               f"  UserKnownHostsFile {folder}/known_hosts\n  StrictHostKeyChecking yes\n")
        for board in self.boards:
            _wait_for(board)

    def stop(self) -> None:
        for board in self.boards:
            board.process.terminate()
            board.process.wait(timeout=10)


def _wait_for(board: Board, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if board.process.poll() is not None:
            raise RuntimeError(f"sshd exited with status {board.process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", board.port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on port {board.port} within {timeout_s} s")

