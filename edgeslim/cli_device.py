"""`edgeslim device probe ssh://...`: what a board is and what it measures, saved as a profile."""
from __future__ import annotations

import re
from typing import Any

import click

from edgeslim.cli_options import console, json_option, print_json
from edgeslim.core.errors import ConfigError
from edgeslim.core.files import OutputKind

_PROFILE = OutputKind("saved profile", False, suffixes=(".toml",))


@click.group()
def device() -> None:
    """Boards reached over SSH: probe one, save it as a profile that `profile` and `compress --speedup` use."""


@device.command()
@click.argument("address", metavar="ssh://[user@]host[:port][?python=PATH]")
@click.option("--identity", type=click.Path(dir_okay=False), help="SSH private key (default: your SSH agent and config)")
@click.option("--threads", default=0, show_default=True, help="intra-op threads to measure with (0: every core)")
@click.option("--save", "name", help="write a measured profile NAME (then: edgeslim profile X --profile NAME)")
@json_option
def probe(address: str, identity: str | None, threads: int, name: str | None, as_json: bool) -> None:
    """The board's CPU, cores, SIMD and INT8 features, RAM, OS, Python, ONNX Runtime and providers, and
    its measured fp32 GEMM peak, copy bandwidth and a sample GEMM table."""
    from edgeslim.core.files import replace_output
    from edgeslim.devices import probe as run_probe, saved_profile_text, user_profile_path
    from edgeslim.runtime.address import parse_device
    from edgeslim.runtime.remote import Board
    from edgeslim.runtime.targets import list_profiles

    if threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {threads}")
    path = None
    if name is not None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
            raise ConfigError(f"--save takes a plain profile name (letters, digits, . _ -), got {name!r}")
        path = user_profile_path(name)
        if name in list_profiles() and not _ours(path):
            raise ConfigError(f"--save {name}: a profile of that name exists and edgeslim did not write it; pick another "
                              "name")
    info = run_probe(Board(parse_device(address), identity), threads)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replace_output(path, _PROFILE) as tmp:
            tmp.write_text(saved_profile_text(info, threads or info["logical_cpus"]))
        info["saved"] = str(path)
    if as_json:
        print_json(info)
        return
    _print_probe(info)


def _ours(path: Any) -> bool:
    from edgeslim.devices import SAVED_HEADER

    try:
        return path.read_text(encoding="utf-8").startswith(SAVED_HEADER)
    except OSError:
        return False


def _print_probe(info: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{info['address']} (measured {info['measured_at']})", show_header=False)
    ram = f"{info['ram_bytes'] / 2**30:.1f} GiB" if info.get("ram_bytes") else "unknown"
    for key, value in (("CPU", f"{info['cpu_model']} ({info['arch']}, {info['logical_cpus']} CPUs)"),
                       ("SIMD features", ", ".join(info["features"]) or "-"),
                       ("INT8 features", ", ".join(info["int8_features"]) or "none"), ("RAM", ram), ("OS", info["os"]),
                       ("Python", f"{info['python']} ({info['python_path']})"),
                       ("onnxruntime", f"{info['onnxruntime']}, providers {', '.join(info['providers'])}"),
                       ("fp32 GEMM peak", f"{info['fp32_gflops']:.1f} GFLOP/s ({info['threads'] or 'all'} threads)"),
                       ("copy bandwidth", f"{info['mem_gbps']:.2f} GB/s"),
                       ("GEMM ms", ", ".join(f"{k} {v:.3g}" for k, v in info["gemm_ms"].items()))):
        table.add_row(key, value)
    console().print(table)
    if "saved" in info:
        console().print(f"saved profile: {info['saved']}")
