"""The raw torch -> ONNX call and ONNX graph helpers shared by export/ and compress/ (a leaf module).

export/onnx.py wraps `export_graph` with validation; compress/quantize.py calls it to calibrate
INT8 on the same graph the pipeline later exports (same exporter, opset and names, so the same
tensor names).
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from edgeslim.core.errors import ExportValidationError
from edgeslim.core.specs import TensorSpec

# Sizes used for named dimensions when none are given: not 0 or 1, which torch.export specializes.
DEFAULT_DIMS = {"batch": 2, "sequence": 16, "height": 24, "width": 20}
# int4_min's offsets are int8 with one scale per this many blocks of a row: compress/block_quant.offset_grid
# writes them so, export/nbits.py feeds them to an 8-bit MatMulNBits of that block size (ORT takes 16..128)
OFFSET_BLOCK = 16
OTHER_DIM = 8


def dims_for(inputs: Sequence[TensorSpec], dims: Mapping[str, int] | None = None) -> dict[str, int]:
    """Sizes of every named dimension of `inputs`: `dims` where given, else DEFAULT_DIMS / OTHER_DIM."""
    full = {d: DEFAULT_DIMS.get(d, OTHER_DIM) for s in inputs for d in s.shape if isinstance(d, str)}
    full.update(dims or {})
    return full


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Keep torch.export's own log lines, graph dumps and warnings off stdout/stderr while it runs."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(previous)


_CALL_SITE = re.compile(r'The following call raised this error:\s*File "([^"]+)", line (\d+), in (\w+)\s*\n\s*(.*)')


def export_cause(exc: BaseException) -> str:
    """One line for a failed torch.onnx.export: the innermost cause and, when torch names it, the model line."""
    inner = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(inner))
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    out = f"{type(inner).__name__}: {first}" if first else type(inner).__name__
    site = _CALL_SITE.search(re.sub(r"\x1b\[[0-9;]*m", "", str(exc))) or _CALL_SITE.search(text)
    if site:
        out += f" (at {Path(site[1]).name}:{site[2]} in {site[3]}: {site[4].strip()})"
    return out[:600]


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[list[str]]:
    """Switch every Hugging Face model inside `model` to transformers' eager attention while exporting.

    The SDPA path (transformers' default) exports its attention mask with `Where`/`IsNaN` nodes that
    cost ~15% of MiniLM's ONNX Runtime time; the eager path computes the same attention with a plain
    additive mask. Modules are matched by duck typing (`set_attn_implementation` and a config with
    `_attn_implementation`), so export/ needs no transformers import. Yields the switched modules'
    class names; the previous implementations are restored on exit.
    """
    switched: list[tuple[nn.Module, str]] = []
    try:
        for module in model.modules():
            current = getattr(getattr(module, "config", None), "_attn_implementation", None)
            if current not in (None, "eager") and callable(getattr(module, "set_attn_implementation", None)):
                module.set_attn_implementation("eager")
                switched.append((module, current))
        yield [type(m).__name__ for m, _ in switched]
    finally:
        for module, previous in reversed(switched):
            module.set_attn_implementation(previous)


# Above this many bytes of weights the graph is written with external data (<file>.data beside it):
# a protobuf message cannot exceed 2 GiB; the margin leaves room for the graph itself.
EXTERNAL_DATA_BYTES = 2**31 - 2**26


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, tied tensors counted once."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())}
    return int(sum(seen.values()))


def _failure(model: nn.Module, feeds: Mapping[str, torch.Tensor], cause: str) -> str:
    where = failing_module(model, feeds)
    return (f"torch.onnx.export failed for {type(model).__name__}: {cause}"
            + (f"\nthe module that does not export: {where}" if where else ""))


def export_graph(model: nn.Module, inputs: Sequence[TensorSpec], feeds: Mapping[str, torch.Tensor], path: Path,
                 opset: int = 20, output_names: Sequence[str] = ("output",), lean_attention: bool = True,
                 external: bool = False, slim: bool = True) -> tuple[str, str | None]:
    """torch.onnx.export (dynamo) of `model(**feeds)` to `path`, every named dim of `inputs` dynamic,
    then onnxslim's clean-up (`slim_onnx`). Returns the exporter used ("dynamo", or "torchscript" for a
    model torch.export cannot trace) and a note when the clean-up could not run (None otherwise).

    Args:
        external: write the weights to `<path>.data` beside the graph (models over EXTERNAL_DATA_BYTES);
            such a graph is not slimmed.
        slim: run onnxslim on the written graph (callers validate the result; export/onnx.py falls back
            to `slim=False` when parity fails after it).

    torch's own log lines, graph dumps and warnings are kept off stdout/stderr (logging restored after).

    Raises:
        ExportValidationError: both exporters failed (torch.export's innermost cause and model line named,
            and the innermost submodule that fails to export on its own; chained).
    """
    dynamic = {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in inputs}
    lean = eager_attention(model) if lean_attention else contextlib.nullcontext()
    with _quiet_torch(), lean:
        try:
            torch.onnx.export(model, (), str(path), kwargs=dict(feeds), dynamo=True, external_data=external,
                              verbose=False, dynamic_shapes=dynamic, output_names=list(output_names),
                              opset_version=opset)
            exporter = "dynamo"
        except Exception as exc:  # torch.export raises many unrelated classes; keep the cause chained
            # Some models trace in TorchScript but not in torch.export (transformers' T5 attention
            # reshapes a transposed tensor with symbolic sizes): fall back, validated the same way.
            # Never for data-dependent control flow: tracing would bake in the branch the example took.
            cause = export_cause(exc)
            if "DataDependent" in cause or "data-dependent" in cause.lower():
                raise ExportValidationError(_failure(model, feeds, cause)) from exc
            try:
                torch.onnx.export(model, (), str(path), kwargs=dict(feeds), dynamo=False, verbose=False,
                                  input_names=[s.name for s in inputs], output_names=list(output_names),
                                  dynamic_axes=dynamic, opset_version=opset)
                exporter = "torchscript"
            except Exception:  # noqa: BLE001  (the first failure is the one to report)
                raise ExportValidationError(_failure(model, feeds, cause)) from exc
    if not slim:
        return exporter, None
    if external:
        return exporter, "not slimmed: onnxslim is not run on a graph with external data"
    return exporter, slim_onnx(path)


def slim_onnx(path: Path) -> str | None:
    """onnxslim's graph clean-up (constant folding, dead nodes, shape ops) of the file at `path`, in
    place, keeping each surviving node's exporter metadata (module scopes, used to name the module
    behind a node). Returns a note when onnxslim is missing or fails (the file is left as it was)."""
    import onnx
    try:
        import onnxslim
    except ImportError:
        return "not slimmed: onnxslim is not installed (pip install onnxslim)"
    model = onnx.load(str(path))
    meta = {n.name: list(n.metadata_props) for n in model.graph.node if n.name}
    try:
        with _quiet_torch():
            slimmed = onnxslim.slim(model)
    except Exception as exc:  # noqa: BLE001  (onnxslim raises plain exceptions; the unslimmed graph stays)
        return f"not slimmed: onnxslim failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
    for node in slimmed.graph.node:
        if node.name in meta and not node.metadata_props:
            node.metadata_props.extend(meta[node.name])
    onnx.save(slimmed, str(path))
    return None


def failing_module(model: nn.Module, feeds: Mapping[str, torch.Tensor], max_probes: int = 40) -> str | None:
    """The innermost submodule (qualified name) that fails torch.onnx.export on its own inputs.

    One forward pass records each submodule's first inputs; then, from the root down, the first
    child (in call order) whose own export fails is entered, until no child of it fails.
    """
    calls: dict[str, tuple[tuple, dict]] = {}
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_pre_hook(lambda mod, args, kwargs: calls.setdefault(names[mod], (args, kwargs)) and None,
                                         with_kwargs=True) for m in names if m is not model]
    try:
        with torch.inference_mode(False), torch.no_grad(), _quiet_torch():
            model(**feeds)
    except Exception:  # noqa: BLE001  (a model that does not even run: nothing to point at)
        return None
    finally:
        for h in hooks:
            h.remove()
    order = {n: i for i, n in enumerate(calls)}
    culprit, probes = None, 0
    current = model
    while probes < max_probes:
        children = sorted(((f"{culprit}.{n}" if culprit else n, c) for n, c in current.named_children()),
                          key=lambda nc: order.get(nc[0], len(order)))
        for name, child in children:
            if name not in calls or probes >= max_probes:
                continue
            probes += 1
            if not _exports(child, *calls[name]):
                culprit, current = name, child
                break
        else:
            return culprit
    return culprit


def _exports(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether torch.onnx.export (dynamo, static shapes) handles `module(*args, **kwargs)`."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="edgeslim-probe-") as tmp, _quiet_torch():
        try:
            torch.onnx.export(module, tuple(args), str(Path(tmp) / "m.onnx"), kwargs=dict(kwargs), dynamo=True,
                              external_data=False, verbose=False)
            return True
        except Exception:  # noqa: BLE001  (any failure counts)
            return False


def ort_fused_graph(onnx_path: str | Path):
    """The graph ONNX Runtime's CPU provider runs once it has fused what it can (its optimized graph at the
    extended level: the Q/DQ groups it takes become QLinearConv, QLinearMatMul, MatMulInteger; node
    names of what it leaves are kept), its initializers not read."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgeslim-ort-graph-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath, opts.log_severity_level = str(Path(tmp) / "optimized.onnx"), 3
        ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath, load_external_data=False).graph
