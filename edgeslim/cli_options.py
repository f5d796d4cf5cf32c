"""What the `edgeslim` commands share: option decorators (source, trust, JSON) and option parsing."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from edgeslim.core.errors import ConfigError

TASK_HELP = ("what a Hugging Face folder is loaded for: causal-lm, sequence-classification, feature-extraction, "
             "image-classification, seq2seq (default: its config.json's architectures)")


PIPE_WIDTH = 1000  # columns of a table printed into a pipe or a file: never cut, so it can be copied whole


def console():
    """The stdout console: the terminal's width on a terminal, else wide enough that no cell is cut
    (`edgeslim list profiles | grep n100` finds `minipc-n100-ort-fp32` whole)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=PIPE_WIDTH)


def not_empty(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An output path option given as '' is refused (it would silently mean the current folder)."""
    if value is not None and not value.strip():
        raise ConfigError(f"{'/'.join(param.opts)}: an empty path names nothing; give a file or folder, "
                          "or leave the option out")
    return value


def sets(items: tuple[str, ...], config_cls: type, step_keys: type | None = None) -> dict[str, Any]:
    """--set KEY=VALUE options, each value converted by the annotation of its config field."""
    from edgeslim.core.config import parse_text

    out = {}
    for item in items:
        key, eq, val = item.partition("=")
        if not eq:
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        owner = step_keys if step_keys is not None and key in step_keys.__dataclass_fields__ else config_cls
        out[key] = parse_text(owner, key, val, where=f"--set {key}")
    return out


def ints(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError as exc:
        raise ConfigError(f"--batch takes comma-separated positive integers, got {text!r}") from exc
    if min(values) < 1:
        raise ConfigError(f"--batch takes comma-separated positive integers, got {text!r}")
    return values


def dims(pairs: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for p in pairs:
        key, _, val = p.partition("=")
        if not key.isidentifier() or not (val.isascii() and val.isdigit()) or int(val) < 1:
            raise ConfigError(f"--dim takes NAME=SIZE with a positive SIZE (e.g. sequence=128), got {p!r}")
        out[key] = int(val)
    return out


def trust_options(command: Any) -> Any:
    """--source and --trust-source: the factories an artifact's manifest may name (`edgeslim.trust`)."""
    command = click.option("--trust-source", is_flag=True,
                           help="replay whatever pkg.mod:factory an artifact names (imports and runs that code)")(command)
    return click.option("--source", "trusted", metavar="PKG.MOD:FACTORY",
                        help="the factory you allow an artifact to name as its source")(command)


def source_options(command: Any) -> Any:
    """--weights, --input and --task: how a SOURCE loads (a `pkg.mod:factory` and its weights, a Hugging
    Face folder's task), the same on every command that takes one (`edgeslim.sources.load_model`)."""
    command = click.option("--task", help=TASK_HELP)(command)
    command = click.option("--input", "inputs", metavar="SPEC",
                           help="inputs of a factory source, e.g. 'x:batch,3,224,224' (NAME:DIMS[:DTYPE];...)")(command)
    return click.option("--weights", help="weights file for a pkg.mod:factory source (.safetensors or .pt)")(command)


_JSON_RESULTS: list[list[str]] = []  # one list per running --json command: what print_json was given


def print_json(obj: Any) -> None:
    """The result of a --json command: printed on stdout, alone, once the command is done."""
    text = json.dumps(obj, indent=2, default=str)
    if _JSON_RESULTS:
        _JSON_RESULTS[-1].append(text)
    else:
        click.echo(text)


def json_only(command: Any) -> Any:
    """Run `command` so that with `as_json` its stdout is the JSON of `print_json` alone: everything else
    written to stdout meanwhile, by Python or by a library's own handle or C code (NNCF's progress bars and
    log lines), goes to stderr."""
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("as_json"):
            return command(*args, **kwargs)
        stdout = sys.stdout
        stdout.flush()
        saved_fd = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        _JSON_RESULTS.append([])
        try:
            return command(*args, **kwargs)
        finally:
            results = _JSON_RESULTS.pop()
            for stream in (sys.stdout, stdout, sys.__stdout__):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved_fd, 1)
            os.close(saved_fd)
            sys.stdout = stdout
            for text in results:
                click.echo(text)
    return run


def json_option(command: Any) -> Any:
    """--json: print one JSON object (the result, `print_json`) on stdout instead of the human-readable lines."""
    return click.option("--json", "as_json", is_flag=True, help="print the result as JSON")(json_only(command))


def trust_of(trusted: str | None, trust_source: bool) -> Any:
    from edgeslim.trust import Trust
    return Trust(trusted, trust_source)


def folder_bytes(path: str | Path) -> int:
    """Bytes of the files directly in folder `path` (an artifact's size)."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
