"""compress -> export -> profile: the glue between compress/, export/ and runtime/ (and `edgeslim run`).

The recipe a run follows is edgeslim/recipe.py; the measuring (sizes, latency rows, op times) edgeslim/profiling.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from edgeslim import artifact
from edgeslim.compress.base import CompressContext, CompressResult, get_compressor
from edgeslim.data import load_calibration, missing_calibration_message
from edgeslim.core.errors import ConfigError, SourceError
from edgeslim.core.files import ARTIFACT, ONNX, REPORT, check_not_input, check_output, replace_output, safe_stem
from edgeslim.profiling import OP_ITERS, flops, has_op_profile, op_times_at, profile_file
from edgeslim.recipe import Recipe, split_step
from edgeslim.sources import LoadedModel, load_model
from edgeslim.core.specs import example_feeds
from edgeslim.loaders import check_inputs
from edgeslim.step_checks import step_warnings
from edgeslim.trust import Trust
from edgeslim.defaults import DEFAULT_OUT, DEFAULT_PROFILE



STAGE_LINE_S = 2.0  # off a terminal, a stage that runs longer than this says so when it passes this mark


@contextlib.contextmanager
def stage(message: str, quiet: bool = False) -> Iterator[None]:
    """Show a spinner with the elapsed time while a long stage runs (stderr; off a terminal, a line when it
    starts), then a done line. Written to the stderr of the stage's start: a library call inside that
    swaps sys.stderr to hide its own noise (core/onnx_io._quiet_torch) does not hide the stage."""
    if quiet:
        yield
        return
    from rich.console import Console
    from rich.markup import escape
    console = Console(file=sys.stderr) if sys.stderr is not None else Console(stderr=True)
    message = escape(message)  # a user's path such as "runs/[a]" is text, not markup
    start = time.perf_counter()
    if console.is_terminal:
        with console.status(f"{message} ..."):
            yield
    else:  # a log gets a line only for a stage still running after STAGE_LINE_S (a quick refusal stays one line)
        timer = threading.Timer(STAGE_LINE_S, lambda: console.print(f"{message} ..."))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
    console.print(f"[green]done[/] {message} ({time.perf_counter() - start:.1f} s)")


def compress_context(loaded: LoadedModel, profile: str | None, gemm_table: str | None = None,
                     latency_batch: int = 8) -> CompressContext:
    """What a compressor gets to know beyond the model: its input spec, the target's alignment (a local CPU
    target's follows this CPU's SIMD width) and the target's latencies (edgeslim/latency.py): timed here for a
    local CPU target, on the board for a profile with an address, read from `gemm_table` (measured on the
    target) for any other, else none. The target CPU's INT8 features are this CPU's for a local target (or
    none named), unknown for a board."""
    align, measure, local = None, None, True
    if profile:
        from edgeslim.latency import BoardMeasure, LocalMeasure, TableMeasure
        from edgeslim.runtime.peak import is_local, machine_align
        from edgeslim.runtime.targets import load_profile
        prof = load_profile(profile)
        align = machine_align(prof)
        measure = TableMeasure(gemm_table) if gemm_table else BoardMeasure(profile) if prof.address else \
            LocalMeasure(profile) if is_local(prof) else None
        local = is_local(prof)
    from edgeslim.runtime.machine import int8_features
    return CompressContext(inputs=tuple(loaded.inputs), align=align, profile=profile, measure=measure,
                           dims={**loaded.dims, "batch": latency_batch}, task=loaded.task,
                           int8_features=int8_features() if local else None)


def apply_steps(loaded: LoadedModel, steps: Sequence[Mapping[str, Any]], quiet: bool = False,
                profile: str | None = None) -> tuple[LoadedModel, list[CompressResult]]:
    """Run each compression step in order; returns the compressed model and each step's result.

    `profile` is the target the decisions are made for (its `align` applies to steps that set none).
    """
    current, results = loaded, []
    for step in steps:
        section, params = split_step(step)
        comp = get_compressor(section.method)
        final = [s["method"] for s in current.steps if get_compressor(s["method"]).ends_torch_steps]
        if final and not comp.has_onnx_stage:
            raise ConfigError(f"{comp.name} cannot follow the {final[0]} step, which left integer weights: apply "
                              f"{final[0]} last (only an ONNX-level step such as int8 may follow it)")
        config = comp.make_config(params)
        calib = None
        if section.calib:
            calib = load_calibration(section.calib, current, batch_size=section.calib_batch)
            if comp.distils and calib.targets is None:  # e.g. heal an embedding model toward the original
                from edgeslim.compress.train import teacher_targets
                calib = teacher_targets(loaded.model, calib)
        elif comp.needs_calibration:
            raise ConfigError(missing_calibration_message(comp.name, current))
        with stage(f"{comp.name} on {loaded.source.identifier}", quiet):
            context = compress_context(current, profile, section.gemm_table, section.latency_batch)
            result = comp.compress(current.model, config, calib, context=context)
        result.resolved.setdefault("calib", calib.name if calib else None)
        check_inputs(result.model.eval(), current.inputs, current.dims, f"the model after the {comp.name} step",
                     f"it ran before: the {comp.name} transform broke it, not the input spec; exclude the layers "
                     "it names or use another method")
        for text in step_warnings(result, current.model):
            warnings.warn(text, stacklevel=2)
        results.append(result)
        current = dataclasses.replace(current, model=result.model.eval(),
                                      steps=current.steps + [result.step_record()])
    return current, results


def compress_to_artifact(source: str, steps: Sequence[Mapping[str, Any]], out: str | Path,
                         weights: str | None = None, inputs: str | None = None, quiet: bool = False,
                         profile: str | None = DEFAULT_PROFILE, trust: Trust | None = None, task: str | None = None
                         ) -> tuple[LoadedModel, LoadedModel, list[CompressResult], Path]:
    """Load `source` (a Hugging Face folder for `task`), apply `steps` for target `profile`, save the
    `.slim` artifact.

    Returns (original, compressed, results, path). The artifact records every step from the original
    source (an artifact source's own steps first), so it loads, exports and compresses again. `out`
    is checked before any work: never the input, never something edgeslim did not write.
    """
    check_not_input(out, source)
    check_output(out, ARTIFACT)
    with stage(f"load {source}", quiet):
        original = load_model(source, weights=weights, inputs=inputs, task=task, trust=trust)
    compressed, results = apply_steps(original, steps, quiet, profile)
    report = {"steps": [r.step_record() for r in results],
              "params": {"model_before": count(original.model), "model_after": count(compressed.model)}}
    path = artifact.save(out, compressed.model, original.source, compressed.steps, compressed.inputs, report,
                         compressed.task, compressed.dims, source_files=original.files)
    return original, compressed, results, Path(path)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compare_outputs(original: LoadedModel, compressed: torch.nn.Module, data: str | None,
                    seed: int = 0) -> dict[str, float]:
    """Max output difference (and for embeddings the cosine similarity, for classifiers top-1 agreement, for
    causal LMs the agreement of the next-token argmax at every position) on `data` (drawn with `seed`)."""
    if data:
        batches = [b for _, b, _ in load_calibration(data, original, batch_size=16, seed=seed)]
    else:
        feeds = example_feeds(original.inputs, original.dims, seed=3)
        batches = [{k: torch.from_numpy(v) for k, v in feeds.items()}]
    with torch.inference_mode():
        outs = [(original.model(**b), compressed(**b)) for b in batches]
    a = torch.cat([x.flatten(1) for x, _ in outs]).double()
    b = torch.cat([y.flatten(1) for _, y in outs]).double()
    out = {"max_abs_diff": float((a - b).abs().max()), "samples": int(a.shape[0])}
    if original.task == "causal-lm":
        same = torch.cat([(x.argmax(-1) == y.argmax(-1)).flatten() for x, y in outs]).double()
        out["next_token_agreement"] = float(same.mean())
    if original.task == "feature-extraction":
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
        out |= {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    if original.task in ("sequence-classification", "image-classification"):
        out["top1_agreement"] = float((a.argmax(1) == b.argmax(1)).double().mean())
    return out


def export_paths(path: str | Path, to: str) -> tuple[Path, Path | None]:
    """(ONNX file, engine file or None) that exporting to `path` writes: for ONNX `path` itself; for
    TensorRT the engine at `path` and its ONNX beside it."""
    path = Path(path)
    if to != "tensorrt":
        return path, None
    engine = path if path.suffix in (".engine", ".plan") else path.with_name(path.name + ".engine")
    return engine.with_suffix(".onnx"), engine


def check_export_paths(path: str | Path, to: str) -> None:
    """Refuse (exit 2, before any work) an export destination that is not edgeslim's own kind of file."""
    from edgeslim.core.files import ENGINE
    onnx_path, engine = export_paths(path, to)
    check_output(onnx_path, ONNX)
    if engine is not None:
        check_output(engine, ENGINE)


def export_model(loaded: LoadedModel, to: str, path: str | Path, profile: str | None = None,
                 opset: int = 20, quiet: bool = False, precision: str | None = None,
                 data: str | None = None) -> dict[str, Any]:
    """Export to ONNX (validated), run the steps' ONNX stages (INT8), convert to fp16 when asked, and
    for `to="tensorrt"` build an engine from it for `profile` (the files written: `export_paths`).

    A lossy file (after an ONNX stage or fp16) is compared with PyTorch by agreement metrics
    (`info["agreement"]`) instead of allclose; fp16 must stay within export.fp16.FP16_REL_L2.

    Args:
        precision: "fp16" converts the exported graph; None takes the profile's precision when it
            is fp16 and the runtime is ONNX Runtime, else leaves the graph in fp32.
        data: inputs for the agreement metrics (NAME[:COUNT] or a file, as for calibration; first
            batch used); default random inputs from the input spec, which may lie outside the
            ranges an INT8 model was calibrated for.
    """
    from edgeslim.export.onnx import to_onnx

    onnx_path, engine = export_paths(path, to)
    check_export_paths(path, to)
    with stage(f"export {onnx_path.stem} to ONNX (validated in ONNX Runtime)", quiet):
        res = to_onnx(loaded.model, loaded.inputs, onnx_path, opset=opset)
    try:
        return _finish_export(loaded, to, engine, onnx_path, res, profile, quiet, precision, data)
    except BaseException:
        onnx_path.unlink(missing_ok=True)  # no fp32 file left where a failed INT8/fp16 one was asked for
        raise


def export_cache(loaded: LoadedModel, path: str | Path, quiet: bool = False, opset: int = 20,
                 accuracy_level: int = 0, layout: str = "optimum", fallback: str = "optimum",
                 drift_fallback: bool = False) -> dict[str, Any]:
    """A causal LM's key/value-cache ONNX graph (export/kv_cache.py), validated, with its tokenizer, chat
    template and end-of-sequence ids in the file's metadata for a torch-free runner.

    A wq model's weights stay integers in the file (MatMulNBits, export/nbits.py), checked against the
    fake-quantized fp32 model; `accuracy_level` 4 lets ORT compute with int8 activations. `layout` "buffer"
    returns the new positions' keys/values only, for a runner that writes them in place (export/kv_buffer.py);
    "shared" attends with GroupQueryAttention, which writes present.* into a past buffer bound to it (export/gqa.py);
    a model it does not cover gets `fallback`'s. `drift_fallback`: int8 activations drifting past their bound leave
    the file at level 0 with a warning (export/kv_cache.py `to_onnx_cache`) instead of failing.

    Raises:
        ConfigError: not a causal LM, or a model with ONNX-level steps (INT8), which the cache graph does not run.
    """
    from edgeslim.export.kv_cache import to_onnx_cache
    from edgeslim.generation import lm_meta
    from edgeslim.tasks import hf_config, max_positions

    if loaded.task != "causal-lm":
        raise ConfigError(f"a key/value cache graph is for causal LMs; {loaded.source.identifier} is a {loaded.task} "
                          "model (load a Hugging Face folder with --task causal-lm)")
    staged = [s["method"] for s in loaded.steps if get_compressor(s["method"]).has_onnx_stage]
    if staged:
        raise ConfigError(f"the key/value cache graph does not run ONNX-level steps ({', '.join(staged)}): export "
                          "the model before them, or use -m wq for weight-only quantization")
    check_output(path, ONNX)
    config = hf_config(loaded.model)
    model, quantized = loaded.model, []
    if any(s["method"] == "wq" for s in loaded.steps):  # integers in the file (MatMulNBits), checked against
        from edgeslim.compress.weight_quant import dequantized  # the fake-quantized fp32 model they define
        from edgeslim.export.nbits import QuantizedMatrix
        record = next(s.get("resolved") for s in loaded.steps if s["method"] == "wq")
        model, ints = dequantized(loaded.model, record)
        quantized = [QuantizedMatrix(name, model.get_parameter(name).detach().numpy(), w.q.numpy(), w.scale.numpy(),
                                     w.zero.numpy(), w.bits, *((None,) * 3 if w.offset is None else
                                                               (w.offset.numpy(), w.offset_q.numpy(), w.offset_scale.numpy())))
                     for name, w in ints.items()]
    with stage(f"export {Path(path).stem} with its key/value cache (validated in ONNX Runtime)", quiet):
        res = to_onnx_cache(model, path, positions=max_positions(config) if config is not None else None,
                            meta=lm_meta(loaded), opset=opset, quantized=quantized,
                            accuracy_level=accuracy_level, layout=layout, fallback=fallback,
                            drift_fallback=drift_fallback)
    return {"onnx": str(res.path), "onnx_bytes": res.file_bytes, "layers": res.layers, "kv_heads": res.kv_heads,
            "head_dims": res.head_dims, "position_ids": res.position_ids, "cache_layout": res.layout,
            "max_abs_diff": {f"logits@past{k}": v for k, v in res.max_abs_diff.items()},
            "greedy_prompts_equal": res.greedy_equal, "export_notes": res.notes,
            "matmul_nbits": res.lowering.matmuls if res.lowering else 0}


def _finish_export(loaded: LoadedModel, to: str, engine: Path | None, onnx_path: Path, res: Any, profile: str | None,
                   quiet: bool, precision: str | None, data: str | None) -> dict[str, Any]:
    """export_model after the validated fp32 file is written: ONNX stages, fp16, agreement, engine."""
    from edgeslim.export.validate import agreement
    from edgeslim.core.onnx_io import dims_for

    stages = apply_onnx_stages(loaded, onnx_path, profile, quiet)
    if precision is None and profile:
        from edgeslim.runtime.targets import load_profile
        prof = load_profile(profile)
        precision = prof.precision if prof.runtime == "onnxruntime" and prof.precision == "fp16" else None
    if precision not in (None, "fp32", "fp16", "int8"):
        raise ConfigError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    if precision == "int8" and not stages:
        raise ConfigError(f"{loaded.source.identifier} has no INT8 step: compress it with -m int8 first")
    if precision == "fp16":
        from edgeslim.export.fp16 import to_fp16
        with stage(f"convert {onnx_path.name} to fp16", quiet), replace_output(onnx_path, ONNX) as tmp:
            to_fp16(onnx_path, tmp)
    kinds = {get_compressor(s["method"]).kind for s in loaded.steps if get_compressor(s["method"]).has_onnx_stage}
    info = {"onnx": str(onnx_path), "onnx_bytes": onnx_path.stat().st_size, "max_abs_diff": res.max_abs_diff,
            "export_notes": res.notes + [s["resolved"]["onnx_note"] for s in loaded.steps  # a step's word on export
                                         if "onnx_note" in s.get("resolved", {})],
            "onnx_stages": stages, "precision": "int8" if "quantized" in kinds else precision or "fp32"}
    if stages or precision == "fp16":
        if data:
            feeds = {k: v.numpy() for k, v in load_calibration(data, loaded, batch_size=16).batches[0].items()}
        else:
            feeds = example_feeds(loaded.inputs, dims_for(loaded.inputs, {**loaded.dims, "batch": 2}), seed=1)
        info["agreement"] = agreement(onnx_path, loaded.model, feeds) | {"data": data or "random"}
        if precision == "fp16" and not stages:
            from edgeslim.export.fp16 import check_fp16
            check_fp16(info["agreement"], onnx_path)
    record_dims(onnx_path, loaded)
    if to == "tensorrt":
        from edgeslim.export.tensorrt import to_tensorrt
        from edgeslim.runtime.targets import load_profile
        with stage(f"build TensorRT engine {engine.name}", quiet):
            to_tensorrt(onnx_path, load_profile(profile or "cuda-trt-fp16"), engine, dims=loaded.dims)
        info["engine"] = str(engine)
    return info


DIMS_KEY = "edgeslim.dims"  # ONNX metadata: the sizes of the named input dims the model runs at (its own, not 128)
MAX_RECORDED_DIM = 1 << 16  # a recorded size above this is not a model's own (a file from elsewhere): ignored


def record_dims(path: Path, loaded: LoadedModel) -> None:
    """Write the model's sizes of its named input dims (a sequence within its positions) into the ONNX file,
    so `profile X.onnx` feeds what the model takes; weights stored beside the file are left as they are."""
    import json

    import onnx
    from edgeslim.core.specs import dynamic_dims
    from edgeslim.export.onnx import read_onnx_header
    dims = {k: int(v) for k, v in loaded.dims.items() if k != "batch" and k in dynamic_dims(loaded.inputs)}
    if not dims:
        return
    model = read_onnx_header(path)
    kept = [m for m in model.metadata_props if m.key != DIMS_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=DIMS_KEY, value=json.dumps(dims))
    onnx.save(model, str(path))


def recorded_dims(model) -> dict[str, int]:
    """The sizes `record_dims` wrote into an ONNX file (a path, or the model `read_onnx_header` read); {} for a
    file from elsewhere. A size above MAX_RECORDED_DIM is not ours (ours are a model's own sizes) and is left out."""
    import json

    from edgeslim.export.onnx import read_onnx_header
    proto = read_onnx_header(model) if isinstance(model, (str, Path)) else model
    meta = {m.key: m.value for m in proto.metadata_props}
    try:
        dims = json.loads(meta.get(DIMS_KEY, "{}"))
    except ValueError:
        return {}
    return {str(k): v for k, v in dims.items() if isinstance(v, int) and 0 < v <= MAX_RECORDED_DIM} \
        if isinstance(dims, dict) else {}


def export_bundle(loaded: LoadedModel, to: str, folder: str | Path, profile: str | None = None, quiet: bool = False,
                  precision: str | None = None, data: str | None = None) -> dict[str, Any]:
    """`export_model` into a deployable folder (export/bundle.py): the model file(s), the source's
    tokenizer / preprocessor / config files, and bundle.json (input spec, outputs, task, precision,
    preprocessing constants, labels, provenance, SHA-256 of every file). Written whole or not at all."""
    from edgeslim import __version__
    from edgeslim.export.bundle import labels_from_config, write_bundle
    from edgeslim.core.files import BUNDLE
    from edgeslim.zoo import preprocessing

    folder = Path(folder)
    check_output(folder, BUNDLE)
    with replace_output(folder, BUNDLE) as tmp:
        info = export_model(loaded, to, tmp / ("model.engine" if to == "tensorrt" else "model.onnx"), profile,
                            quiet=quiet, precision=precision, data=data)
        files = dict(loaded.files)
        tokenizer = getattr(loaded.encode, "tokenizer", None)
        if tokenizer is not None and not any(n.startswith("tokenizer") or n.startswith("vocab") for n in files):
            tokenizer.save_pretrained(str(tmp))  # e.g. a zoo encoder: its tokenizer files
        meta = {"edgeslim_version": __version__, "task": loaded.task,
                "model": Path(info.get("engine") or info["onnx"]).name, "onnx": Path(info["onnx"]).name,
                "inputs": [s.to_dict() for s in loaded.inputs], "outputs": ["output"], "default_dims": loaded.dims,
                "precision": info["precision"], "onnx_stages": info["onnx_stages"],
                "preprocess": preprocessing(loaded.source.identifier) if loaded.source.kind == "zoo" else None,
                "labels": labels_from_config(files),
                "source": loaded.source.to_dict(), "steps": [s["method"] for s in loaded.steps],
                "validation": {"max_abs_diff": info["max_abs_diff"], "agreement": info.get("agreement")}}
        manifest = write_bundle(tmp, meta, files)
    return info | {"bundle": str(folder), "files": sorted(manifest["files"])}


def has_onnx_stage(loaded: LoadedModel) -> bool:
    """Whether a step of `loaded` (e.g. int8) lives in the exported graph rather than in the torch model."""
    return any(get_compressor(s["method"]).has_onnx_stage for s in loaded.steps)


def runnable(loaded: LoadedModel, quiet: bool = True, onnx: bool = False, folder: Path | None = None) -> torch.nn.Module:
    """The module that computes what `loaded` deploys: its torch model, or, when a step lives in the
    ONNX graph (INT8) or `onnx` is asked for (ONNX Runtime is the faster CPU engine), its exported
    graph run in ONNX Runtime behind an nn.Module (which keeps the model's receptive `halo`, if any).
    When `loaded` came from artifact `folder`, its export is the cached one (`cached_export`, made once)."""
    if not (onnx or has_onnx_stage(loaded)):
        return loaded.model
    from edgeslim.runtime.session import OrtModule
    if folder is not None and (folder / artifact.MANIFEST).is_file():
        from edgeslim.runtime.targets import load_profile
        module = OrtModule(cached_export(folder, loaded, load_profile(DEFAULT_PROFILE), quiet))
    else:
        with tempfile.TemporaryDirectory(prefix="edgeslim-run-") as tmp:  # ORT holds the graph once loaded
            info = export_model(loaded, "onnx", Path(tmp) / "model.onnx", quiet=quiet)
            module = OrtModule(info["onnx"])
    if hasattr(loaded.model, "halo"):
        module.halo = loaded.model.halo
    return module


def apply_onnx_stages(loaded: LoadedModel, onnx_path: Path, profile: str | None = None,
                      quiet: bool = False) -> list[str]:
    """Run the ONNX-level stage of every step whose compressor has one (e.g. INT8 on the graph), in
    step order, on the exported file; each stage replaces the file whole. Returns the methods run."""
    ran = []
    for step in loaded.steps:
        comp = get_compressor(step["method"])
        if not comp.has_onnx_stage:
            continue
        with stage(f"{comp.name} on the ONNX graph {onnx_path.name}", quiet), replace_output(onnx_path, ONNX) as tmp:
            comp.onnx_stage(step.get("resolved", {}), onnx_path, tmp, compress_context(loaded, profile))
        ran.append(comp.name)
    return ran


def run(recipe: Recipe, out_dir: str | Path = DEFAULT_OUT, quiet: bool = False) -> dict[str, Any]:
    """The whole pipeline for a recipe; writes the artifact, ONNX files and report under `out_dir`.

    On an onnxruntime CPU profile the summary also holds `op_breakdown`: ORT's kernel time by op type
    of the original and the compressed ONNX file at the largest batch, side by side, and the op types
    whose time did not shrink (runtime/op_profile.py `op_comparison`).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output folder {out_dir} is a file; name a folder with -o")
    suffix = ".engine" if recipe.export_to == "tensorrt" else ".onnx"
    for name in (recipe.name, f"{recipe.name}-original"):
        check_export_paths(out_dir / f"{name}{suffix}", recipe.export_to)
    for name in (f"{recipe.name}.report.md", f"{recipe.name}.report_latency.png", f"{recipe.name}.report_layers.png"):
        check_output(out_dir / name, REPORT)
    from edgeslim.runtime.targets import load_profile
    prof = load_profile(recipe.profile)
    op_batch = max(recipe.batches or prof.batch)  # where the op types are compared
    original, compressed, results, slim = compress_to_artifact(
        recipe.source, recipe.steps, out_dir / f"{recipe.name}.slim", recipe.weights, recipe.inputs, quiet,
        recipe.profile, recipe.trust)
    summary: dict[str, Any] = {"recipe": dataclasses.asdict(recipe), "artifact": str(slim),
                               "changes": [c.to_dict() for r in results for c in r.changes],
                               "compare": compare_outputs(original, runnable(compressed), recipe.eval),
                               "models": {}}
    for label, loaded in (("original", original), ("compressed", compressed)):
        row: dict[str, Any] = {"params": count(loaded.model), "flops": flops(loaded, recipe.dims)}
        if recipe.export_to:
            stem = recipe.name if label == "compressed" else f"{recipe.name}-original"
            row |= export_model(loaded, recipe.export_to, out_dir / f"{stem}{suffix}", recipe.profile, recipe.opset,
                                quiet)
        if recipe.profile:
            target = loaded.model if prof.runtime == "torch" else row.get("engine") or row.get("onnx") or loaded.model
            with stage(f"profile {label} on {recipe.profile}", quiet):
                row["timings"] = profile_file(target, loaded, recipe.profile, recipe.batches, recipe.dims,
                                              recipe.warmup, recipe.iters)
            crashed = [t for t in row["timings"] if "crashed" in t]
            if crashed:
                from edgeslim.core.errors import InferenceCrashError
                raise InferenceCrashError(f"{label} model, batch {crashed[0]['batch']}: {crashed[0]['crashed']}")
            if has_op_profile(prof) and "onnx" in row:
                with stage(f"kernel time by op type of {label}", quiet):
                    row["op_time_ms"] = op_times_at(row["onnx"], loaded, recipe.profile, recipe.dims, op_batch)
        summary["models"][label] = row
    if all("op_time_ms" in m for m in summary["models"].values()):
        from edgeslim.runtime.op_profile import op_comparison
        models = summary["models"]
        summary["op_breakdown"] = {"batch": op_batch, "iters": OP_ITERS} | op_comparison(
            models["original"]["op_time_ms"], models["compressed"]["op_time_ms"])
    from edgeslim.report import write_report
    summary["report"] = str(write_report(summary, out_dir / f"{recipe.name}.report.md"))
    return summary


@contextlib.contextmanager
def profile_target(item: str | Path, profile: str, quiet: bool = False, trust: Trust | None = None,
                   source: Mapping[str, Any] | None = None) -> Iterator[tuple[Any, LoadedModel]]:
    """What to open for `edgeslim profile ITEM`: a model file as is, or an artifact/source loaded by replay
    and, when the profile's runtime needs a file, exported to a temporary folder that is removed when the
    block ends (profiling writes nothing the user did not ask for). Yields (module or file path, loaded model).

    `source` holds the source options (`weights`, `inputs`, `task` of `load_model`); a model file takes none.
    """
    given = {k: v for k, v in (source or {}).items() if v is not None}

    from edgeslim.export.onnx import onnx_inputs, read_onnx_header
    from edgeslim.runtime.targets import load_profile

    prof = load_profile(profile)
    path = Path(item)
    if path.suffix in (".onnx", ".engine", ".plan") and given:
        raise ConfigError(f"{', '.join('--' + ('input' if k == 'inputs' else k) for k in given)} describe a model "
                          f"SOURCE; {path.name} is a model file, which carries its own inputs")
    if path.suffix in (".onnx", ".engine", ".plan") and path.is_file():
        header = read_onnx_header(path) if path.suffix == ".onnx" else None
        specs = onnx_inputs(header) if header is not None else []
        named = {d for s in specs for d in s.shape if isinstance(d, str)}
        dims = {**({"sequence": 128} if "sequence" in named else {}),
                **{k: v for k, v in (recorded_dims(header) if header is not None else {}).items() if k in named}}
        loaded = LoadedModel(torch.nn.Identity(), artifact.SourceSpec("file", str(path)), specs, "generic", dims)
        yield path, loaded
        return
    if path.suffix in (".onnx", ".engine", ".plan"):
        raise SourceError(f"model file not found: {path}")
    loaded = load_model(item, trust=trust, **given)
    if prof.runtime == "torch":
        if has_onnx_stage(loaded):
            raise ConfigError(f"{item} is quantized in its ONNX graph, which runtime 'torch' cannot run: "
                              "profile it on an onnxruntime profile (e.g. cpu-ort-int8)")
        yield loaded.model, loaded
        return
    to = "tensorrt" if prof.runtime == "tensorrt" and not prof.remote else "onnx"  # a board: predicted from ONNX
    if to == "onnx" and (path / artifact.MANIFEST).is_file():  # an artifact: exported once, kept by its hash
        yield cached_export(path, loaded, prof, quiet), loaded
        return
    with tempfile.TemporaryDirectory(prefix="edgeslim-profile-") as tmp:
        out = Path(tmp) / f"{safe_stem(path.name.removesuffix('.slim'))}.{'engine' if to == 'tensorrt' else 'onnx'}"
        info = export_model(loaded, to, out, profile, quiet=quiet)
        yield info.get("engine") or info["onnx"], loaded


EXPORTS_KEPT = 16  # artifact exports kept in the cache (the least recently profiled go first)


def cached_export(folder: Path, loaded: LoadedModel, prof: Any, quiet: bool = False) -> Path:
    """The ONNX export of artifact `folder` for profile `prof`, made once and kept in edgeslim's cache under the
    SHA-256 of the artifact's manifest (which holds the hash of every file), the profile and edgeslim's
    version: profiling an INT8 artifact again quantizes nothing again."""
    import hashlib
    import json

    from edgeslim import __version__, cache

    key = hashlib.sha256((folder / artifact.MANIFEST).read_bytes() + json.dumps(
        [prof.name, prof.to_dict(), __version__], sort_keys=True, default=str).encode()).hexdigest()[:24]
    built = cache.entry(f"export-{key}", lambda tmp: export_model(loaded, "onnx", tmp / "model.onnx", prof.name,
                                                                 quiet=quiet), kind=cache.EXPORT)
    built.touch()  # most recently used: the oldest exports beyond EXPORTS_KEPT go
    cache.keep_newest("export-", EXPORTS_KEPT)
    return built / "model.onnx"
