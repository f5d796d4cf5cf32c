"""`edgeslim optimize`: one search across compression families under a budget measured on the target."""
from __future__ import annotations

import click

from edgeslim.cli_options import console, json_option, not_empty, print_json, source_options, trust_of, trust_options
from edgeslim.defaults import DEFAULT_PROFILE


@click.command()
@click.argument("source")
@click.option("--profile", default=DEFAULT_PROFILE, show_default=True, help="target profile (edgeslim list profiles)")
@click.option("--device", metavar="ssh://[user@]host[:port][?python=PATH]",
              help="time every candidate on this board (the profile's own address when it has one)")
@click.option("--speedup", type=float, help="measured speedup to reach on the target, e.g. 2")
@click.option("--latency-ms", type=float, help="latency to reach on the target (p50 ms at --batch)")
@click.option("--size-mb", type=float, help="size of the model's stored weights to reach (MB, 10^6 bytes)")
@click.option("--eval", "eval_data", required=True,
              help="data the metric is measured on: NAME[:COUNT] or a file/folder (as `edgeslim eval --data`)")
@click.option("--max-drop", type=float, required=True,
              help="largest allowed drop of the metric in its own units (accuracy 0.01 = one point; perplexity: "
                   "relative increase, 0.1 = 10%)")
@click.option("--calib", help="calibration data NAME[:COUNT] or file/folder (default: a data set that fits, 64 samples)")
@click.option("--families", default="asvd,prune,int8,wq", show_default=True,
              help="families to search, comma-separated; one named here that cannot apply is an error")
@click.option("--budget-minutes", type=float, help="stop verifying after this many minutes (best point so far)")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="run candidate jobs on this Ray cluster (HOST:PORT, or 'auto'); needs edgeslim[ray]")
@click.option("--workers", default=1, show_default=True, help="local worker processes for candidate jobs")
@click.option("--rounds", default=4, show_default=True, help="verification rounds at most (each re-aims the estimate)")
@click.option("--top", default=2, show_default=True, help="candidates of least estimated loss verified per round")
@click.option("--batch", default=8, show_default=True, help="batch size the latency is measured at")
@click.option("-o", "--out", "out_dir", required=True, callback=not_empty, help="output folder")
@json_option
@source_options
@trust_options
def optimize(source: str, profile: str, device: str | None, speedup: float | None, latency_ms: float | None,
             size_mb: float | None, eval_data: str, max_drop: float, calib: str | None, families: str,
             budget_minutes: float | None, ray_address: str | None, workers: int, rounds: int, top: int, batch: int,
             out_dir: str, as_json: bool, weights: str | None, inputs: str | None, task: str | None,
             trusted: str | None, trust_source: bool) -> None:
    """Search asvd ranks per layer, pruning, INT8 and weight-only quantization together for the recipe that
    meets a budget measured on the target (--speedup, --latency-ms or --size-mb) with the least metric lost;
    every candidate it keeps is compressed, exported, timed beside the original and evaluated on --eval.
    Writes OUT/recipe.toml (for `edgeslim run`), best.slim, best.onnx and report.html."""
    from edgeslim.optimize import OptimizeRequest, optimize as run
    from edgeslim.optimize_report import final_table

    names = tuple(f.strip() for f in families.split(",") if f.strip())
    explicit = click.get_current_context().get_parameter_source("families").name != "DEFAULT"
    request = OptimizeRequest(source, profile, eval_data, max_drop, speedup, latency_ms, size_mb, calib, names,
                              explicit, budget_minutes, device, ray_address, workers, rounds, top, batch,
                              {k: v for k, v in (("weights", weights), ("inputs", inputs), ("task", task)) if v},
                              trust_of(trusted, trust_source))
    summary = run(request, out_dir)
    if as_json:
        print_json(summary)
        return
    for line in final_table(summary, summary["points"]):
        click.echo(line)
    chosen = summary["chosen"]
    verdict = "met" if summary["met"] else "OUT OF REACH (best point found)"
    console().print(f"{verdict}: {chosen['label']}, measured {chosen['gain']:.2f}x, {summary['metric']} "
                    f"{chosen['metric']:.4f} (original {summary['base_metric']:.4f}); written to {out_dir}")
