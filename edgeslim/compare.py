"""`edgeslim profile A B C`: candidates timed side by side, round by round, with ratios to the first.

Each candidate (a model file, an artifact or any source) is opened the way a single `profile` opens
it (`pipeline.profile_target`), all sessions stay open, and at each batch size the timed calls
alternate between them (`runtime.measure.interleave`), so drift on a shared machine hits every
candidate alike. Memory is measured per candidate in its own child process (`runtime.child`), the
per-op breakdown (`--ops`) from ONNX Runtime's profiler, the task's metric on the user's data
(`--eval`, `edgeslim.evaluate`) where a candidate has a task. The result is JSON-ready; `write_html`
draws it: latency vs batch, size and latency side by side, kernel time by op type per candidate,
and the metric against latency.
"""
from __future__ import annotations

import base64
import contextlib
import html
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from edgeslim.core.errors import ConfigError, InferenceCrashError
from edgeslim.core.files import REPORT, replace_output
from edgeslim.pipeline import profile_target
from edgeslim.profiling import resolve_sizes, work_of
from edgeslim.report import figure, peak_mem_text, png_bytes, si
from edgeslim.core.specs import example_feeds
from edgeslim.trust import Trust


def _file_bytes(target: Any) -> int | None:
    return Path(target).stat().st_size if isinstance(target, (str, Path)) else None


def _params(loaded: Any) -> int | None:
    count = sum(p.numel() for p in loaded.model.parameters())
    return count or None  # a bare model file has no torch module to count


def compare(items: Sequence[str], profile: str, batches: Sequence[int] | None, dims: Mapping[str, int],
            warmup: int = 5, iters: int = 30, rounds: int = 5, ops: bool = False, trust: Trust | None = None,
            source: Mapping[str, Any] | None = None, quiet: bool = True, eval_data: str | None = None
            ) -> dict[str, Any]:
    """Profile several candidates interleaved on one target; ratios are to the first.

    With `eval_data`, each candidate that has a task also gets `eval` (edgeslim.evaluate on that data,
    its exported file when it is one; an encoder's agreement is with the first candidate), or
    `eval_error` saying why not (a bare model file has no task).

    Returns:
        {"profile", "rounds", "candidates": [{"item", "file_bytes", "params", "rows"}], "ratios": per
        candidate and batch: p50 latency, file size, work and peak RSS over the first's}.

    Raises:
        ConfigError: fewer than two candidates, or a board profile (predicted, not measured: profile
            each candidate on its own), or sizes that do not fit a candidate.
    """
    from edgeslim.runtime import child
    from edgeslim.runtime.machine import measured_here
    from edgeslim.runtime.measure import interleave
    from edgeslim.runtime.op_profile import op_fields
    from edgeslim.runtime.session import open_session
    from edgeslim.runtime.targets import load_profile

    if len(items) < 2:
        raise ConfigError("a comparison needs two or more candidates (the first is the reference)")
    prof = load_profile(profile)
    if prof.remote:
        raise ConfigError(f"'{prof.name}' is a board that is not this machine: its latency is predicted, not "
                          "measured, so there is nothing to interleave; profile each candidate on its own")
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(profile_target(i, profile, quiet, trust, source)) for i in items]
        sessions = [stack.enter_context(open_session(target, prof)) for target, _ in opened]
        candidates = [{"item": str(i), "file_bytes": _file_bytes(t), "params": _params(lo), "rows": []}
                      for i, (t, lo) in zip(items, opened)]
        for b in batches or prof.batch:
            plans = [resolve_sizes(loaded, dims, b) for _, loaded in opened]
            feeds = [example_feeds(loaded.inputs, {**loaded.dims, **sizes}, seed=0)
                     for (_, loaded), (sizes, _) in zip(opened, plans)]
            timings = interleave(sessions, feeds, warmup, iters, rounds, progress=not quiet)
            for cand, (target, loaded), (sizes, where), f, t in zip(candidates, opened, plans, feeds, timings):
                row = t.to_dict() | {"sizes": sizes, "size_sources": where} | measured_here()
                work = work_of(target, loaded, f, sizes, prof.precision)
                if work is not None:
                    row["flops"], row["bytes_moved"] = work
                if isinstance(target, (str, Path)):
                    try:
                        memory = child.child_memory(target, profile, f, warmup=min(warmup, 1), iters=min(iters, 2))
                        row["memory"], row["peak_rss_bytes"] = memory.to_dict(), memory.peak_rss_bytes
                    except InferenceCrashError as exc:  # the timing stands; the memory says why it is missing
                        row["memory_error"] = str(exc)
                        warnings.warn(f"{cand['item']} batch {b}: {exc}", RuntimeWarning, stacklevel=2)
                if ops and str(target).endswith(".onnx") and prof.device == "cpu":
                    row |= op_fields(target, f, iters, prof.threads)
                cand["rows"].append(row)
        if eval_data:
            _evaluate(candidates, opened, eval_data)
    return {"profile": profile, "rounds": rounds, "warmup": warmup, "iters": iters, "candidates": candidates,
            "ratios": ratios(candidates)}


