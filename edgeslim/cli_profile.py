"""`edgeslim profile`: one model's latency, memory and roofline, or several candidates side by side."""
from __future__ import annotations

from typing import Any

import click

from edgeslim.cli_options import (console, dims as parse_dims, ints, json_option, not_empty, print_json, source_options,
                                  trust_of, trust_options)
from edgeslim.core.errors import ConfigError
from edgeslim.defaults import DEFAULT_PROFILE


@click.command()
@click.argument("items", nargs=-1, required=True, metavar="ITEM [ITEM2 ...]")
@click.option("--profile", "profile", default=DEFAULT_PROFILE, show_default=True, help="target profile")
@click.option("--batch", help="batch sizes, e.g. 1,8,32 (default: the profile's)")
@click.option("--dim", "dims", multiple=True, metavar="NAME=SIZE", help="size of a named dim, e.g. sequence=128")
@click.option("--warmup", default=5, show_default=True)
@click.option("--iters", default=30, show_default=True)
@json_option
@click.option("--ops", is_flag=True, help="also break ORT kernel time down by op type (CPU onnxruntime)")
@click.option("--rounds", default=5, show_default=True,
              help="several ITEMs: rounds the timed calls alternate over (ratios are to the first ITEM)")
@click.option("--html", "html_out", type=click.Path(dir_okay=False), callback=not_empty,
              help="several ITEMs: also write an HTML report with plots (latency vs batch, size, op breakdown)")
@click.option("--eval", "eval_data", help="several ITEMs: also the task's metric on this data (as `edgeslim eval --data`)")
@click.option("--device", "devices", multiple=True, metavar="ssh://[user@]host[:port][?python=PATH]",
              help="measure on this board over SSH (repeat for several boards at once); default: the profile's address")
@click.option("--identity", type=click.Path(dir_okay=False), help="SSH private key for --device (default: your SSH "
              "agent and config)")
@click.option("--prompt", "prompts", metavar="128,512", help="causal LMs: prompt lengths for time to first token "
              "(default 128,512; given, or a --kv-cache .onnx ITEM, profiles the key/value-cache graph)")
@click.option("--new-tokens", type=int, help="causal LMs: tokens decoded after each prompt for tokens/s (default 128)")
@source_options
@trust_options
def profile(items: tuple[str, ...], profile: str, batch: str | None, dims: tuple[str, ...], warmup: int, iters: int,
            as_json: bool, ops: bool, rounds: int, html_out: str | None, eval_data: str | None,
            devices: tuple[str, ...], identity: str | None, prompts: str | None, new_tokens: int | None,
            weights: str | None, inputs: str | None, task: str | None, trusted: str | None, trust_source: bool) -> None:
    """Latency percentiles, throughput and peak memory of a model file or artifact on a target; with
    several, the candidates interleaved round by round with ratios to the first. With --device (or a
    profile that names a board's address) everything is measured on the board over SSH."""
    import torch

    from edgeslim.pipeline import profile_target
    from edgeslim.profiling import profile_file
    from edgeslim.runtime.targets import load_profile

    if warmup < 0 or iters < 1:
        raise ConfigError(f"--warmup must be >= 0 and --iters >= 1, got {warmup} and {iters}")
    batches, sizes = ints(batch), parse_dims(dims)
    source = {"weights": weights, "inputs": inputs, "task": task}
    from edgeslim.lm_profile import is_cache_graph
    if prompts is not None or new_tokens is not None or any(is_cache_graph(i) for i in items):
        if devices or ops or eval_data or sizes:
            raise ConfigError("LLM profiling (--prompt/--new-tokens, a cache graph) runs here in ONNX Runtime: "
                              "--device, --ops, --eval and --dim do not apply (use `edgeslim eval --onnx` for perplexity)")
        _profile_lms(items, profile, ints(prompts) if prompts is not None else None, new_tokens, batches,
                     rounds if len(items) > 1 else 1, html_out, as_json,
                     source | {"trust": trust_of(trusted, trust_source)})
        return
    on_boards = bool(devices) or load_profile(profile).address is not None
    if on_boards and ops:
        raise ConfigError("--ops reads ONNX Runtime's profiler on this machine; it is not available with --device")
    if len(items) > 1:
        _compare(items, profile, batches, sizes, warmup, iters, rounds, ops, html_out, as_json,
                 trust_of(trusted, trust_source), source, eval_data, devices if on_boards else None, identity)
        return
    if html_out or eval_data:
        raise ConfigError("--html and --eval belong to a comparison: give two or more ITEMs (the first is the "
                          "reference); for one model's metric use `edgeslim eval`")
    item = items[0]
    if on_boards:
        _profile_on_boards(item, profile, devices, identity, batches, sizes, warmup, iters,
                           trust_of(trusted, trust_source), source, as_json)
        return
    with profile_target(item, profile, as_json, trust_of(trusted, trust_source), source) as (target, loaded):
        rows = profile_file(target, loaded, profile, batches, sizes, warmup, iters,
                            roofline=not isinstance(loaded.model, torch.nn.Identity) or str(target).endswith(".onnx"), ops=ops)
    if as_json:
        print_json({"model": str(item), "profile": profile, "timings": rows})
        return
    _print_rows(f"{item} on {profile}", rows)


