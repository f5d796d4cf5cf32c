"""The `edgeslim` command: a thin shell over the library (parse, call one function, print)."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

from edgeslim.cli_options import (TASK_HELP, console as _console, json_option, not_empty, print_json,  # noqa: F401
                                  sets as _sets, source_options, trust_of, trust_options)
from edgeslim.cli_device import device
from edgeslim.cli_profile import profile
from edgeslim.cli_generate import generate
from edgeslim.core.errors import ConfigError, EdgeslimError, ExportValidationError
from edgeslim.core.files import safe_stem
from edgeslim.images import TILE as TILE_DEFAULT
from edgeslim.pipeline import DEFAULT_OUT
from edgeslim.recipe import DEFAULT_PROFILE
from edgeslim.sr_train import RECIPE as SR_RECIPE

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeslim")
def cli() -> None:
    """edgeslim: compress a trained PyTorch model, export it to a device runtime, profile it."""


cli.add_command(profile)
cli.add_command(device)
cli.add_command(generate)


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
@source_options
@click.option("--profile", default=DEFAULT_PROFILE, show_default=True,
              help="target the decisions are made for (its align rounds ranks), as in `run`")
@click.option("-o", "--out", callback=not_empty, help="output artifact folder (NAME.slim)")
@json_option
@trust_options
def compress(source: str, method: str, ratio: float | None, rank: int | None, energy: float | None,
             speedup: float | None, gemm_table: str | None, calib: str | None, target: str | None, exclude: str | None, sets: tuple[str, ...],
             weights: str | None, inputs: str | None, task: str | None, profile: str, out: str | None,
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
    if out is None:
        out = str(DEFAULT_OUT / f"{safe_stem(Path(source).name.removesuffix('.slim'))}-{safe_stem(method)}.slim")
    original, compressed, results, path = compress_to_artifact(source, [step], out, weights, inputs, profile=profile,
                                                               trust=trust_of(trusted, trust_source), task=task,
                                                               quiet=as_json)
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
            "artifact_bytes": _folder_bytes(path), "modules": dict(counts),
            "params": {"targeted_before": before, "targeted_after": after, "model_before": count(original.model),
                       "model_after": count(compressed.model)}, **({"bytes": size} if size else {}),
            "notes": skipped, "steps": [r.step_record() for r in results]})
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
@click.option("-o", "--out", callback=not_empty, help="output file (with --bundle: folder)")
@json_option
@trust_options
def export(item: str, to: str, profile: str | None, weights: str | None, inputs: str | None, task: str | None,
           base: str | None, unmerged: bool, precision: str | None, data: str | None, bundle: bool, kv_cache: bool,
           accuracy_level: int, out: str | None, as_json: bool, trusted: str | None, trust_source: bool) -> None:
    """Export an artifact (or any source) to ONNX, validated in ONNX Runtime, or to a TensorRT engine."""
    from edgeslim.core.files import BUNDLE, check_output
    from edgeslim.pipeline import check_export_paths, export_bundle, export_model
    from edgeslim.sources import load_model

    trust = trust_of(trusted, trust_source)
    suffix = ".bundle" if bundle else ".engine" if to == "tensorrt" else ".onnx"
    path = Path(out) if out is not None else DEFAULT_OUT / (safe_stem(Path(item).name.removesuffix(".slim")) + suffix)
    if bundle:
        check_output(path, BUNDLE)
    else:
        check_export_paths(path, to)  # before any work: never over a foreign file or folder
    loaded = load_model(item, weights, inputs, task=task, trust=trust, base=base)
    from edgeslim.compress.compacter import METHODS, merge_for_export
    if not unmerged and any(s.get("method") in METHODS for s in loaded.steps):
        import dataclasses
        loaded = dataclasses.replace(loaded, model=merge_for_export(loaded.model))
    if accuracy_level and not kv_cache:
        raise ConfigError("--nbits-accuracy applies to a --kv-cache export of a wq model")
    if kv_cache:
        if bundle or to != "onnx" or precision == "fp16":
            raise ConfigError("--kv-cache writes an fp32 ONNX graph: drop --bundle, --to tensorrt and --precision fp16")
        from edgeslim.pipeline import export_cache
        info = export_cache(loaded, path, quiet=as_json, accuracy_level=accuracy_level)
        if as_json:
            print_json({"source": item, "to": to, "task": loaded.task, "kv_cache": True} | info)
            return
        _console().print(f"wrote {info['onnx']} ({info['onnx_bytes']:,} bytes, {info['layers']} layers, key/value "
                         f"cache); max |ONNX - PyTorch| of the logits at past 0/1/100: "
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
    if bundle:
        _console().print(f"bundle {info['bundle']}: {', '.join(info['files'])} + bundle.json")
    _console().print(f"wrote {info.get('engine') or info['onnx']} ({si(info['onnx_bytes'], 'B')} ONNX); "
                     f"max |ONNX - PyTorch|: {diffs}")
    if "agreement" in info:
        a = info["agreement"]
        _console().print(f"{info['precision']} graph ({', '.join(info['onnx_stages']) or 'converted'}) vs PyTorch "
                         f"fp32 on {a['data']} inputs: relative L2 error {a['rel_l2']:.3g} (SNR {a['snr_db']:.1f} dB)"
                         + (f", top-1 agreement {a['top1_agreement']:.3f}" if "top1_agreement" in a else ""))


def _folder_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


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


@cli.command(name="list")
@click.argument("what", type=click.Choice(["compressors", "profiles", "models", "datasets"]))
def list_(what: str) -> None:
    """List compressors, target profiles, zoo models or data sets."""
    from rich.table import Table

    table = Table(title=what)
    if what == "compressors":  # every key in full: plain lines, never a table's cut cells
        from edgeslim.compress.base import describe_compressors
        click.echo(describe_compressors())
        return
    if what == "profiles":
        from edgeslim.runtime.targets import list_profiles
        for col in ("name", "runtime", "device", "precision", "keys"):
            table.add_column(col)
        for name, p in list_profiles().items():
            table.add_row(name, p.runtime, p.device, p.precision,
                          ", ".join(f"{k}={v}" for k, v in p.to_dict().items() if k not in ("runtime", "device", "precision", "description")))
    elif what == "models":
        from edgeslim import zoo
        for col in ("name", "available", "description"):
            table.add_column(col)
        for e in zoo.entries().values():
            missing = "not in this install" if e.shipped else f"{e.requires} missing"
            table.add_row(e.name, "yes" if e.available else f"no ({missing})", e.description)
    else:
        from edgeslim.data import list_datasets
        for col in ("name", "kind", "available", "description"):
            table.add_column(col)
        for d in list_datasets().values():
            table.add_row(d.name, d.kind, "yes" if d.available else f"no ({d.requires} missing)", d.description)
    _console().print(table)


@cli.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
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
    console.print(f"source: {src['kind']} {src['identifier']} (version {src.get('version')}, sha256 {str(src.get('sha256'))[:16]}...)")
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
    for name, digest in manifest["files"].items():
        console.print(f"  {name}: sha256 {digest[:16]}... {status[name]}")


@cli.command(name="cache")
@click.argument("action", type=click.Choice(["list", "clear"]))
@click.argument("name", required=False)
def cache_(action: str, name: str | None) -> None:
    """List or clear the local cache of converted models ($EDGESLIM_CACHE, default ~/.cache/edgeslim)."""
    from edgeslim import cache
    from edgeslim.report import si

    console = _console()
    if action == "clear":
        removed = cache.clear(name)
        console.print(f"removed {len(removed)} cache entr{'y' if len(removed) == 1 else 'ies'} from {cache.root()}"
                      + (f": {', '.join(removed)}" if removed else ""))
        return
    entries = cache.list_entries()
    console.print(f"cache {cache.root()}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    for e in entries:
        console.print(f"  {e.name}  {si(e.size_bytes, 'B')}")


@cli.group()
def train() -> None:
    """Train the models edgeslim ships (ESPCN super-resolution) and task adapters on your data."""


@train.command(name="espcn")
@click.option("--scale", type=click.Choice(["2", "3", "4"]), required=True, help="upscaling factor")
@click.option("--steps", default=SR_RECIPE["steps"], show_default=True, help="training steps (batch 32)")
@click.option("--seed", default=0, show_default=True)
@click.option("-o", "--out", callback=not_empty,
              help="output artifact folder (default edgeslim-out/espcn-xS.slim)")
@json_option
def train_espcn(scale: str, steps: int, seed: int, out: str | None, as_json: bool) -> None:
    """Train ESPCN (Shi et al. 2016) with the shipped models' recipe (edgeslim/sr_train.py) on the bundled photographs."""
    from edgeslim.sr_train import train_espcn_artifact

    result, path = train_espcn_artifact(int(scale), steps, DEFAULT_OUT / f"espcn-x{scale}.slim" if out is None else out, seed)
    params = sum(p.numel() for p in result.model.parameters())
    if as_json:
        print_json({"model": f"espcn-x{scale}", "scale": int(scale), "steps": steps, "seed": seed,
                               "params": params, "artifact": str(path), "artifact_bytes": _folder_bytes(path),
                               "architecture": result.resolved.get("architecture"),
                               "training": result.resolved.get("training")})
        return
    _console().print(f"ESPCN x{scale}: {params:,} parameters, {steps} steps\nartifact: {path}")


