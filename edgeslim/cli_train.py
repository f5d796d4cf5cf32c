"""`edgeslim train`: the models edgeslim trains itself (ESPCN super-resolution) and task adapters on your data."""
from __future__ import annotations

from pathlib import Path

import click

from edgeslim.cli_options import console as _console, folder_bytes, json_option, not_empty, print_json, sets as _sets
from edgeslim.defaults import DEFAULT_OUT, SR_RECIPE


@click.group()
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

    out = DEFAULT_OUT / f"espcn-x{scale}.slim" if out is None else out
    result, path = train_espcn_artifact(int(scale), steps, out, seed)
    params = sum(p.numel() for p in result.model.parameters())
    if as_json:
        print_json({"model": f"espcn-x{scale}", "scale": int(scale), "steps": steps, "seed": seed,
                               "params": params, "artifact": str(path), "artifact_bytes": folder_bytes(path),
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
