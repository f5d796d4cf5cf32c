"""`edgeslim list` and `edgeslim cache`: what is available here, and what edgeslim keeps between runs.

Imports nothing heavy at module level: every `list` starts without torch."""
from __future__ import annotations

import click

from edgeslim.cli_options import console as _console, json_option, print_json


@click.command(name="list")
@click.argument("what", type=click.Choice(["compressors", "profiles", "models", "datasets"]))
@json_option
def list_(what: str, as_json: bool) -> None:
    """List compressors, target profiles, zoo models or data sets."""
    if what == "compressors":  # every key in full: plain lines, never a table's cut cells
        from edgeslim.catalog import compressor_rows, describe_compressors
        if as_json:
            print_json(compressor_rows())
        else:
            click.echo(describe_compressors(compressor_rows()))
        return
    if what == "profiles":
        from edgeslim.runtime.targets import list_profiles
        columns = ("name", "runtime", "device", "precision", "keys")
        rows = [{"name": name, **p.to_dict()} for name, p in list_profiles().items()]
        cells = [(r["name"], r["runtime"], r["device"], r["precision"], ", ".join(
            f"{k}={v}" for k, v in r.items() if k not in ("name", "runtime", "device", "precision", "description")))
            for r in rows]
    elif what == "models":
        from edgeslim.catalog import ZOO
        columns = ("name", "available", "description")
        rows = [{"name": e.name, "available": e.available, "requires": e.requires, "description": e.description}
                for e in ZOO.values()]
        cells = [(e.name, "yes" if e.available else
                  f"no ({'not in this install' if e.shipped else f'{e.requires} missing'})", e.description)
                 for e in ZOO.values()]
    else:
        from edgeslim.catalog import list_datasets
        columns = ("name", "kind", "available", "description")
        rows = [{"name": d.name, "kind": d.kind, "available": d.available, "requires": d.requires,
                 "description": d.description} for d in list_datasets().values()]
        cells = [(d.name, d.kind, "yes" if d.available else f"no ({d.requires} missing)", d.description)
                 for d in list_datasets().values()]
    if as_json:
        print_json(rows)
        return
    from rich.table import Table
    table = Table(*columns, title=what)
    for row in cells:
        table.add_row(*row)
    _console().print(table)


LIMITS = "limits"  # `cache clear limits`: the measured peaks and GEMM tables (runtime/peak.py), not a folder


@click.command(name="cache")
@click.argument("action", type=click.Choice(["list", "clear"]))
@click.argument("name", required=False)
@json_option
def cache_(action: str, name: str | None, as_json: bool) -> None:
    """List or clear the local cache: converted models and artifact exports ($EDGESLIM_CACHE, default
    ~/.cache/edgeslim), and the peaks and GEMM tables measured on this machine (`clear limits`)."""
    from edgeslim import cache
    from edgeslim.report import si
    from edgeslim.runtime import peak

    console = _console()
    if action == "clear":
        limits = name == LIMITS and peak.clear_limits()
        removed = [] if name == LIMITS else cache.clear(name)
        if as_json:
            print_json({"root": str(cache.root()), "removed": removed, "limits_removed": limits})
        elif name == LIMITS:
            console.print(f"removed the measured limits {peak.cache_path()}" if limits else
                          f"no measured limits to remove ({peak.cache_path()})")
        else:
            console.print(f"removed {len(removed)} cache entr{'y' if len(removed) == 1 else 'ies'} from {cache.root()}"
                          + (f": {', '.join(removed)}" if removed else ""))
        return
    entries, limits = cache.list_entries(), peak.cached_limits()
    if as_json:
        print_json({"root": str(cache.root()), "entries": [{"name": e.name, "path": str(e.path),
                                                            "size_bytes": e.size_bytes} for e in entries],
                    "limits_file": str(peak.cache_path()), "limits": limits})
        return
    console.print(f"cache {cache.root()}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    for e in entries:
        console.print(f"  {e.name}  {si(e.size_bytes, 'B')}")
    console.print(f"measured limits {peak.cache_path()} (`edgeslim cache clear {LIMITS}` forgets them): "
                  f"{len(limits)} machine key{'' if len(limits) == 1 else 's'}")
    for row in limits:
        load = row.get("peak_load_avg")
        measured = (f"peak measured {row['peak_measured_at']}" + (f" at load {load:.2f}" if load is not None else "")
                    if row["peak_measured_at"] else "no peak")
        console.print(f"  {row['machine']}: {measured}; {row['gemm_shapes']} GEMM shapes timed")
