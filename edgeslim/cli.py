"""The `edgeslim` command: a thin shell over the library (parse, call one function, print)."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

from edgeslim.cli_options import (TASK_HELP, console as _console, folder_bytes, json_option, not_empty,
                                  print_json, sets as _sets, source_options, trust_of, trust_options)
from edgeslim.cli_device import device
from edgeslim.cli_profile import profile
from edgeslim.cli_train import train
from edgeslim.cli_upscale import upscale
from edgeslim.cli_generate import generate
from edgeslim.cli_lists import cache_, list_
from edgeslim.cli_optimize import optimize
from edgeslim.core.errors import ConfigError, EdgeslimError, ExportValidationError
from edgeslim.core.files import safe_stem
from edgeslim.defaults import DEFAULT_OUT, DEFAULT_PROFILE

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeslim")
@click.option("-v", "--verbose", is_flag=True, help="show the libraries' own warnings, logs and progress bars "
              "(hidden by default); allowed anywhere on the command line")
def cli(verbose: bool) -> None:
    """edgeslim: compress a trained PyTorch model, export it to a device runtime, profile it."""


cli.add_command(profile)
cli.add_command(train)
cli.add_command(upscale)
cli.add_command(device)
cli.add_command(generate)
cli.add_command(list_)
cli.add_command(cache_)
cli.add_command(optimize)


@cli.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_dir", callback=not_empty, default=str(DEFAULT_OUT), show_default=True,
              help="output folder")
@click.option("-q", "--quiet", is_flag=True, help="no progress output")
@json_option
@trust_options
def run(recipe: str | None, out_dir: str, quiet: bool, as_json: bool, trusted: str | None, trust_source: bool) -> None:
    """Whole pipeline from a RECIPE.toml; without one, the built-in demo on the packaged MiniLM."""
    import dataclasses

    from edgeslim import pipeline, recipe as recipes
    from edgeslim.report import speed_rows

    plan = recipes.load_recipe(recipe) if recipe else recipes.parse_recipe(recipes.DEMO_RECIPE, "demo")
    trust_of(trusted, trust_source)  # a malformed --source is an error before any work
    plan = dataclasses.replace(plan, source_factory=trusted or plan.source_factory,
                               trust_source=trust_source or plan.trust_source)
    summary = pipeline.run(plan, out_dir, quiet or as_json)
    if as_json:
        print_json(summary | {"speed": speed_rows(summary)})
        return
    _print_summary(summary, speed_rows(summary))


def _print_summary(summary: dict[str, Any], speed: list[dict[str, Any]]) -> None:
    from rich.table import Table

    from edgeslim.report import ms, si

    models, cmp = summary["models"], summary["compare"]
    table = Table(title=f"{summary['recipe']['name']}: original vs compressed")
    table.add_column("")
    for label in models:
        table.add_column(label, justify="right")
    table.add_row("parameters", *(f"{m['params']:,}" for m in models.values()))
    table.add_row("work (batch 1)", *(si(m["flops"], "FLOP") for m in models.values()))
    table.add_row("ONNX file", *(si(m.get("onnx_bytes"), "B") for m in models.values()))
    for i, t in enumerate(next(iter(models.values())).get("timings", [])):
        table.add_row(f"p50 ms, batch {t['batch']}", *(ms(m["timings"][i]["p50_ms"]) for m in models.values()))
    table.add_row("max |output diff|", "-", f"{cmp['max_abs_diff']:.4g}")
    if "cosine_mean" in cmp:
        table.add_row(f"cosine sim. ({cmp['samples']} sentences)", "1", f"{cmp['cosine_mean']:.4f} (min {cmp['cosine_min']:.4f})")
    if "top1_agreement" in cmp:
        table.add_row("top-1 agreement", "1", f"{cmp['top1_agreement']:.4f}")
    console = _console()
    console.print(table)
    for s in speed:
        verdict = s["reason"] or "ok"
        console.print(f"batch {s['batch']}: speedup {s['speedup']:.2f}x, FLOPs ratio {s['flops_ratio']:.3f}, "
                      f"latency ratio {s['latency_ratio']:.3f} -> {verdict}")
    if summary.get("op_breakdown"):
        _print_ops(console, summary["op_breakdown"])
    console.print(f"artifact: {summary['artifact']}\nreport:   {summary['report']}")


def _print_ops(console: Any, breakdown: dict[str, Any]) -> None:
    from rich.table import Table

    from edgeslim.report import not_shrunk_text, op_rows

    table = Table(title=f"kernel time by op type at batch {breakdown['batch']}, ms per run (share)")
    for col in ("op type", "original", "compressed", "time ratio"):
        table.add_column(col, justify="left" if col == "op type" else "right")
    for cells in op_rows(breakdown):
        table.add_row(*cells)
    console.print(table)
    console.print(f"op types: {not_shrunk_text(breakdown)}")


@cli.command()
@click.argument("source")
@click.option("-m", "--method", required=True, help="compressor (edgeslim list compressors)")
@click.option("--ratio", type=float, help="kept fraction of the targeted layers' parameters")
@click.option("--rank", type=int, help="fixed rank / bond dimension for every layer")
@click.option("--energy", type=float, help="kept fraction of spectral energy per layer")
@click.option("--speedup", type=float, help="measured whole-model speedup to reach on the target (svd, fwsvd, asvd)")
@click.option("--gemm-table", help="speedup on a target that is not this machine: its GEMM table (JSON) measured there")
@click.option("--calib", help="calibration data: NAME[:COUNT] (edgeslim list datasets) or a file/folder")
@click.option("--target", help="regex (fullmatch) of module names to compress")
@click.option("--exclude", help="regex of module names to leave alone")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="any other config key (repeatable)")
@click.option("--heal", type=int, metavar="STEPS", help="then heal the compressed model for STEPS steps on the --calib "
              "data (distilling the original's outputs where the data has no labels), in the same command")
@source_options
@click.option("--profile", default=DEFAULT_PROFILE, show_default=True,
              help="target the decisions are made for (its align rounds ranks), as in `run`")
@click.option("-o", "--out", callback=not_empty, help="output artifact folder (NAME.slim)")
@json_option
@trust_options
def compress(source: str, method: str, ratio: float | None, rank: int | None, energy: float | None,
             speedup: float | None, gemm_table: str | None, calib: str | None, target: str | None, exclude: str | None, sets: tuple[str, ...],
             heal: int | None, weights: str | None, inputs: str | None, task: str | None, profile: str, out: str | None,
             as_json: bool, trusted: str | None, trust_source: bool) -> None:
    """Compress SOURCE with METHOD and save a replayable .slim artifact."""
    from edgeslim.compress.base import get_compressor
    from edgeslim.pipeline import compress_to_artifact
    from edgeslim.recipe import StepSection

    step: dict[str, Any] = {"method": method}
    for key, val in (("ratio", ratio), ("rank", rank), ("energy", energy), ("speedup", speedup), ("calib", calib),
                     ("gemm_table", gemm_table), ("target", target), ("exclude", exclude)):
        if val is not None:
            step[key] = val
    step |= _sets(sets, get_compressor(method).Config, StepSection)
    steps = [step]
    if heal is not None:
        if calib is None or heal < 1:
            raise ConfigError(f"--heal STEPS needs STEPS >= 1 and --calib DATA to heal on (got --heal {heal}"
                              f"{'' if calib else ', no --calib'})")
        steps.append({"method": "heal", "steps": heal, "calib": calib})
    if out is None:
        out = str(DEFAULT_OUT / f"{safe_stem(Path(source).name.removesuffix('.slim'))}-{safe_stem(method)}.slim")
    original, compressed, results, path = compress_to_artifact(source, steps, out, weights, inputs, profile=profile,
                                                               trust=trust_of(trusted, trust_source), task=task,
                                                               quiet=as_json)
    quality = _agreement(original, compressed, calib, path, as_json)
    before, after = sum(r.params_before for r in results), sum(r.params_after for r in results)
    counts = Counter(c.status for r in results for c in r.changes)
    sized = [c for c in results[-1].changes if c.bytes_before is not None and c.bytes_after is not None]
    size = {"targeted_bytes_before": sum(c.bytes_before for c in sized),
            "targeted_bytes_after": sum(c.bytes_after for c in sized)} if sized else {}
    skipped = results[-1].resolved.get("skipped", {})
    if as_json:
        from edgeslim.pipeline import count
        print_json({
            "source": source, "method": method, "profile": profile, "task": original.task, "artifact": str(path),
            "artifact_bytes": folder_bytes(path), "modules": dict(counts),
            "params": {"targeted_before": before, "targeted_after": after, "model_before": count(original.model),
                       "model_after": count(compressed.model)}, **({"bytes": size} if size else {}),
            "notes": skipped, "agreement": quality, "steps": [r.step_record() for r in results]})
        return
    console = _console()
    for name, reason in skipped.items():
        console.print(f"note: {name}: {reason}")
    console.print(f"{', '.join(f'{n} {s}' for s, n in counts.items()) or 'no'} module(s); "
                  f"targeted parameters {before:,} -> {after:,}; " + (
                      f"targeted bytes {size['targeted_bytes_before']:,} -> {size['targeted_bytes_after']:,} "
                      f"(x{size['targeted_bytes_after'] / max(size['targeted_bytes_before'], 1):.3f}); " if size else "") +
                  f"model {sum(p.numel() for p in original.model.parameters()):,} -> "
                  f"{sum(p.numel() for p in compressed.model.parameters()):,} ({original.task})\nartifact: {path}")
    _print_agreement(console, quality, source, method, calib, heal)


POOR = {"cosine_mean": 0.95, "top1_agreement": 0.9, "next_token_agreement": 0.8}  # below: say so, suggest healing


def _agreement(original: Any, compressed: Any, calib: str | None, folder: Path, quiet: bool) -> dict[str, Any]:
    """What the artifact at `folder` deploys (its torch model, or its cached ONNX export when a step lives in
    the graph, as INT8 does) against the original on calibration samples it was not calibrated on (the data
    set drawn with another seed; random inputs without --calib), the metric the task has."""
    from edgeslim.data import parse_spec
    from edgeslim.pipeline import compare_outputs, runnable

    held_out = f"{parse_spec(calib)[0]}:32" if calib else None
    out = compare_outputs(original, runnable(compressed, quiet=quiet, folder=Path(folder)), held_out, seed=1)
    return out | {"data": f"{held_out} (drawn with another seed)" if held_out else "random inputs"}


def _print_agreement(console: Any, quality: dict[str, Any], source: str, method: str, calib: str | None,
                     heal: int | None) -> None:
    shown = {k: quality[k] for k in POOR if k in quality}
    words = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in shown.items()) or \
        f"max |difference| {quality['max_abs_diff']:.3g}"
    console.print(f"agreement with the original on {quality['samples']} samples of {quality['data']}: {words}")
    poor = [k for k, v in shown.items() if v < POOR[k]]
    if poor:
        how = (f"heal it: edgeslim compress {source} -m {method} ... --heal 40 --calib {calib or 'DATA'}"
               if not heal else "heal longer (--heal) or keep more of the model (a higher --ratio)")
        console.print(f"[yellow]poor agreement[/] ({', '.join(f'{k} under {POOR[k]}' for k in poor)}): {how}")


@cli.command()
@click.argument("item")
@click.option("--to", "to", type=click.Choice(["onnx", "tensorrt"]), default="onnx", show_default=True)
@click.option("--profile", help="target profile (for TensorRT: precision and shapes)")
@source_options
@click.option("--base", help="base model of an adapter artifact (zoo name or folder), when not the recorded one")
@click.option("--unmerged", is_flag=True, help="adapters: keep LoRA and PHM layers as trained (default: merged)")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]),
              help="fp16: convert the exported graph (fp32 inputs/outputs kept), checked at fp16 tolerance")
@click.option("--eval", "data", help="data for the INT8/fp16 agreement metrics (NAME[:COUNT] or a file)")
@click.option("--bundle", is_flag=True, help="write a deployable folder (-o NAME.bundle): the model, its tokenizer "
              "or preprocessing, input spec, labels and bundle.json")
@click.option("--kv-cache", "kv_cache", is_flag=True, help="causal LMs: one graph with a key/value cache (Optimum's "
              "merged-decoder names: past_key_values.*, present.*) for `generate` and LLM profiling")
@click.option("--nbits-accuracy", "accuracy_level", type=click.IntRange(0, 4), default=0, show_default=True,
              help="--kv-cache of a wq model: MatMulNBits accuracy_level (4: int8 activations, faster on VNNI/AMX "
              "CPUs, checked at a looser tolerance after the exact check at 0)")
@click.option("--kv-layout", "kv_layout", type=click.Choice(["optimum", "buffer", "shared"]), default="optimum",
              show_default=True,
              help="--kv-cache: optimum (present.* = past + new, for Optimum-style runners), buffer (new_key_values.*: "
              "the new positions only, written in place by edgeslim's runner: no copy of the cache per token) or "
              "shared (Optimum's names, attention as ORT's GroupQueryAttention, which writes present.* into the past's "
              "buffer when a runner binds both to it, as edgeslim's and ORT GenAI's do; padding only after a prompt); a "
              "family a layout does not cover gets optimum, with a note")
@click.option("-o", "--out", callback=not_empty, help="output file (with --bundle: folder)")
@json_option
@trust_options
def export(item: str, to: str, profile: str | None, weights: str | None, inputs: str | None, task: str | None,
           base: str | None, unmerged: bool, precision: str | None, data: str | None, bundle: bool, kv_cache: bool,
           accuracy_level: int, kv_layout: str, out: str | None, as_json: bool, trusted: str | None,
           trust_source: bool) -> None:
    """Export an artifact (or any source) to ONNX, validated in ONNX Runtime, or to a TensorRT engine."""
    from edgeslim.core.files import BUNDLE, check_output
    from edgeslim.pipeline import check_export_paths, export_bundle, export_model, stage
    from edgeslim.sources import load_model

    trust = trust_of(trusted, trust_source)
    suffix = ".bundle" if bundle else ".engine" if to == "tensorrt" else ".onnx"
    path = Path(out) if out is not None else DEFAULT_OUT / (safe_stem(Path(item).name.removesuffix(".slim")) + suffix)
    if bundle:
        check_output(path, BUNDLE)
    else:
        check_export_paths(path, to)  # before any work: never over a foreign file or folder
    if accuracy_level and not kv_cache:
        raise ConfigError("--nbits-accuracy applies to a --kv-cache export of a wq model")
    if kv_layout != "optimum" and not kv_cache:
        raise ConfigError("--kv-layout applies to a --kv-cache export")
    with stage(f"load {item}", as_json):
        loaded = load_model(item, weights, inputs, task=task, trust=trust, base=base)
    from edgeslim.compress.compacter import METHODS, merge_for_export
    if not unmerged and any(s.get("method") in METHODS for s in loaded.steps):
        import dataclasses
        loaded = dataclasses.replace(loaded, model=merge_for_export(loaded.model))
    if kv_cache:
        if bundle or to != "onnx" or precision == "fp16":
            raise ConfigError("--kv-cache writes an fp32 ONNX graph: drop --bundle, --to tensorrt and --precision fp16")
        from edgeslim.pipeline import export_cache
        info = export_cache(loaded, path, quiet=as_json, accuracy_level=accuracy_level, layout=kv_layout)
        if as_json:
            print_json({"source": item, "to": to, "task": loaded.task, "kv_cache": True} | info)
            return
        _console().print(f"wrote {info['onnx']} ({info['onnx_bytes']:,} bytes, {info['layers']} layers, key/value "
                         f"cache, {info['cache_layout']} layout); max |ONNX - PyTorch| of the logits at past 0/1/100: "
                         + ", ".join(f"{v:.2e}" for v in info["max_abs_diff"].values())
                         + f"; greedy tokens equal to torch generate for {info['greedy_prompts_equal']} prompts")
        return
    if bundle:
        info = export_bundle(loaded, to, path, profile, precision=precision, data=data, quiet=as_json)
    else:
        info = export_model(loaded, to, path, profile, precision=precision, data=data, quiet=as_json)
    if as_json:
        engine = {"engine_bytes": Path(info["engine"]).stat().st_size} if "engine" in info else {}
        print_json({"source": item, "to": to, "profile": profile, "task": loaded.task,
                               "params": sum(p.numel() for p in loaded.model.parameters())} | info | engine)
        return
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in info["max_abs_diff"].items())
    from edgeslim.report import si

    for note in info.get("export_notes", ()):
        _console().print(f"note: {note}")
    written = Path(info.get("engine") or info["onnx"])
    if bundle:  # the model was written in a temporary folder, then the folder renamed into place
        _console().print(f"bundle {info['bundle']}: {', '.join(info['files'])} + bundle.json")
        written = Path(info["bundle"]) / written.name
    _console().print(f"wrote {written} ({si(info['onnx_bytes'], 'B')} ONNX); "
                     f"max |ONNX - PyTorch|: {diffs}")
    if "agreement" in info:
        a = info["agreement"]
        _console().print(f"{info['precision']} graph ({', '.join(info['onnx_stages']) or 'converted'}) vs PyTorch "
                         f"fp32 on {a['data']} inputs: relative L2 error {a['rel_l2']:.3g} (SNR {a['snr_db']:.1f} dB)"
                         + (f", top-1 agreement {a['top1_agreement']:.3f}" if "top1_agreement" in a else ""))


@cli.command(name="eval")
@click.argument("item")
@click.option("--data", required=True, help="a data set name (bbc-news, sentences) or your file/folder: text file "
              "(one document a line) for perplexity, JSONL/CSV {text, label} or an image folder (one subfolder "
              "per class) for classifiers, high-resolution images for super-resolution")
@click.option("--onnx", "onnx_file", type=click.Path(dir_okay=False, exists=True),
              help="evaluate this exported ONNX file (ITEM supplies task, tokenizer and the original)")
@click.option("--task", help=TASK_HELP)
@click.option("--batch", "batch_size", default=8, show_default=True, type=click.IntRange(min=1),
              help="batch size")
@click.option("--reference", help="the original model, for the agreement of an encoder artifact whose source "
              "is not a zoo model (a Hugging Face folder or pkg.mod:factory)")
@click.option("--base", help="base model of an adapter artifact (zoo name or folder), when not the recorded one")
@json_option
@trust_options
def eval_(item: str, data: str, onnx_file: str | None, task: str | None, batch_size: int, reference: str | None,
          base: str | None, as_json: bool, trusted: str | None, trust_source: bool) -> None:
    """The task's metric on your data: perplexity, accuracy + macro-F1, cosine agreement or Y-PSNR/SSIM."""
    from edgeslim.evaluate import evaluate
    from edgeslim.sources import load_model, reference_of

    loaded = load_model(item, task=task, trust=trust_of(trusted, trust_source), base=base)
    original = reference_of(item, loaded, reference) if loaded.task == "feature-extraction" else None
    result = evaluate(loaded, data, original, onnx_file, batch_size, progress=not as_json)
    result.model = str(onnx_file or item)
    if as_json:
        print_json(result.to_dict())
    else:
        click.echo(result.line())


