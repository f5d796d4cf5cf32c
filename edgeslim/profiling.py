"""Profiling a model on a target (for `run`, `profile` and `profile A B`): a size for every dynamic dim,
the work of one call, latency / memory / roofline rows per batch (measured here, or predicted for a
board) and ONNX Runtime's kernel time by op type."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from edgeslim.core.errors import ConfigError
from edgeslim.loaded import LoadedModel
from edgeslim.core.specs import example_feeds

OP_ITERS = 3  # profiled runs per model of `run`'s op-type comparison (kept small: the demo must stay fast)


def resolve_sizes(loaded: LoadedModel, given: Mapping[str, int], batch: int) -> tuple[dict[str, int], dict[str, str]]:
    """A size for every dynamic input dim, and where each came from ("batch", "--dim", "model": the
    artifact's input spec or the model's config, "default": sequence=128 of a bare ONNX file).

    Raises:
        ConfigError: a dim has no size (the message names it and --dim), or a fixed-batch model is
            asked for another batch.
    """
    from edgeslim.core.specs import dynamic_dims

    fixed = {s.shape[0] for s in loaded.inputs if s.shape and isinstance(s.shape[0], int)}
    if fixed and batch not in fixed:
        raise ConfigError(f"the model's inputs have a fixed batch {sorted(fixed)}, but batch {batch} was asked: "
                          f"export it with a dynamic batch or profile --batch {min(fixed)}")
    sizes, where = {"batch": batch}, {"batch": "batch"}
    bare_file = loaded.source.kind == "file"  # a bare model file has no config: its sizes are defaults
    for name in dynamic_dims(loaded.inputs):
        if name == "batch":
            continue
        if name in given:
            sizes[name], where[name] = int(given[name]), "--dim"
        elif name in loaded.dims:
            sizes[name], where[name] = int(loaded.dims[name]), "default" if bare_file else "model"
        else:
            raise ConfigError(f"dynamic dim '{name}' has no size: give it with --dim {name}=SIZE")
    extra = {k: int(v) for k, v in given.items() if k not in sizes}
    return {**sizes, **extra}, where


def work_of(model: Any, loaded: LoadedModel, feeds: Mapping[str, np.ndarray], sizes: Mapping[str, int],
          precision: str) -> tuple[int, int] | None:
    """(FLOPs, bytes moved) of one call: from the ONNX graph for a file, from the module otherwise."""
    from edgeslim.runtime.roofline import count_flops, min_bytes_moved

    if isinstance(model, (str, Path)) and Path(model).suffix == ".onnx":
        from edgeslim.runtime.onnx_work import graph_work

        work = graph_work(model, sizes)
        return work.flops, work.bytes_moved
    if isinstance(loaded.model, torch.nn.Identity):
        return None  # a TensorRT engine file: no graph to count
    return count_flops(loaded.model, feeds), min_bytes_moved(loaded.model, feeds, precision)


def predict_rows(model: Any, loaded: LoadedModel, prof: Any, plan: Sequence[tuple[int, dict, dict]]
                 ) -> list[dict[str, Any]]:
    """Rows for a board that is not the machine at hand: the roofline latency from the board's published
    limits, labelled predicted (a lower bound: real kernels run below the roofline), and a RAM check
    (weights + inputs + outputs against the board's `ram_gb`)."""
    from edgeslim.runtime.peak import measured_peak
    from edgeslim.runtime.roofline import roofline_ms

    rows = []
    for b, sizes, where in plan:
        feeds = example_feeds(loaded.inputs, {**loaded.dims, **sizes}, seed=0)
        work = work_of(model, loaded, feeds, sizes, prof.precision)
        if work is None:
            raise ConfigError(f"cannot predict latency on '{prof.name}' for {model}: no graph to count the work of "
                              "(give the ONNX file or the model)")
        row: dict[str, Any] = {"batch": b, "sizes": sizes, "size_sources": where, "predicted": True,
                               "flops": work[0], "bytes_moved": work[1], "p50_ms": roofline_ms(*work, prof),
                               "peak": measured_peak(prof).to_dict()}
        row["roofline_ms"], row["roofline_fraction"] = row["p50_ms"], 1.0
        if prof.ram_gb is not None:
            row["fits_ram"] = work[1] <= prof.ram_gb * 1e9
        rows.append(row)
    return rows


def int8_bound_warning(onnx_path: str | Path, features: Sequence[str]) -> str | None:
    """The one warning for an INT8 model on a local CPU without a VNNI/AMX dot product (None where it has
    one): the bound of u8 x s8 through vpmaddubsw and the compute ops ORT keeps in fp32."""
    from edgeslim.runtime.op_profile import fp32_compute_ops
    from edgeslim.runtime.peak import VNNI_FLAGS

    if any(f in VNNI_FLAGS for f in features):
        return None

    kept = fp32_compute_ops(onnx_path)
    listed = "; ".join(f"{name} ({why})" for name, why in list(kept.items())[:8])
    more = f" and {len(kept) - 8} more" if len(kept) > 8 else ""
    return (f"this CPU has no VNNI/AMX INT8 dot product ({', '.join(features) or 'no INT8 features'}): INT8 GEMMs run "
            f"at most about 2x fp32 here (u8 x s8 through vpmaddubsw), not VNNI's 4x; ops that stay fp32: "
            f"{len(kept)}" + (f": {listed}{more}" if kept else ""))


def profile_file(model: str | Path | torch.nn.Module, loaded: LoadedModel, profile: str, batches: Sequence[int] | None,
                 dims: Mapping[str, int], warmup: int = 5, iters: int = 30, roofline: bool = True,
                 ops: bool = False, child_memory: bool = True) -> list[dict[str, Any]]:
    """Latency/throughput/memory of a model file (or module) per batch size on a profile.

    With `child_memory` (a model file on a local target), each batch's memory is first measured in a
    fresh child process (runtime/child.py): `memory` (baseline, loaded, peak resident bytes, arena
    settings) and `peak_rss_bytes`, what the inference holds. A child that dies makes that batch a
    `crashed` row (with how it died; warned) and profiling goes on with the next batch, without
    running the model that crashed in this process; when every batch crashed, InferenceCrashError (exit 6).

    With `ops` (an .onnx file on a CPU onnxruntime profile), each row also holds `op_time_ms` and
    `op_time_share`: ORT's kernel time per op type, in ms per run and as fractions of the whole
    (runtime/op_profile.py), from separate profiled runs.

    With `roofline`, each row also holds the FLOPs and minimum bytes moved at that batch (counted
    from the ONNX graph for an .onnx file, from `loaded.model` otherwise), the target's roofline
    latency with the limits of `measured_peak` (measured on this machine for a local CPU target,
    published for a board) and the fraction of it the measurement reaches. A fraction over 1 means
    the limits or the work count are wrong: the row says so (`roofline_warning`) and a warning is
    raised. `sizes` / `size_sources` say which size every dynamic dim was given and from where.
    """
    import warnings

    from edgeslim.runtime.measure import measure
    from edgeslim.runtime.peak import measured_peak
    from edgeslim.runtime.roofline import roofline_fraction, roofline_ms
    from edgeslim.runtime.session import open_session
    from edgeslim.runtime.targets import load_profile

    prof = load_profile(profile)
    peak = measured_peak(prof) if roofline else None
    limits = prof.override({"peak_gflops": peak.gflops(prof.precision), "mem_gbps": peak.mem_gbps}) if peak else prof
    plan = [(b, *resolve_sizes(loaded, dims, b)) for b in batches or prof.batch]
    if prof.remote:
        return predict_rows(model, loaded, prof, plan)
    from edgeslim.core.errors import InferenceCrashError
    from edgeslim.runtime import child
    from edgeslim.runtime.machine import measured_here

    from edgeslim.runtime.peak import is_local
    if prof.precision == "int8" and is_local(prof) and isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
        from edgeslim.runtime.machine import int8_features
        text = int8_bound_warning(model, int8_features())
        if text:
            warnings.warn(text, RuntimeWarning, stacklevel=2)
    in_child = child_memory and isinstance(model, (str, Path))
    rows = []
    with open_session(model, prof) as session:
        for b, sizes, where in plan:
            feeds = example_feeds(loaded.inputs, {**loaded.dims, **sizes}, seed=0)
            memory = None
            if in_child:
                try:
                    memory = child.child_memory(model, profile, feeds, warmup=min(warmup, 1), iters=min(iters, 2))
                except InferenceCrashError as exc:
                    rows.append({"batch": b, "sizes": sizes, "size_sources": where, "crashed": str(exc)})
                    warnings.warn(f"batch {b}: {exc}", RuntimeWarning, stacklevel=2)
                    continue
            row = dataclasses.asdict(measure(session, feeds, warmup=warmup, iters=iters)) | measured_here()
            row["sizes"], row["size_sources"] = sizes, where
            if memory is not None:
                row["memory"], row["peak_rss_bytes"] = memory.to_dict(), memory.peak_rss_bytes
            work = work_of(model, loaded, feeds, sizes, prof.precision) if roofline else None
            if work is not None:
                row["flops"], row["bytes_moved"] = work
                row["roofline_ms"] = roofline_ms(*work, limits)
                row["roofline_fraction"] = roofline_fraction(row["p50_ms"], *work, limits)
                row["peak"] = peak.to_dict()
                if row["roofline_fraction"] > 1:
                    row["roofline_warning"] = (f"{row['roofline_fraction']:.0%} of the roofline is impossible: the "
                                               f"limits ({peak.source}) or the work count are wrong")
                    warnings.warn(row["roofline_warning"], RuntimeWarning, stacklevel=2)
            if ops and isinstance(model, (str, Path)) and Path(model).suffix == ".onnx" and prof.device == "cpu":
                from edgeslim.runtime.op_profile import op_fields

                row |= op_fields(model, feeds, iters, prof.threads)
            rows.append(row)
    if rows and all("crashed" in r for r in rows):  # nothing was measured: a failure, not a report
        raise InferenceCrashError(f"every batch crashed ({', '.join(str(r['batch']) for r in rows)}); "
                                  f"batch {rows[0]['batch']}: {rows[0]['crashed']}")
    return rows


def has_op_profile(prof: Any) -> bool:
    """Whether ORT's CPU profiler describes how the target runs a model (an onnxruntime CPU profile here)."""
    return prof.runtime == "onnxruntime" and prof.device == "cpu" and not prof.remote


def op_times_at(onnx_file: str | Path, loaded: LoadedModel, profile: str, dims: Mapping[str, int], batch: int
                ) -> dict[str, float]:
    """ORT kernel time per op type (ms per run, runtime/op_profile.py) of a model file at `batch`, its other
    dynamic dims sized as for profiling; OP_ITERS profiled runs after one warm-up."""
    from edgeslim.runtime.op_profile import op_times
    from edgeslim.runtime.targets import load_profile

    sizes, _ = resolve_sizes(loaded, dims, batch)
    feeds = example_feeds(loaded.inputs, {**loaded.dims, **sizes}, seed=0)
    return op_times(onnx_file, feeds, iters=OP_ITERS, threads=load_profile(profile).threads)


def flops(loaded: LoadedModel, dims: Mapping[str, int]) -> int:
    """FLOPs of one batch-1 forward pass at the given dimension sizes."""
    from edgeslim.runtime.roofline import count_flops
    feeds = example_feeds(loaded.inputs, {**loaded.dims, **dims, "batch": 1}, seed=0)
    return count_flops(loaded.model, {k: torch.from_numpy(v) for k, v in feeds.items()})