@train.command(name="adapter")
@click.argument("source")
@click.option("--data", required=True, help="training data: JSONL {\"text\", \"label\"} lines, CSV with those columns, or bbc-news[:N]")
@click.option("--eval", "eval_data", help="held-out data in the same forms (bbc-news: its test split)")
@click.option("-m", "--method", default="compacter", show_default=True,
              type=click.Choice(["compacter", "compacter_pp", "lora", "bottleneck", "head"]))
@click.option("--epochs", type=int, help="passes over the training data (default: the method's)")
@click.option("--lr", type=float, help="peak learning rate (default: the method's)")
@click.option("--batch", "batch_size", default=16, show_default=True, type=click.IntRange(min=1),
              help="training batch size")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="any other config key (repeatable)")
@click.option("-o", "--out", callback=not_empty,
              help="output adapter artifact (default edgeslim-out/SOURCE-METHOD.slim)")
@json_option
def train_adapter(source: str, data: str, eval_data: str | None, method: str, epochs: int | None, lr: float | None,
                  batch_size: int, sets: tuple[str, ...], out: str | None, as_json: bool) -> None:
    """Train a task adapter on your labelled texts over a frozen SOURCE; the artifact holds only the adapter."""
    from edgeslim.adapter import train_adapter as train_fn
    from edgeslim.compress.base import get_compressor
    from edgeslim.data import load_labelled
    from edgeslim.report import si
    from edgeslim.sources import load_model

    settings = _sets(sets, get_compressor(method).Config) | {k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None}
    test = load_labelled(eval_data, "test") if eval_data else None
    if out is None:
        out = str(DEFAULT_OUT / f"{Path(source).name.removesuffix('.slim')}-{method}.slim")
    summary = train_fn(load_model(source), load_labelled(data, "train"), out, method, settings, test, batch_size, data)
    if as_json:
        print_json({"source": source, "data": data, "eval_data": eval_data} | summary)
        return
    console = _console()
    console.print(f"{method} on {source}: {len(summary['labels'])} labels {summary['labels'][:8]}; trainable "
                  f"parameters {summary['trainable_params']:,} of {summary['total_params']:,} "
                  f"({summary['trainable_fraction']:.3%})")
    if "eval" in summary:
        ev = summary["eval"]
        console.print(f"eval on {eval_data} ({ev['samples']} examples): accuracy {ev['accuracy']:.4f}, "
                      f"macro-F1 {ev['macro_f1']:.4f}")
    console.print(f"adapter artifact: {summary['artifact']} ({si(summary['artifact_bytes'], 'B')}; weights "
                  f"{si(summary['weights_bytes'], 'B')}; needs its base {source})")


