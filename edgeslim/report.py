"""The run report: Markdown tables, the speedup-or-explain verdict, and matplotlib plots."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Sequence

from edgeslim.core.files import REPORT, replace_output

LEFT = ("dense", "skipped")  # statuses of targeted layers a step left as they were


def si(value: float | None, unit: str) -> str:
    """A quantity with an SI prefix and 3 significant digits: 2.72 GFLOP, 91.0 MB, 35.2 kB."""
    if value is None:
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def peak_mem_text(row: Mapping[str, Any]) -> str:
    """A profile row's memory: the peak RSS of its child process (what the inference holds), else "+" the
    growth measured in this process (`peak_mem_bytes`, weights not included)."""
    if row.get("peak_rss_bytes") is not None:
        return si(row["peak_rss_bytes"], "B")
    return "-" if row.get("peak_mem_bytes") is None else "+" + si(row["peak_mem_bytes"], "B")


def memory_method_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """How the profile rows' memory was read (a child's RSS, NVML, cudaMemGetInfo, ...) and the runtime
    settings that change it (ONNX Runtime's CPU arena and memory pattern, threads), each once."""
    parts = []
    for r in rows:
        if "memory" in r:
            settings = ", ".join(f"{k} {v}" for k, v in r["memory"].get("runtime", {}).items())
            parts.append(f"{r['memory']['method']} ({settings})" if settings else r["memory"]["method"])
        elif r.get("mem_method"):
            parts.append(f"{r['mem_method']} (growth while running in this process)")
    return "; ".join(dict.fromkeys(parts)) or "-"


def ms(value: float) -> str:
    """Milliseconds with 3 significant digits (0.0213, 1.07, 1190)."""
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or b is None else b / a


def speed_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per batch size: latency ratio beside FLOPs and params ratios, with a reason when speed lags."""
    from edgeslim.runtime.roofline import explain_speedup

    orig, comp = summary["models"]["original"], summary["models"]["compressed"]
    flops_ratio = _ratio(orig["flops"], comp["flops"])
    params_ratio = _ratio(orig["params"], comp["params"])
    rows = []
    for t_o, t_c in zip(orig.get("timings", []), comp.get("timings", [])):
        lat_ratio = _ratio(t_o["p50_ms"], t_c["p50_ms"])
        reason = explain_speedup(flops_ratio, params_ratio, lat_ratio, profile=summary["recipe"]["profile"],
                                 batch=t_o["batch"], flops=t_c.get("flops"), bytes_moved=t_c.get("bytes_moved"),
                                 latency_ms=t_c["p50_ms"], changes=summary["changes"])
        rows.append({"batch": t_o["batch"], "params_ratio": params_ratio, "flops_ratio": flops_ratio,
                     "latency_ratio": lat_ratio, "speedup": 1 / lat_ratio if lat_ratio else None, "reason": reason})
    return rows


def op_rows(breakdown: Mapping[str, Any], top: int = 8) -> list[tuple[str, str, str, str]]:
    """`run`'s op-type comparison as table rows (op type, original, compressed, time ratio): the `top`
    op types by original time (then new ones), the rest summed as "other"."""
    rows = breakdown["rows"]
    shown = [r for r in rows if r["before_ms"]][:top] + [r for r in rows if not r["before_ms"]][:3]
    rest = [r for r in rows if r not in shown]
    if rest:
        before, after = sum(r["before_ms"] for r in rest), sum(r["after_ms"] for r in rest)
        shown.append({"op": f"other ({len(rest)})", "before_ms": before, "after_ms": after,
                      "ratio": after / before if before else None,
                      "before_share": sum(r["before_share"] for r in rest), "after_share": sum(r["after_share"] for r in rest)})
    return [(r["op"], f"{ms(r['before_ms'])} ({r['before_share']:.0%})", f"{ms(r['after_ms'])} ({r['after_share']:.0%})",
             "new" if r["ratio"] is None else f"{r['ratio']:.2f}x") for r in shown]


def not_shrunk_text(breakdown: Mapping[str, Any]) -> str:
    """The op types whose kernel time did not shrink, with their share of the original's and their ratio."""
    from edgeslim.runtime.op_profile import MIN_SHARE, SHRUNK

    rows = [r for r in breakdown["rows"] if r["op"] in breakdown["not_shrunk"]]
    named = [f"{r['op']} (new: {r['after_share']:.0%} of the compressed model's kernel time)" if r["ratio"] is None
             else f"{r['op']} ({r['before_share']:.0%} of the original's kernel time, {r['ratio']:.2f}x)" for r in rows]
    if not named:
        return f"every op type with {MIN_SHARE:.0%} or more of the kernel time shrank (below {SHRUNK:.2f}x)"
    return f"did not shrink (time ratio {SHRUNK:.2f}x or more) at batch {breakdown['batch']}: " + ", ".join(named)


def figure(width: float, height: float):
    """A matplotlib Figure outside pyplot's global state (no backend switch, nothing to close)."""
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=110)


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_png(fig, path: Path) -> None:
    """Write a figure as a PNG report file (`replace_output`: recorded in the folder's ledger, never half-written)."""
    with replace_output(path, REPORT) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")