@cli.command()
@click.argument("path")
@json_option
def inspect(path: str, as_json: bool) -> None:
    """Show an artifact's source, steps, per-layer decisions and file hashes (verified)."""
    from edgeslim.artifact import read_manifest, verify

    manifest = read_manifest(path)
    status = verify(path, manifest)
    if as_json:
        print_json(manifest | {"verified": status})
        return
    src = manifest["source"]
    console = _console()
    console.print(f"[bold]{path}[/]  format {manifest['format_version']}, edgeslim {manifest.get('edgeslim_version')}")
    weights = f"weights sha256 {src['sha256'][:16]}..." if src.get("sha256") else "no weights file: built by code, seeded"
    console.print(f"source: {src['kind']} {src['identifier']} (version {src.get('version')}, {weights})")
    if manifest.get("kind") == "adapter":
        console.print(f"adapter artifact: needs its base (state sha256 {str(manifest.get('base_sha256'))[:16]}...); "
                      f"labels {manifest.get('labels')}")
    console.print("inputs: " + ", ".join(f"{i['name']}{tuple(i['shape'])} {i['dtype']}" for i in manifest["inputs"]))
    for i, step in enumerate(manifest["steps"]):
        changes = step.get("changes", [])
        before, after = sum(c["params_before"] for c in changes), sum(c["params_after"] for c in changes)
        console.print(f"step {i + 1}: {step['method']} {json.dumps(step['config'])}")
        changed = sum(c.get("status", "replaced") not in ("dense", "skipped") for c in changes)
        console.print(f"  {changed} of {len(changes)} targeted module(s) changed, parameters {before:,} -> {after:,}; "
                      f"calibration: {step.get('resolved', {}).get('calib')}")
        for c in changes:  # the per-layer decisions and their reasons (dense and why, factoring paid off or not)
            decision = "" if c.get("decision") is None else f" -> {c['decision']}"
            console.print(f"  {c['name']}: {c.get('status', 'replaced')}{decision}, {c['params_before']:,} -> "
                          f"{c['params_after']:,} params" + (f"; {c['note']}" if c.get("note") else ""))
        skipped = step.get("resolved", {}).get("skipped")
        for name, reason in (skipped.items() if isinstance(skipped, dict) else ()):
            console.print(f"  left whole: {name}: {reason}")
    for name, digest in manifest["files"].items():
        console.print(f"  {name}: sha256 {digest[:16]}... {status[name]}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI; every refusal is one line on stderr with its exit code.

    Exit codes: 0 ok, 1 the system refused a read or write (disk full, ...), 2 bad config, option or
    output path, 3 unreadable, corrupt or untrusted source/file, 4 missing optional dependency,
    5 export validation failure, 6 the inference process died (crash, out of memory),
    130 interrupted. Anything else is a bug and keeps its traceback.
    """
    import os
    import warnings

    from edgeslim.noise import quiet_libraries

    args = list(sys.argv[1:] if argv is None else argv)
    words = args[:args.index("--")] if "--" in args else args
    verbose = any(w in ("-v", "--verbose") for w in words)
    args = [w for w in words if w not in ("-v", "--verbose")] + args[len(words):]
    quiet_libraries(verbose)
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    stdin, sys.stdin = sys.stdin, open(os.devnull)  # no library may ask a question (transformers' custom code)
    try:
        cli.main(args=args, prog_name="edgeslim", standalone_mode=False)
    except EdgeslimError as exc:
        text = str(exc) if isinstance(exc, ExportValidationError) else " ".join(str(exc).split())
        click.echo(f"error: {text}", err=True)
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("aborted", err=True)
        return 130
    except click.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx is not None:  # `edgeslim` alone: the help
            click.echo(exc.ctx.get_help())
            return 0
        if exc.ctx is not None:
            click.echo(exc.ctx.get_usage(), err=True)
        click.echo(f"error: {' '.join(exc.format_message().split())} (see edgeslim "
                   f"{exc.ctx.command_path.partition(' ')[2] + ' ' if exc.ctx else ''}-h)", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        return exc.exit_code
    except OSError as exc:
        click.echo(f"error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", err=True)
        return 1
    finally:
        sys.stdin.close()
        sys.stdin = stdin
    return 0


if __name__ == "__main__":
    sys.exit(main())