def _profile_lms(items: tuple[str, ...], profile: str, prompts: list[int] | None, new_tokens: int | None,
                 batches: list[int] | None, rounds: int, html_out: str | None, as_json: bool,
                 source: dict[str, Any]) -> None:
    """`profile LM [LM2 ...] --prompt 128,512 --new-tokens 128`: time to first token and decode tokens/s."""
    from rich.table import Table

    from edgeslim.core.files import REPORT, check_output
    from edgeslim.lm_profile import DEFAULT_NEW_TOKENS, DEFAULT_PROMPTS, profile_lms, write_lm_html
    from edgeslim.report import si

    if html_out:
        if len(items) < 2:
            raise ConfigError("--html belongs to a comparison: give two or more ITEMs")
        check_output(html_out, REPORT)
    result = profile_lms(items, profile, prompts or DEFAULT_PROMPTS,
                         DEFAULT_NEW_TOKENS if new_tokens is None else new_tokens, batches or [1], rounds, source,
                         quiet=as_json)
    if html_out:
        result["html"] = str(write_lm_html(result, html_out))
    if as_json:
        print_json(result)
        return
    table = Table(title=f"causal LM{'s' if len(items) > 1 else ''} on {profile} ({result['threads']} threads, "
                        f"key/value cache in ONNX Runtime, {result['new_tokens']} new tokens"
                        + (f", medians of {rounds} alternating rounds)" if len(items) > 1 else ")"))
    for col in ("candidate", "batch", "prompt", "TTFT ms", "decode tok/s", "x first", "flat (vs past 16)", "file",
                "peak mem"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    first = result["candidates"][0]["rows"]
    for cand in result["candidates"]:
        for ref, r in zip(first, cand["rows"]):
            table.add_row(cand["item"], str(r["batch"]), str(r["prompt"]), f"{r['ttft_ms']:.1f}",
                          f"{r['decode_tokens_per_s']:.1f}", f"{r['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.2f}",
                          f"{r['decode_flatness']:.2f}" if "decode_flatness" in r else "-", si(cand["file_bytes"], "B"),
                          si(cand["peak_rss_bytes"], "B"))
    console().print(table)
    console().print("peak mem: resident set of a fresh process running the cache graph (weights + cache); "
                    "flat: decode tokens/s after the prompt over tokens/s at a past of 16")
    if html_out:
        console().print(f"report: {result['html']}")


def _profile_on_boards(item: str, profile: str, devices: tuple[str, ...], identity: str | None,
                       batches: list[int] | None, sizes: dict[str, int], warmup: int, iters: int, trust: Any,
                       source: dict[str, Any], as_json: bool) -> None:
    """`profile X --device A [--device B]`: the rows of each board; a board that failed says why (one line)."""
    from edgeslim.core.errors import EdgeslimError, InferenceCrashError
    from edgeslim.devices import profile_on_boards

    results = profile_on_boards(item, profile, devices, identity, batches, sizes, warmup, iters, trust, source, as_json)
    failed = {a: r for a, r in results.items() if isinstance(r, EdgeslimError)}
    measured = {a: r for a, r in results.items() if a not in failed}
    if as_json:
        print_json({"model": str(item), "profile": profile, "boards": [
            {"address": a, "timings": rows} for a, rows in measured.items()] + [
            {"address": a, "error": " ".join(str(e).split())} for a, e in failed.items()]})
    else:
        for address, rows in measured.items():
            machine = rows[0]["measured_on"]
            _print_rows(f"{item} on {profile} at {address} (measured on {machine['cpu_model']}, {machine['arch']}, "
                        f"onnxruntime {machine['onnxruntime']})", rows)
        for address, exc in failed.items():
            click.echo(f"error: {address}: {' '.join(str(exc).split())}", err=True)
    if failed:
        first = next(iter(failed.values()))
        raise type(first)(f"{len(failed)} of {len(results)} board(s) failed (above)")
    if all("crashed" in r for rows in measured.values() for r in rows):
        raise InferenceCrashError("every run crashed on the board(s) (above)")


def _print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    """One model's rows as a table (predicted rows say so), then memory, crashes, roofline limits and ops."""
    from rich.table import Table

    from edgeslim.report import memory_method_text, ms, peak_mem_text

    if rows and rows[0].get("predicted"):
        table = Table(title=f"{title}: PREDICTED from the roofline (not measured here)")
        for col in ("batch", "sizes", "predicted p50 ms (lower bound)", "GFLOP", "MB moved", "fits RAM"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(str(r["batch"]), _sizes_cell(r), ms(r["p50_ms"]), f"{r['flops'] / 1e9:.3g}",
                          f"{r['bytes_moved'] / 1e6:.4g}", {True: "yes", False: "NO"}.get(r.get("fits_ram"), "-"))
        console().print(table)
        return
    table = Table(title=title)
    for col in ("batch", "sizes", "p50 ms", "p90 ms", "p99 ms", "cv", "throughput /s", "peak mem", "of roofline"):
        table.add_column(col, justify="right")
    for r in rows:
        if "crashed" in r:
            table.add_row(str(r["batch"]), _sizes_cell(r), "[red]crashed[/red]", *["-"] * 6)
            continue
        table.add_row(str(r["batch"]), _sizes_cell(r), ms(r["p50_ms"]), ms(r["p90_ms"]), ms(r["p99_ms"]),
                      f"{r['cv']:.3f}" + (" unstable" if r["unstable"] else ""), f"{r['throughput_per_s']:.4g}",
                      peak_mem_text(r), f"{r['roofline_fraction']:.0%}" if "roofline_fraction" in r else "-")
    console().print(table)
    console().print("peak mem: " + ("peak resident memory of a fresh process running the model (weights included)"
                                     if any("peak_rss_bytes" in r for r in rows) else
                                     "+ growth while running in this process (weights not included)"))
    console().print(f"memory read by: {memory_method_text(rows)}")
    for r in rows:
        if "crashed" in r:
            console().print(f"[red]batch {r['batch']} crashed[/red]: {r['crashed']}")
    where = next((r for r in rows if "measured_on" in r), None)
    if where is not None:
        m = where["measured_on"]
        console().print(f"measured on {m['address']}: {m['cpu_model']} ({m['arch']}, {m['logical_cpus']} CPUs, "
                        f"{', '.join(m['int8_features']) or 'no INT8 dot-product features'}), onnxruntime "
                        f"{m['onnxruntime']}, at {where['measured_at']}")
    peaks = {r["peak"]["source"]: r["peak"] for r in rows if "peak" in r}
    for source, p in peaks.items():
        when = f"; measured {p['measured_at']} at load {p['load_avg']:.2f}" if p.get("measured_at") else ""
        console().print(f"roofline limits: {p['fp32_gflops']:.0f} GFLOP/s fp32, {p['mem_gbps']:.0f} GB/s, {source}{when}")
    for r in rows:
        if "op_time_share" in r:
            top = ", ".join(f"{k} {v:.0%}" for k, v in list(r["op_time_share"].items())[:6])
            console().print(f"batch {r['batch']} kernel time by op type: {top}")
        if "roofline_warning" in r:
            console().print(f"[red]warning[/red] batch {r['batch']}: {r['roofline_warning']}")


def _compare(items: tuple[str, ...], profile: str, batches: list[int] | None, sizes: dict[str, int], warmup: int,
             iters: int, rounds: int, ops: bool, html_out: str | None, as_json: bool, trust: Any,
             source: dict[str, Any], eval_data: str | None, devices: tuple[str, ...] | None = None,
             identity: str | None = None) -> None:
    """`profile A B C`: edgeslim.compare (or each board's, with `devices`), printed as a table (or JSON) and
    drawn as HTML when asked."""
    from rich.table import Table

    from edgeslim.compare import compare, write_html
    from edgeslim.core.files import REPORT, check_output
    from edgeslim.devices import compare_on_boards
    from edgeslim.report import ms, peak_mem_text, si

    if rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {rounds}")
    if html_out:
        check_output(html_out, REPORT)  # before any work
    if devices is not None:
        result = compare_on_boards(items, profile, devices, identity, batches, sizes, warmup, iters, rounds, trust,
                                   source, as_json, eval_data)
    else:
        result = compare(items, profile, batches, sizes, warmup, iters, rounds, ops, trust, source, quiet=as_json,
                         eval_data=eval_data)
    if html_out:
        result["html"] = str(write_html(result, html_out))
    if as_json:
        print_json(result)
        return
    table = Table(title=f"{len(items)} candidates on {profile}, interleaved over {rounds} rounds (ratios to the first)")
    for col in ("candidate", "batch", "p50 ms", "x first", "cv", "file", "peak mem", "GFLOP"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    first = result["candidates"][0]["rows"]
    for cand in result["candidates"]:
        for ref, r in zip(first, cand["rows"]):
            table.add_row(cand["item"], str(r["batch"]), ms(r["p50_ms"]), f"{r['p50_ms'] / ref['p50_ms']:.3f}",
                          f"{r['cv']:.3f}" + (" unstable" if r["unstable"] else ""), si(cand["file_bytes"], "B"),
                          peak_mem_text(r), f"{r['flops'] / 1e9:.3g}" if "flops" in r else "-")
    out = console()
    out.print(table)
    for cand in result["candidates"]:
        if "eval_note" in cand:
            out.print(f"{cand['item']}: {cand['eval_note']}")
        elif "eval" in cand or "eval_error" in cand:
            ev = cand.get("eval")
            out.print(f"{cand['item']}: " + (f"{ev['metric']} {ev['value']:.4f} on {ev['data']}" if ev else
                                                 f"no metric ({cand['eval_error']})"))
        for r in cand["rows"]:
            if "op_time_ms" in r:
                top = ", ".join(f"{k} {v:.3g} ms" for k, v in list(r["op_time_ms"].items())[:6])
                out.print(f"{cand['item']} batch {r['batch']} kernel time by op type (per run): {top}")
    for address, message in result.get("board_errors", {}).items():
        click.echo(f"error: {address}: {message}", err=True)
    if html_out:
        out.print(f"report: {result['html']}")


def _sizes_cell(row: dict) -> str:
    """'sequence=128 (default), height=64 (--dim)': the sizes a row was measured at, and where from."""
    return ", ".join(f"{k}={v}" + ("" if row["size_sources"].get(k) in ("batch", "model", None) else
                                   f" ({row['size_sources'][k]})") for k, v in row["sizes"].items() if k != "batch") or "-"