@cli.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-o", "--out", callback=not_empty, required=True, help="output image file")
@click.option("--model", default="espcn-x3", show_default=True, help="zoo name (edgeslim list models) or a .slim artifact")
@click.option("--compare", "compare", is_flag=False, flag_value="", default=None, metavar="SIDE.png",
              help="also write a side-by-side crop: bicubic | model | reference (default name OUT-compare.png)")
@click.option("--reference", type=click.Path(dir_okay=False),
              help="the high-resolution original IMAGE was made from: --compare shows it with each PSNR")
@click.option("--runtime", type=click.Choice(["onnxruntime", "torch"]), default="onnxruntime", show_default=True,
              help="engine for the model (ONNX Runtime is the fast one on CPUs)")
@click.option("--tile", default=TILE_DEFAULT, show_default=True,
              help="LR tile side for models with a known receptive field (bounded memory; 0: one pass)")
@trust_options
def upscale(image: str, out: str, model: str, compare: str | None, reference: str | None, runtime: str, tile: int,
            trusted: str | None, trust_source: bool) -> None:
    """Upscale an image: the Y channel through the model, Cb/Cr bicubic."""
    from edgeslim.core.files import IMAGE, check_not_input, check_output
    from edgeslim.images import read_image, upscale_rgb, write_image
    from edgeslim.pipeline import runnable
    from edgeslim.sources import load_model, sr_scale

    trust = trust_of(trusted, trust_source)
    side = None if compare is None else compare or str(Path(out).with_name(f"{Path(out).stem}-compare.png"))
    for dest in (out, side) if side is not None else (out,):
        check_output(dest, IMAGE)
        for given in (image, reference, model):
            if given is not None:
                check_not_input(dest, given)
    if side is not None and Path(side).resolve() == Path(out).resolve():
        raise ConfigError(f"--compare {side} is the output image itself; name another file")
    if reference is not None and side is None:
        raise ConfigError("--reference is shown by --compare: add --compare SIDE.png")
    if tile < 0:
        raise ConfigError(f"--tile must be >= 0 (0: one pass), got {tile}")
    ref = read_image(reference) if reference is not None else None
    lr = read_image(image)
    loaded = load_model(model, trust=trust)
    net = runnable(loaded, onnx=runtime == "onnxruntime")  # an INT8 artifact always runs its QDQ graph in ORT
    scale = sr_scale(net)
    sr = upscale_rgb(lr, net, scale, tile or None)
    write_image(out, sr)
    console = _console()
    console.print(f"wrote {out} (x{scale} with {model}, {runtime})")
    if side is not None:
        from edgeslim.sr_compare import panels, side_by_side
        side_by_side(panels(lr, sr, scale, Path(model).name.removesuffix(".slim"), ref), side)
        console.print(f"wrote {side} (bicubic | {model}{' | reference, Y-PSNR' if ref is not None else ''})")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI; every refusal is one line on stderr with its exit code.

    Exit codes: 0 ok, 1 the system refused a read or write (disk full, ...), 2 bad config, option or
    output path, 3 unreadable, corrupt or untrusted source/file, 4 missing optional dependency,
    5 export validation failure, 6 the inference process died (crash, out of memory),
    130 interrupted. Anything else is a bug and keeps its traceback.
    """
    import os
    import warnings
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    stdin, sys.stdin = sys.stdin, open(os.devnull)  # no library may ask a question (transformers' custom code)
    try:
        cli.main(args=argv, prog_name="edgeslim", standalone_mode=False)
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