def _plot_latency(summary: Mapping[str, Any]) -> bytes:
    fig = figure(5, 3.2)
    ax = fig.subplots()
    for label, row in summary["models"].items():
        t = row.get("timings", [])
        ax.errorbar([x["batch"] for x in t], [x["p50_ms"] for x in t],
                    yerr=[[x["p50_ms"] - x["p50_ms"] for x in t], [x["p90_ms"] - x["p50_ms"] for x in t]],
                    marker="o", capsize=3, label=label)
    ax.set_xlabel("batch size")
    ax.set_ylabel("p50 latency, ms (bar: p90)")
    ax.set_xscale("log", base=2)
    ax.set_title(f"{summary['recipe']['name']} on {summary['recipe']['profile']}")
    ax.grid(alpha=0.3)
    ax.legend()
    return png_bytes(fig)


def _changed(changes: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows of layers a step changed and measured (not those left dense or skipped)."""
    return [c for c in changes if c.get("rel_error") is not None and c.get("status", "replaced") not in LEFT]


def _plot_layers(changes: list[Mapping[str, Any]]) -> bytes | None:
    rows = _changed(changes)
    if not rows:
        return None
    fig = figure(6, max(2.5, 0.14 * len(rows)))
    ax = fig.subplots()
    ax.barh(range(len(rows)), [c["rel_error"] for c in rows])
    ax.set_yticks(range(len(rows)), [c["name"] for c in rows], fontsize=5)
    ax.invert_yaxis()
    ax.set_xlabel("relative reconstruction error of the layer")
    ax.grid(alpha=0.3, axis="x")
    return png_bytes(fig)


def decision_text(decision: Any) -> str:
    """A rank as "8", bond dimensions as "4x8", no decision as "-"."""
    if decision is None:
        return "-"
    return "x".join(str(d) for d in decision) if isinstance(decision, (list, tuple)) else str(decision)


def size_text(change: Mapping[str, Any]) -> str:
    """What a layer kept: bytes for a quantized layer (its count does not change), else parameters."""
    if change.get("status") == "quantized" and change.get("bytes_before") is not None:
        return f"{si(change['bytes_before'], 'B')} -> {si(change['bytes_after'], 'B')}"
    return f"{change['params_before']:,} -> {change['params_after']:,}"


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _paid(change: Mapping[str, Any]) -> str:
    """Whether factoring a layer paid off on the target (its measured GEMM time against the dense layer's)."""
    if change.get("status") != "replaced":
        return "kept dense" + (f": {change['note'].removeprefix('dense: ')}" if change.get("note") else "")
    gain = change["latency_ms_before"] / change["latency_ms_after"] if change["latency_ms_after"] else None
    if gain is None or gain > 1:
        return f"yes ({_fmt(gain, '.2f')}x)"
    return f"no ({gain:.2f}x: slower than dense)"


def render(summary: Mapping[str, Any], latency_png: str, layers_png: str | None) -> str:
    """The Markdown text of the report."""
    r, models = summary["recipe"], summary["models"]
    lines = [f"# edgeslim report: {r['name']}", "",
             f"Source `{r['source']}`; steps: " + ", ".join(f"`{s['method']}`" for s in r["steps"]) +
             f"; artifact `{summary['artifact']}`.", "",
             "| model | parameters | work (batch 1) | ONNX file |", "|---|---:|---:|---:|"]
    for label, row in models.items():
        lines.append(f"| {label} | {row['params']:,} | {si(row['flops'], 'FLOP')} | {si(row.get('onnx_bytes'), 'B')} |")
    cmp = summary["compare"]
    lines += ["", "## Output agreement", "",
              ", ".join(f"{k} = {_fmt(v, '.4g') if isinstance(v, float) else v}" for k, v in cmp.items()), "",
              f"## Latency on `{r['profile']}`", "",
              "| model | batch | p50 ms | p90 ms | p99 ms | cv | throughput /s | peak mem (RSS of a child; +growth) | roofline ms | of roofline |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, row in models.items():
        for t in row.get("timings", []):
            flag = " (unstable)" if t["unstable"] else ""
            roof = ms(t["roofline_ms"]) if "roofline_ms" in t else "-"
            lines.append(f"| {label} | {t['batch']} | {ms(t['p50_ms'])} | {ms(t['p90_ms'])} | {ms(t['p99_ms'])} | "
                         f"{t['cv']:.3f}{flag} | {t['throughput_per_s']:.4g} | {peak_mem_text(t)} | "
                         f"{roof} | {_fmt(t.get('roofline_fraction'), '.0%')} |")
    timings = [t for row in models.values() for t in row.get("timings", [])]
    lines += ["", f"Peak memory read by: {memory_method_text(timings)}.", "",
              f"![latency vs batch]({latency_png})", "", "## Speedup or explain", "",
              "| batch | params ratio | FLOPs ratio | latency ratio | speedup | verdict |", "|---:|---:|---:|---:|---:|---|"]
    for s in speed_rows(summary):
        lines.append(f"| {s['batch']} | {_fmt(s['params_ratio'])} | {_fmt(s['flops_ratio'])} | "
                     f"{_fmt(s['latency_ratio'])} | {_fmt(s['speedup'], '.2f')}x | {s['reason'] or 'ok'} |")
    ops = summary.get("op_breakdown")
    if ops:
        lines += ["", f"Op types: {not_shrunk_text(ops)}.", "", f"## Where the time goes (batch {ops['batch']})", "",
                  f"ONNX Runtime's kernel time by op type, ms per run (share of the model's kernel time), from "
                  f"{ops['iters']} profiled runs of each ONNX file apart from the latency runs:", "",
                  "| op type | original | compressed | time ratio |", "|---|---:|---:|---:|"]
        lines += [f"| {op} | {a} | {b} | {r} |" for op, a, b, r in op_rows(ops)]
    timed = [c for c in summary["changes"] if c.get("latency_ms_before") is not None]
    if timed:
        lines += ["", "Per layer, from the target's GEMM table (GEMM time at the budget's input sizes):", "",
                  "| layer | status | decision | dense ms | as left ms | factoring paid off |", "|---|---|---:|---:|---:|---|"]
        lines += [f"| `{c['name']}` | {c['status']} | {decision_text(c.get('decision'))} | {ms(c['latency_ms_before'])} | "
                  f"{ms(c['latency_ms_after'])} | {_paid(c)} |" for c in timed]
    costly = sorted(_changed(summary["changes"]), key=lambda c: -(c.get("sensitivity") or c["rel_error"]))[:10]
    if costly:
        lines += ["", "## Layers that cost the most", "",
                  "| layer | kind | status | decision | params (bytes if quantized) | rel. error | sensitivity |",
                  "|---|---|---|---:|---:|---:|---:|"]
        lines += [f"| `{c['name']}` | {c['kind']} | {c.get('status', 'replaced')} | {decision_text(c.get('decision'))} | "
                  f"{size_text(c)} | {c['rel_error']:.4f} | {_fmt(c.get('sensitivity'), '.4g')} |" for c in costly]
        if layers_png:
            lines += ["", f"![per-layer error]({layers_png})"]
    left = [c for c in summary["changes"] if c.get("status") in LEFT]
    if left:
        lines += ["", "## Targeted layers left as they were", "", "| layer | status | why |", "|---|---|---|"]
        lines += [f"| `{c['name']}` | {c['status']} | {c.get('note') or '-'} |" for c in left]
    return "\n".join(lines) + "\n"


def write_report(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Write the Markdown report and its plots beside it (each file written whole or not at all)."""
    path = Path(path)
    stem = path.name.removesuffix(".md")
    latency_png, layers_png = f"{stem}_latency.png", f"{stem}_layers.png"
    layers = _plot_layers(summary["changes"])
    for name, data in ((latency_png, _plot_latency(summary)), (layers_png, layers)):
        if data is not None:
            with replace_output(path.parent / name, REPORT) as tmp:
                tmp.write_bytes(data)
    with replace_output(path, REPORT) as tmp:
        tmp.write_text(render(summary, latency_png, layers_png if layers else None))
    return path
