"""The outputs of `edgeslim optimize`, written whole into -o DIR (a temporary folder renamed in):
recipe.toml (replayed by `edgeslim run`), best.slim (the chosen artifact), best.onnx (its export),
report.html (the Pareto front: metric vs measured gain of every verified candidate, the chosen one marked,
the best single-family point of each family) and optimize.json (every point and decision)."""
from __future__ import annotations

import html
import json
import math
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from edgeslim.compare import _img, _row
from edgeslim.core.files import OutputKind, replace_output
from edgeslim.optimize_search import Outcome, Point, pareto
from edgeslim.report import figure, png_bytes

OPTIMIZE = OutputKind("edgeslim optimize folder", True, marker="optimize.json")


def toml_value(value: Any) -> str:
    """A TOML literal for the plain values a recipe holds (text, numbers, booleans, lists of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def recipe_text(summary: Mapping[str, Any], chosen: Point, options: Mapping[str, Any], batch: int) -> str:
    """The recipe `edgeslim run` replays: the source, the chosen steps, ONNX export and the target profile."""
    lines = [f"# edgeslim optimize: {chosen.label}",
             f"# measured {chosen.gain:.3f}x ({'speedup' if summary['axis'] == 'ms' else 'size reduction'}, asked "
             f"{summary['asked']:.3g}x), {summary['metric']} {chosen.metric:.4f} (original {summary['base_metric']:.4f})",
             f"source = {toml_value(_source_text(summary['source']))}", 'name = "best"']
    lines += [f"{k} = {toml_value(v)}" for k, v in (("weights", options.get("weights")),
                                                   ("inputs", options.get("inputs"))) if v is not None]
    for step in chosen.steps:
        lines += ["", "[[step]]"] + [f"{k} = {toml_value(v)}" for k, v in step.items()]
    lines += ["", "[export]", 'to = "onnx"', "", "[profile]", f"name = {toml_value(summary['profile'])}",
              f"batch = [{batch}]"]
    return "\n".join(lines) + "\n"


def _source_text(source: str) -> str:
    """A local folder or file source as an absolute path (the recipe may be run from anywhere), else as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def point_dict(p: Point) -> dict[str, Any]:
    return {"label": p.label, "families": list(p.families), "steps": p.steps, "estimated_gain": p.estimated_gain,
            "estimated_loss": p.estimated_loss, "gain": p.gain, "metric": p.metric, "drop": p.drop,
            "round": p.round, "combo": p.combo, "artifact_sha256": p.result.get("artifact_sha256"),
            "latency_ms": p.result.get("latency_ms"), "cached": p.result.get("cached", False), "mixed": p.mixed}


def front_of(summary: Mapping[str, Any], points: Sequence[Point]) -> list[int]:
    """id() of the points on the Pareto front of metric vs measured gain."""
    idx = pareto([{"gain": p.gain, "metric": p.metric} for p in points], summary["metric"] != "perplexity")
    return [id(points[i]) for i in idx]


def _plot(summary: Mapping[str, Any], outcome: Outcome) -> bytes:
    """Metric against measured gain: every point, the Pareto front, the chosen one and each family's best."""
    fig = figure(6.4, 4.2)
    ax = fig.add_subplot()
    pts = outcome.points
    ax.scatter([p.gain for p in pts], [p.metric for p in pts], s=18, color="0.6", label="verified candidates")
    front = [p for p in pts if id(p) in set(front_of(summary, pts))]
    front.sort(key=lambda p: p.gain)
    ax.plot([p.gain for p in front], [p.metric for p in front], "-o", color="tab:blue", ms=4, label="Pareto front")
    for family, p in outcome.best_single.items():
        ax.scatter([p.gain], [p.metric], marker="s", s=40, label=f"best {family} alone")
    ax.scatter([outcome.chosen.gain], [outcome.chosen.metric], marker="*", s=180, color="tab:red", zorder=5,
               label="chosen")
    ax.axvline(outcome.asked, color="tab:red", ls=":", lw=1, label=f"asked {outcome.asked:.3g}x")
    ax.axhline(summary["base_metric"], color="0.3", ls="--", lw=1, label="original")
    ax.set_xlabel("measured speedup on the target" if summary["axis"] == "ms" else "measured size reduction")
    ax.set_ylabel(summary["metric"])
    ax.legend(fontsize=7)
    return png_bytes(fig)