def _evaluate(candidates: Sequence[dict[str, Any]], opened: Sequence[tuple[Any, Any]], data: str) -> None:
    from edgeslim.core.errors import EdgeslimError
    from edgeslim.evaluate import evaluate

    reference = opened[0][1]
    for i, (cand, (target, loaded)) in enumerate(zip(candidates, opened)):
        if i == 0 and loaded.task == "feature-extraction":  # its agreement with itself (1.0) is plotted, not reported
            cand["eval_note"] = "the reference the others' agreement is measured against"
        onnx = target if str(target).endswith(".onnx") and loaded.task != "generic" else None
        try:
            result = evaluate(loaded, data, reference if loaded.task == "feature-extraction" else None, onnx,
                              progress=False)
        except EdgeslimError as exc:  # e.g. a bare ONNX file: no task, no tokenizer
            cand["eval_error"] = " ".join(str(exc).split())
            continue
        cand["eval"] = result.to_dict()


def _over(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b else a / b


def ratios(candidates: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per candidate after the first, per batch: its p50, file size, work and peak RSS over the first's."""
    first = candidates[0]
    out = []
    for cand in candidates[1:]:
        for ref, row in zip(first["rows"], cand["rows"]):
            out.append({"item": cand["item"], "batch": row["batch"],
                        "latency_ratio": _over(row["p50_ms"], ref["p50_ms"]),
                        "file_ratio": _over(cand["file_bytes"], first["file_bytes"]),
                        "flops_ratio": _over(row.get("flops"), ref.get("flops")),
                        "peak_rss_ratio": _over(row.get("peak_rss_bytes"), ref.get("peak_rss_bytes"))})
    return out


def _names(result: Mapping[str, Any]) -> list[str]:
    return [Path(c["item"]).name for c in result["candidates"]]


def _plot_latency(result: Mapping[str, Any]) -> bytes:
    fig = figure(5.5, 3.4)
    ax = fig.subplots()
    for name, cand in zip(_names(result), result["candidates"]):
        rows = cand["rows"]
        ax.errorbar([r["batch"] for r in rows], [r["p50_ms"] for r in rows],
                    yerr=[[0] * len(rows), [r["p90_ms"] - r["p50_ms"] for r in rows]], marker="o", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("p50 latency, ms (bar: p90)")
    ax.set_title(f"latency vs batch on {result['profile']} (interleaved)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return png_bytes(fig)


def _plot_size_latency(result: Mapping[str, Any]) -> bytes:
    fig = figure(7, 3)
    size_ax, lat_ax = fig.subplots(1, 2)
    names = _names(result)
    sizes = [(c["file_bytes"] or 0) / 1e6 for c in result["candidates"]]
    size_ax.bar(names, sizes, color="tab:gray")
    size_ax.set_ylabel("model file, MB")
    batch = result["candidates"][0]["rows"][0]["batch"]
    lat_ax.bar(names, [c["rows"][0]["p50_ms"] for c in result["candidates"]], color="tab:blue")
    lat_ax.set_ylabel(f"p50 latency at batch {batch}, ms")
    for ax in (size_ax, lat_ax):
        ax.tick_params(axis="x", labelrotation=20, labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    return png_bytes(fig)


def _plot_ops(result: Mapping[str, Any], top: int = 8) -> bytes | None:
    """Kernel milliseconds per op type at the first batch asked, side by side: what each candidate spends
    where (a share of each model's own time would hide that the compressed one spends less on everything)."""
    times = [c["rows"][0].get("op_time_ms") for c in result["candidates"]]
    if not all(times):
        return None
    kinds = sorted({k for t in times for k in t}, key=lambda k: -max(t.get(k, 0) for t in times))[:top]
    fig = figure(6.5, 0.35 * len(kinds) + 1.2)
    ax = fig.subplots()
    width = 0.8 / len(times)
    for i, (name, ms) in enumerate(zip(_names(result), times)):
        ax.barh([k + i * width for k in range(len(kinds))], [ms.get(op, 0) for op in kinds], height=width, label=name)
    ax.set_yticks([k + 0.4 - width / 2 for k in range(len(kinds))], kinds, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"ONNX Runtime kernel time per run, ms, batch {result['candidates'][0]['rows'][0]['batch']}")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7)
    return png_bytes(fig)


def _plot_metric(result: Mapping[str, Any]) -> bytes | None:
    known = [(n, c) for n, c in zip(_names(result), result["candidates"]) if "eval" in c]
    if len(known) < 2:
        return None
    fig = figure(5, 3.2)
    ax = fig.subplots()
    for name, cand in known:
        ax.scatter(cand["rows"][0]["p50_ms"], cand["eval"]["value"], s=30)
        ax.annotate(name, (cand["rows"][0]["p50_ms"], cand["eval"]["value"]), fontsize=7)
    ax.set_xlabel(f"p50 latency at batch {known[0][1]['rows'][0]['batch']}, ms")
    ax.set_ylabel(f"{known[0][1]['eval']['metric']} on {known[0][1]['eval']['data']}")
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _row(label: str, cells: Sequence[str]) -> str:
    return f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"


def write_html(result: Mapping[str, Any], path: str | Path) -> Path:
    """One self-contained HTML file (plots embedded): the table of ratios and the plots of `compare`."""
    names = _names(result)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    cands = result["candidates"]
    lines = [_row("file size", [si(c["file_bytes"], "B") for c in cands]),
             _row("parameters", [f"{c['params']:,}" if c["params"] else "-" for c in cands])]
    for i, ref in enumerate(cands[0]["rows"]):
        rows = [c["rows"][i] for c in cands]
        sizes = ", ".join(f"{k}={v}" for k, v in ref.get("sizes", {}).items() if k != "batch")
        lines.append(_row(f"p50, batch {ref['batch']}" + (f" ({sizes})" if sizes else ""),
                          [f"{r['p50_ms']:.3g} ms" + (f" (x{ref['p50_ms'] / r['p50_ms']:.2f} speedup)" if r is not ref
                                                      else " (reference)") + (" unstable" if r["unstable"] else "")
                           for r in rows]))
        lines.append(_row(f"peak memory, batch {ref['batch']}", [peak_mem_text(r) for r in rows]))
    plots = [_img(_plot_latency(result), "latency vs batch"), _img(_plot_size_latency(result), "size and latency")]
    for extra, alt in ((_plot_ops(result), "kernel time by op type"), (_plot_metric(result), "metric vs latency")):
        if extra is not None:
            plots.append(_img(extra, alt))
    if any("eval" in c for c in cands):
        lines.append(_row("metric", ["reference" if "eval_note" in c else f"{c['eval']['metric']} "
                                     f"{c['eval']['value']:.4g}" if "eval" in c else "-" for c in cands]))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>edgeslim comparison on "
            f"{html.escape(result['profile'])}</title></head><body><h1>Comparison on {html.escape(result['profile'])}</h1>"
            f"<p>Timed calls interleaved over {result['rounds']} rounds; ratios are to {html.escape(names[0])}. "
            "Peak memory: resident set of a fresh process running each model.</p>"
            f"<table border='1' cellpadding='4'><tr><th></th>{head}</tr>{''.join(lines)}</table>"
            + "".join(f"<p>{p}</p>" for p in plots) + "</body></html>")
    with replace_output(path, REPORT) as tmp:
        tmp.write_text(page)
    return Path(path)
