"""Causal LMs profiled as users run them: any item as a key/value-cache graph, time to first token and
decode tokens/s measured in a fresh process (runtime/child.py `child_lm`, runtime/lm_timing.py), several
candidates interleaved round by round, and their HTML report."""
from __future__ import annotations

import contextlib
import html
import statistics
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from edgeslim.core.errors import ConfigError, SourceError

DEFAULT_PROMPTS = (128, 512)
DEFAULT_NEW_TOKENS = 128


def is_cache_graph(item: str) -> bool:
    """Whether `item` is an ONNX file with `past_key_values.*` inputs (read without ORT)."""
    if not item.endswith(".onnx") or not Path(item).is_file():
        return False
    import onnx
    try:
        graph = onnx.load(item, load_external_data=False).graph
    except Exception:  # noqa: BLE001  (an unreadable file is reported by whoever opens it)
        return False
    return any(i.name.startswith("past_key_values.") for i in graph.input)


@contextlib.contextmanager
def cache_graph_file(item: str, quiet: bool = False, **source: Any) -> Iterator[Path]:
    """The cache graph of `item`: an .onnx file as it is, else the source or artifact exported (validated,
    in the shared layout, or the buffer layout for a model it does not cover: no file leaves here, and edgeslim's
    runner writes the cache in place either way) into a temporary folder, removed after. A wq model's
    MatMulNBits compute with int8 activations (`export --nbits-accuracy 4`, checked as that export checks it):
    at level 0 ORT dequantizes an 8-bit MatMulNBits whole on every call (SmolLM2's LM head: 0.2-0.5 s a token).
    Where int8 activations drift too far from PyTorch, the export keeps its level-0 file, with a warning."""
    if item.endswith(".onnx"):
        if not Path(item).is_file():
            raise SourceError(f"no such ONNX file: {item}")
        yield Path(item)
        return
    with tempfile.TemporaryDirectory(prefix="edgeslim-lm-") as tmp:
        from edgeslim.pipeline import export_cache
        from edgeslim.sources import load_model
        path, loaded = Path(tmp) / "model.onnx", load_model(item, **source)
        export_cache(loaded, path, quiet=quiet, layout="shared", fallback="buffer", accuracy_level=4,
                     drift_fallback=True)
        yield path


def _median_rows(runs: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of several rounds merged: each figure the median over the rounds (the last round's lists kept)."""
    out = []
    for rows in zip(*runs):
        row = dict(rows[-1])
        for key, value in rows[-1].items():
            if isinstance(value, float):
                row[key] = statistics.median(r[key] for r in rows)
        out.append(row)
    return out


def profile_lms(items: Sequence[str], profile: str, prompts: Sequence[int] = DEFAULT_PROMPTS,
                new_tokens: int = DEFAULT_NEW_TOKENS, batches: Sequence[int] = (1,), rounds: int = 1,
                source: dict[str, Any] | None = None, quiet: bool = True) -> dict[str, Any]:
    """TTFT and decode tokens/s of each candidate (rows per batch and prompt length), its file size and the
    peak resident memory of the process that ran it; with several, the child runs alternate candidate by
    candidate for `rounds` rounds and each figure is the median. Threads: the profile's.

    Raises:
        ConfigError: bad prompt lengths, token counts or rounds, a non-causal model, a remote profile.
    """
    from edgeslim.runtime.child import child_lm
    from edgeslim.runtime.machine import measured_here
    from edgeslim.runtime.targets import load_profile

    if rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {rounds}")
    if any(b < 1 for b in batches):
        raise ConfigError(f"batch sizes must be >= 1, got {list(batches)}")
    prof = load_profile(profile)
    if prof.remote or prof.runtime != "onnxruntime" or prof.device != "cpu":
        raise ConfigError(f"LLM profiling runs the cache graph in ONNX Runtime on this CPU; '{prof.name}' is "
                          f"{prof.runtime} on {prof.device}{' (a board)' if prof.remote else ''}: use cpu-ort-fp32")
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(cache_graph_file(i, quiet, **(source or {}))) for i in items]
        runs: list[list[list[dict]]] = [[] for _ in items]
        memory: list[dict] = [{} for _ in items]
        for _ in range(rounds):
            for k, path in enumerate(files):
                result = child_lm(path, prompts, new_tokens, batches, prof.threads)
                runs[k].append(result["rows"])
                peak = memory[k].get("peak_rss_bytes", 0)
                memory[k] = result["memory"] if result["memory"]["peak_rss_bytes"] >= peak else memory[k]
        candidates = [{"item": str(item), "file_bytes": _file_bytes(path), "memory": mem,
                       "peak_rss_bytes": mem["peak_rss_bytes"], "rows": _median_rows(r)}
                      for item, path, r, mem in zip(items, files, runs, memory)]
    return {"profile": profile, "threads": prof.threads, "rounds": rounds, "prompts": list(prompts),
            "new_tokens": new_tokens, "candidates": candidates, **measured_here()}


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def write_lm_html(result: dict[str, Any], path: str | Path) -> Path:
    """One self-contained HTML file: the LLM columns of every candidate and a plot of decode tokens/s
    against time to first token."""
    import base64
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgeslim.core.files import REPORT, replace_output
    from edgeslim.report import si

    cands = result["candidates"]
    head = "".join(f"<th>{html.escape(c['item'])}</th>" for c in cands)
    lines = [("file size", [si(c["file_bytes"], "B") for c in cands]),
             ("peak memory (fresh process)", [si(c["peak_rss_bytes"], "B") for c in cands])]
    for i, ref in enumerate(cands[0]["rows"]):
        rows = [c["rows"][i] for c in cands]
        at = f"batch {ref['batch']}, prompt {ref['prompt']}"
        lines.append((f"time to first token, {at}", [f"{r['ttft_ms']:.1f} ms" for r in rows]))
        lines.append((f"decode tokens/s, {at}", [f"{r['decode_tokens_per_s']:.1f} "
                                                f"({r['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.2f}x)"
                                                for r in rows]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in cands:
        ax.plot([r["ttft_ms"] for r in c["rows"]], [r["decode_tokens_per_s"] for r in c["rows"]], "o-", label=c["item"])
    ax.set_xlabel("time to first token (ms)")
    ax.set_ylabel("decode tokens/s")
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    table = "".join(f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{html.escape(v)}</td>" for v in cells) + "</tr>"
                    for k, cells in lines)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>edgeslim LLM comparison</title></head><body>"
            f"<h1>Causal LMs on {html.escape(result['profile'])} ({result['threads']} threads)</h1>"
            f"<p>Key/value-cache graphs in ONNX Runtime; {result['new_tokens']} new tokens after each prompt; "
            f"medians over {result['rounds']} round(s), candidates alternating.</p>"
            f"<table border='1' cellpadding='4'><tr><th></th>{head}</tr>{table}</table>"
            f"<p><img alt='tokens/s vs TTFT' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'></p>"
            "</body></html>")
    with replace_output(path, REPORT) as tmp:
        tmp.write_text(page)
    return Path(path)