def report_html(summary: Mapping[str, Any], outcome: Outcome) -> str:
    verdict = ("met" if outcome.met else "OUT OF REACH: the best point found is shown")
    head = "".join(f"<th>{h}</th>" for h in ("", "families", "estimated", "measured", summary["metric"], "drop",
                                                 "round"))
    rows, front = [], set(front_of(summary, outcome.points))
    for p in sorted(outcome.points, key=lambda p: p.gain):
        mark = (" (chosen)" if p is outcome.chosen else "") + (" (Pareto front)" if id(p) in front else "")
        rows.append(_row(p.label + mark, ["+".join(p.families) or "-", f"{p.estimated_gain:.2f}x",
                                          f"{p.gain:.2f}x", f"{p.metric:.4f}", f"{p.drop:+.4f}", str(p.round + 1)]))
    single = "".join(f"<li>{html.escape(f)}: {html.escape(p.label)}, {p.gain:.2f}x, {p.metric:.4f}</li>"
                     for f, p in outcome.best_single.items())
    skipped = "".join(f"<li>{html.escape(f)}: {html.escape(w)}</li>" for f, w in summary["skipped"].items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>edgeslim optimize</title></head><body>"
            f"<h1>edgeslim optimize: {html.escape(summary['source'])} on {html.escape(summary['profile'])}</h1>"
            f"<p>Asked {outcome.asked:.3g}x at most {summary['max_drop']:g} {html.escape(summary['metric'])} lost: "
            f"<b>{verdict}</b>. Chosen: {html.escape(outcome.chosen.label)}, measured {outcome.chosen.gain:.2f}x, "
            f"{html.escape(summary['metric'])} {outcome.chosen.metric:.4f} (original {summary['base_metric']:.4f}); "
            f"{len(outcome.points)} candidates verified in {outcome.rounds} rounds, {summary['seconds']:.0f} s.</p>"
            f"<p>{_img(_plot(summary, outcome), 'metric vs measured gain')}</p>"
            f"<h2>Pareto front</h2><p>{len(front)} of {len(outcome.points)} candidates: no other one is both "
            "faster and better on the metric (marked in the table).</p>"
            f"<h2>Best single-family recipes</h2><ul>{single}</ul>"
            + (f"<h2>Families left out</h2><ul>{skipped}</ul>" if skipped else "")
            + f"<h2>Every verified candidate</h2><table border='1' cellpadding='4'><tr>{head}</tr>{''.join(rows)}"
            "</table></body></html>")


def final_table(summary: Mapping[str, Any], points: Sequence[Mapping[str, Any]]) -> list[str]:
    """The lines of the final table (printed by the CLI)."""
    out = [f"{'candidate':<48} {'families':<16} {'est.':>6} {'meas.':>6} {summary['metric']:>12} {'drop':>8}"]
    for p in sorted(points, key=lambda p: p["gain"]):
        metric = "-" if math.isnan(p["metric"]) else f"{p['metric']:.4f}"
        out.append(f"{p['label'][:48]:<48} {'+'.join(p['families'])[:16]:<16} {p['estimated_gain']:>5.2f}x "
                   f"{p['gain']:>5.2f}x {metric:>12} {p['drop']:>+8.4f}")
    return out


def export_best(chosen: Point, path: Path, request: Any, summary: dict[str, Any]) -> bool:
    """Export the chosen artifact of a size budget (its jobs export nothing: no time is measured). A model ONNX
    cannot hold (a wq int4 LLM: `export --kv-cache` is its deployment) keeps the artifact alone, with the why in
    summary["export_note"]."""
    from edgeslim.core.errors import EdgeslimError
    from edgeslim.pipeline import export_model
    from edgeslim.sources import load_model

    try:
        export_model(load_model(chosen.result["slim"], trust=request.trust), "onnx", path, request.profile, quiet=True)
    except EdgeslimError as exc:
        summary["export_note"] = " ".join(str(exc).split())
        return False
    return True


def write_outputs(out: str | Path, summary: dict[str, Any], outcome: Outcome, request: Any) -> dict[str, Any]:
    """Write -o DIR whole; returns the summary with every point, the chosen one and the files."""
    chosen = outcome.chosen
    front = set(front_of(summary, outcome.points))
    summary |= {"points": [point_dict(p) | {"pareto": id(p) in front} for p in outcome.points],
                "chosen": point_dict(chosen),
                "best_single_family": {f: point_dict(p) for f, p in outcome.best_single.items()},
                "out": str(out), "files": ["recipe.toml", "best.slim", "best.onnx", "report.html", "optimize.json"]}
    with replace_output(out, OPTIMIZE) as tmp:
        tmp.mkdir()
        shutil.copytree(chosen.result["slim"], tmp / "best.slim")
        if chosen.result.get("onnx"):
            shutil.copyfile(chosen.result["onnx"], tmp / "best.onnx")
        elif not export_best(chosen, tmp / "best.onnx", request, summary):
            summary["files"].remove("best.onnx")
        (tmp / "recipe.toml").write_text(recipe_text(summary, chosen, request.source_options, request.batch))
        (tmp / "report.html").write_text(report_html(summary, outcome))
        (tmp / "optimize.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
