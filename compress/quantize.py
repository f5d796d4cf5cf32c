"""Post-training INT8 (weights and activations) through NNCF's ONNX backend, as an ONNX-level stage.

`compress` exports the model exactly as the pipeline will (edgeslim.core.onnx_io), runs
`nncf.quantize` (min/max activation ranges per tensor, per-channel symmetric weights, fast bias
correction: Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019, Sec. 4.2) or `nncf.quantize_with_accuracy_control` on it with the
calibration data, and records only what depended on the data: every activation quantizer's scale
and zero point, every initializer the calibration changed (corrected biases), and the quantizers
the accuracy control took out again (layers kept in fp32). The torch model is left as it was.

`onnx_stage` rebuilds the same QDQ graph from that record without any data: NNCF places the
quantizers on the exported graph (placement depends on the graph only; weight scales on the
weights only), then every data-dependent value is overwritten from the record, and a graph that
does not match the record is refused. ONNX Runtime fuses the Q/DQ pairs into INT8 kernels
(QLinearConv, QLinearMatMul / MatMulInteger) where the ops between them allow it.
"""
from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.compress.base import CompressContext, CompressResult, Compressor, LayerChange, register, working_copy
from edgeslim.compress.int8_chains import (chain_sites, close_chains, close_outputs, output_ranges, output_sites,
                                           site_ranges, unsigned_activations)
from edgeslim.core.config import ConfigBase
from edgeslim.core.errors import ConfigError, ExportValidationError, SourceError, require
from edgeslim.core.onnx_io import dims_for, export_graph
from edgeslim.core.specs import TensorSpec, example_feeds

COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclass(frozen=True)
class Int8Config(ConfigBase):
    """NNCF post-training quantization settings (see nncf.quantize)."""

    # activations symmetric int8 ("performance") or asymmetric uint8 ("mixed"); auto: mixed for
    # transformers (measured on MiniLM: closer to fp32, and uint8 x int8 is the fast GEMM on AVX2), else performance
    preset: Literal["auto", "performance", "mixed"] = "auto"
    model_type: Literal["auto", "transformer", "generic"] = "auto"  # auto: transformer when the graph has Softmax
    subset_size: int = 300  # calibration samples used for the ranges
    # None: on, except for models whose output is a Conv's output (image-to-image: see _dense_output)
    fast_bias_correction: bool | None = None
    ignored: tuple[str, ...] = ()  # ONNX node names kept in fp32
    max_drop: float | None = None  # accuracy-aware: largest allowed drop of the metric (absolute)
    eval_fraction: float = 0.25  # with max_drop: share of the calibration batches held out to measure it
    opset: int = 20  # must match the opset the artifact is exported with
    tanh_table: bool = True  # Conv -> Tanh as QLinearConv + ORT's quantized sigmoid table (int8_chains)
    # a Conv whose output is the graph's (or a DepthToSpace's that is) gets a uint8 output quantizer,
    # so it runs as QLinearConv too (int8_chains.close_outputs); False: it stays fp32, NNCF's placement
    quantize_output: bool = True
    # that output's grid: "calibrated" (its measured range), "image" (1/255 steps on [0, 1], the bytes
    # an app writes: exact after its own rounding and clipping), "auto": image for super-resolution
    output_grid: Literal["auto", "calibrated", "image"] = "auto"
    # 7-bit weights in every Conv/MatMul (NNCF's overflow fix): x86 CPUs without VNNI (AVX2, AVX-512F)
    # multiply uint8 x int8 with vpmaddubsw, whose int16 pair sums saturate on 8-bit weights (measured
    # here: a factored MiniLM's embedding at cosine 0.03 in ORT, a ReLU ESPCN at -6 dB); first_layer is
    # NNCF's default; disable (8 bits) is for VNNI/AMX CPUs, GPUs, or graphs ORT runs in fp32 anyway
    overflow_fix: Literal["enable", "first_layer", "disable"] = "enable"

    def validate(self) -> None:
        if self.subset_size < 1:
            raise ConfigError(f"subset_size must be >= 1, got {self.subset_size}")
        if self.max_drop is not None and self.max_drop < 0:
            raise ConfigError(f"max_drop must be >= 0, got {self.max_drop}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        import onnx
        if not MIN_OPSET <= self.opset <= onnx.defs.onnx_opset_version():
            raise ConfigError(f"opset must be in {MIN_OPSET}..{onnx.defs.onnx_opset_version()}, got {self.opset}")


def _nncf():
    return require("nncf", "quantize", "INT8 quantization")


def _graph_inputs(model) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _numpy_batches(data: CalibData, names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    return [{k: v.detach().cpu().numpy() for k, v in batch.items() if k in names} for _, batch, _ in data]


def _quantize_kwargs(resolved: Mapping[str, Any], bias_correction: bool) -> dict[str, Any]:
    nncf = _nncf()
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                       AdvancedSmoothQuantParameters, OverflowFix,
                                                       QuantizationParameters)

    opts = resolved["nncf"]
    # SmoothQuant rescales weights by data-dependent factors; it is off so weights stay data-free.
    advanced = AdvancedQuantizationParameters(disable_bias_correction=not bias_correction,
                                              smooth_quant_alphas=AdvancedSmoothQuantParameters(-1, -1),
                                              overflow_fix=OverflowFix(_OVERFLOW[overflow_fix(resolved)]))
    if opts.get("per_tensor_activations"):  # ORT's QLinear kernels take one activation scale per tensor
        advanced.activations_quantization_params = QuantizationParameters(per_channel=False)
    return {"preset": nncf.QuantizationPreset(opts["preset"]),
            "model_type": nncf.ModelType.TRANSFORMER if opts["model_type"] == "transformer" else None,
            "ignored_scope": nncf.IgnoredScope(names=list(opts["ignored"]), validate=False),
            "fast_bias_correction": True, "subset_size": opts["subset_size"]}, advanced


_OVERFLOW = {"enable": "enable", "first_layer": "first_layer_only", "disable": "disable"}


def overflow_fix(resolved: Mapping[str, Any]) -> str:
    """The recorded overflow fix; artifacts written before it was recorded used NNCF's default."""
    return resolved["nncf"].get("overflow_fix", "first_layer")


def _init_arrays(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _activation_quantizers(model) -> dict[str, Any]:
    """QuantizeLinear nodes whose input is an activation (not a weight), by node name."""
    inits = {i.name for i in model.graph.initializer}
    return {n.name: n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def _record(fp32, quantized, full=None) -> dict[str, Any]:
    """The data-dependent part of a quantized graph: activation scales/zero points, changed initializers,
    and (accuracy control) the quantizers of the full quantization it dropped."""
    inits, before = _init_arrays(quantized), _init_arrays(fp32)
    activations = {}
    for name, node in _activation_quantizers(quantized).items():
        zp = inits[node.input[2]]
        activations[name] = {"scale": inits[node.input[1]].tolist(), "zero_point": zp.tolist(), "dtype": str(zp.dtype)}
    changed = {k: v.tolist() for k, v in inits.items() if k in before and not np.array_equal(v, before[k])}
    reverted = []
    if full is not None:
        kept = {n.name for n in quantized.graph.node}
        reverted = sorted(n.name for n in full.graph.node if n.op_type == "DequantizeLinear" and n.name not in kept)
    return {"activations": activations, "changed": changed, "reverted": reverted}


ZERO_POINT_DTYPES = ("int8", "uint8")
MIN_OPSET = 13  # per-axis QuantizeLinear


def check_record(resolved: Mapping[str, Any], where: str) -> None:
    """SourceError unless an INT8 record is one `onnx_stage` can apply: an opset ONNX knows (>= 13), and
    every activation quantizer with finite positive scales and int8/uint8 zero points in their range
    (NaN scales would export a NaN model; a dtype such as int4 or a bad value would crash the stage)."""
    import onnx

    opset = resolved.get("opset")
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= newest:
        raise SourceError(f"{where}: INT8 opset {opset!r} is not one ONNX {onnx.__version__} has "
                          f"({MIN_OPSET}..{newest})")
    activations = resolved.get("activations")
    if not isinstance(activations, Mapping) or not isinstance(resolved.get("changed"), Mapping):
        raise SourceError(f"{where}: INT8 record needs 'activations' and 'changed' objects")
    for name, q in activations.items():
        try:
            dtype = q["dtype"]
            if dtype not in ZERO_POINT_DTYPES:
                raise ValueError(f"zero-point dtype {dtype!r} is not one of {ZERO_POINT_DTYPES}")
            scale, zp = np.asarray(q["scale"], dtype=np.float64), np.asarray(q["zero_point"], dtype=np.float64)
            info = np.iinfo(dtype)
            if scale.size == 0 or scale.size > 1 << 20 or scale.shape != zp.shape:
                raise ValueError(f"scale {scale.shape} and zero point {zp.shape} do not match")
            if not (np.isfinite(scale).all() and (scale > 0).all()):
                raise ValueError("scales that are not finite and positive (calibration data with NaN or inf?)")
            if not ((zp == np.round(zp)) & (zp >= info.min) & (zp <= info.max)).all():
                raise ValueError(f"zero points outside {dtype}")
        except (TypeError, ValueError, KeyError) as exc:
            raise SourceError(f"{where}: INT8 quantizer {name!r} has {exc}") from None


def _set_init(model, name: str, value: np.ndarray) -> None:
    """Replace initializer `name` by `value`, whose dtype is kept: a zero point's int8/uint8 is part of
    the record (NNCF picks unsigned for activations that were never negative in the calibration)."""
    from onnx import numpy_helper
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            return
    raise KeyError(name)


def _revert(model, fp32, dq_names: Sequence[str]) -> None:
    """Take the named DequantizeLinear nodes out: their consumers read what the fp32 graph's same node
    read at that input again; Q/DQ nodes and initializers left unused are dropped."""
    fp32_nodes = {n.name: n for n in fp32.graph.node}
    dq_out = {n.output[0] for n in model.graph.node if n.name in set(dq_names)}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in dq_out:
                node.input[i] = fp32_nodes[node.name].input[i]
    while True:
        used = {x for n in model.graph.node for x in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    used = {x for n in model.graph.node for x in n.input}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)
    fp32_inits = {i.name: i for i in fp32.graph.initializer}
    have = {i.name for i in model.graph.initializer}
    model.graph.initializer.extend(fp32_inits[n] for n in sorted(used - have) if n in fp32_inits)


def _metric(outputs: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> float:
    """Top-1 accuracy for integer class targets, else 1 - relative L2 error to the targets."""
    if all(t.dtype.kind in "iu" for t in targets):
        return float(np.mean(np.concatenate([o.argmax(-1) == t for o, t in zip(outputs, targets)])))
    err = sum(float(np.sum((o - t) ** 2)) for o, t in zip(outputs, targets))
    return 1.0 - float(np.sqrt(err / max(sum(float(np.sum(t ** 2)) for t in targets), 1e-30)))


def _ort(model):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _probe(fp32, tensors: Sequence[str], batches: Sequence[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """The fp32 graph's values of `tensors` on `batches`."""
    import onnx
    probe = onnx.ModelProto()
    probe.CopyFrom(fp32)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors if t not in present)
    session = _ort(probe)
    values: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for feeds in batches:
        for name, value in zip([o.name for o in session.get_outputs()], session.run(None, feeds)):
            if name in values:
                values[name].append(value)
    return values


def _quant_errors(fp32, record: Mapping[str, Any], quantized, batches: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """Relative error ||fq(a) - a|| / ||a|| of each activation quantizer on calibration batches."""
    nodes = _activation_quantizers(quantized)
    values = _probe(fp32, sorted({n.input[0] for n in nodes.values()}), batches[:2])
    errors = {}
    for name, node in nodes.items():
        q = record["activations"][name]
        info = np.iinfo(q["dtype"])
        lost = kept = 0.0
        for a in values[node.input[0]]:  # batch by batch: length-bucketed batches differ in shape
            a = a.astype(np.float64)
            scale, zp = np.asarray(q["scale"]), np.asarray(q["zero_point"])
            if scale.ndim:  # per-channel activation quantizer: along the node's axis (default 1)
                axis = next((x.i for x in node.attribute if x.name == "axis"), 1) % a.ndim
                shape = [1] * a.ndim
                shape[axis] = scale.size
                scale, zp = scale.reshape(shape), zp.reshape(shape)
            fq = (np.clip(np.round(a / scale) + zp, info.min, info.max) - zp) * scale
            lost, kept = lost + float(np.square(fq - a).sum()), kept + float(np.square(a).sum())
        errors[name] = float(np.sqrt(lost) / max(np.sqrt(kept), 1e-30))
    return errors


def _scope(node) -> str:
    """The torch module a node came from (dynamo exporter metadata), else the node name."""
    import ast
    meta = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        scopes = []
    return scopes[-2] if len(scopes) >= 2 and scopes[-2] else node.name


def _changes(fp32, quantized, record, errors: Mapping[str, float]) -> list[LayerChange]:
    """One row per compute op: quantized (with the error of its input activations) or kept fp32."""
    fp32_inits = _init_arrays(fp32)
    producer = {o: n for n in quantized.graph.node for o in n.output}
    q_of_dq = {n.output[0]: producer.get(n.input[0]) for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    rows = []
    for node in fp32.graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        weights = [fp32_inits[x] for x in node.input[1:] if x in fp32_inits]
        params = int(sum(w.size for w in weights))
        qnode = next((n for n in quantized.graph.node if n.name == node.name), None)
        dq_inputs = [x for x in (qnode.input if qnode is not None else []) if x in q_of_dq]
        act = [q_of_dq[x].name for x in dq_inputs if q_of_dq[x] is not None and q_of_dq[x].name in errors]
        kind = f"{node.op_type} ({node.name})"
        if not dq_inputs:
            rows.append(LayerChange(_scope(node), kind, params, params, status="skipped",
                                    bytes_before=4 * params, bytes_after=4 * params,
                                    note="kept fp32" + (" by accuracy control" if record["reverted"] else "")))
            continue
        main = fp32_inits.get(node.input[1]) if len(node.input) > 1 else None
        quant_bytes = 4 * params if main is None else 4 * params - 3 * main.size
        err = max((errors[a] for a in act), default=None)
        rows.append(LayerChange(_scope(node), kind + " -> QDQ int8", params, params, status="quantized",
                                bytes_before=4 * params, bytes_after=int(quant_bytes), rel_error=err, sensitivity=err,
                                note=f"{len(act)} activation quantizer(s)"))
    return rows


PASS_THROUGH = ("DepthToSpace", "Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Flatten")


def _dense_output(model) -> bool:
    """True when a graph output is a Conv / ConvTranspose output, reached through layout ops only
    (a sub-pixel super-resolution net: Conv -> DepthToSpace).

    Fast bias correction is then left off by default. It estimates each layer's output shift
    (Nagel et al. 2019, Sec. 4.2, empirical form) by running the quantized layer on every channel's
    *mean* input, q(E[x]) instead of E[q(x)]: the rounding of a constant does not average out, and
    on a layer whose outputs are the pixels that systematic term is a brightness offset of every
    output pixel. Measured on the shipped espcn-x3 (held-out images, ORT): NNCF moved the last Conv's
    9 biases by +0.005..+0.009 (1.3-2.3 grey levels) and the INT8 model lost 0.36 dB against fp32;
    without the correction 0.07 dB.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    for out in model.graph.output:
        node = producer.get(out.name)
        while node is not None and node.op_type in PASS_THROUGH:
            node = producer.get(node.input[0])
        if node is not None and node.op_type in ("Conv", "ConvTranspose"):
            return True
    return False


def _detect_type(model, config: Int8Config) -> str:
    if config.model_type != "auto":
        return config.model_type
    return "transformer" if any(n.op_type == "Softmax" for n in model.graph.node) else "generic"


@register
class Int8(Compressor):
    """Post-training INT8 (NNCF, ONNX backend): QDQ ONNX graph, activation ranges from calibration."""

    name, Config, kind = "int8", Int8Config, "quantized"
    needs_calibration, data_aware, has_onnx_stage = True, True, True

    def compress(self, model: nn.Module, config: Int8Config, calib: CalibData | None = None, inplace: bool = False,
                 context: CompressContext | None = None) -> CompressResult:
        import onnx
        nncf = _nncf()
        config = self.make_config(config)
        if calib is None:
            raise ConfigError("int8 needs calibration data (--calib NAME[:COUNT] or a file of your inputs)")
        if context is None or not context.inputs:
            raise ConfigError("int8 needs the model's input spec: pass CompressContext(inputs=...) "
                              "(the pipeline does)")
        model = working_copy(model, inplace).eval()
        inputs = list(context.inputs)
        with tempfile.TemporaryDirectory(prefix="edgeslim-int8-") as tmp:
            path = Path(tmp) / "model.onnx"
            feeds = {k: torch.from_numpy(v) for k, v in example_feeds(inputs, dims_for(inputs), seed=0).items()}
            export_graph(model, inputs, feeds, path, config.opset)  # slimmed as the pipeline's export is
            fp32 = onnx.load(str(path))
        names = _graph_inputs(fp32)
        batches = _numpy_batches(calib, names)
        per_batch = max(1, len(next(iter(batches[0].values()))))
        model_type = _detect_type(fp32, config)
        preset = config.preset if config.preset != "auto" else "mixed" if model_type == "transformer" else "performance"
        bias_correction = config.fast_bias_correction
        if bias_correction is None:
            bias_correction = not _dense_output(fp32)
        resolved = {"nncf": {"preset": preset, "model_type": model_type,
                             "subset_size": max(1, -(-config.subset_size // per_batch)), "ignored": list(config.ignored),
                             "fast_bias_correction": bias_correction, "overflow_fix": config.overflow_fix,
                             "per_tensor_activations": True},
                    "opset": config.opset, "nncf_version": nncf.__version__}
        kwargs, advanced = _quantize_kwargs(resolved, bias_correction=bias_correction)
        kwargs["fast_bias_correction"] = bias_correction
        if config.max_drop is None:
            quantized, full, drop = nncf.quantize(fp32, nncf.Dataset(batches), advanced_parameters=advanced,
                                                  **kwargs), None, None
        else:
            quantized, full, drop = self._accuracy_control(fp32, calib, batches, config, kwargs, advanced)
        record = _record(fp32, quantized, full)
        check_record(resolved | record, f"int8 calibration on {calib.name}")  # NaN/inf data: NaN scales
        errors = _quant_errors(fp32, record, quantized, batches)
        changes = _changes(fp32, quantized, record, errors)
        sites = chain_sites(quantized) if config.tanh_table else []
        resolved |= record | {"tanh_table": site_ranges(_probe(fp32, sites, batches)) if sites else {}}
        outs = output_sites(quantized) if config.quantize_output else []
        grid = config.output_grid
        if grid == "auto":
            grid = "image" if context is not None and context.task == "super-resolution" else "calibrated"
        if grid == "image":
            resolved["output_ranges"] = {z: [0.0, 1.0] for z in outs}
        else:
            resolved["output_ranges"] = output_ranges(_probe(fp32, outs, batches)) if outs else {}
        resolved["output_grid"] = grid if outs else None
        if drop is not None:
            resolved["accuracy"] = drop
        return self.result(model, config, changes, resolved)

    def _accuracy_control(self, fp32, calib: CalibData, batches, config: Int8Config, kwargs, advanced):
        """nncf.quantize_with_accuracy_control on a held-out share of the calibration batches; the
        metric is top-1 accuracy for class targets, else 1 - relative L2 error to the targets (the
        fp32 model's outputs when the data has none)."""
        nncf = _nncf()
        held = max(1, int(round(len(batches) * config.eval_fraction)))
        if held >= len(batches):
            raise ConfigError(f"max_drop needs at least 2 calibration batches (got {len(batches)})")
        calib_part, eval_part = batches[:-held], batches[-held:]
        if calib.targets is not None:
            targets = [t.detach().cpu().numpy() for t in list(calib.targets)[-held:]]
        else:
            session = _ort(fp32)
            targets = [session.run(None, f)[0] for f in eval_part]
        items = list(zip(eval_part, targets))

        def validate(model, data) -> tuple[float, None]:
            session = _ort(model)
            pairs = list(data)
            return _metric([session.run(None, f)[0] for f, _ in pairs], [t for _, t in pairs]), None

        full = nncf.quantize(fp32, nncf.Dataset(calib_part), advanced_parameters=advanced, **kwargs)
        quantized = nncf.quantize_with_accuracy_control(
            fp32, nncf.Dataset(calib_part), nncf.Dataset(items), validate, max_drop=config.max_drop,
            advanced_quantization_parameters=advanced, **kwargs)
        metrics = {"fp32": validate(fp32, items)[0], "int8_full": validate(full, items)[0],
                   "int8": validate(quantized, items)[0], "samples": int(sum(len(t) for t in targets))}
        return quantized, full, metrics

    def replay(self, model: nn.Module, resolved: Mapping[str, Any], inputs: Sequence[TensorSpec]) -> nn.Module:
        return model  # the torch model is unchanged; the quantization lives in the ONNX stage

    def onnx_stage(self, resolved: Mapping[str, Any], onnx_in: Path, onnx_out: Path, context: CompressContext) -> None:
        """Rebuild the recorded QDQ graph on the exported `onnx_in` without calibration data.

        Raises:
            ExportValidationError: the exported graph's quantizers are not the recorded ones (another
                opset, exporter or NNCF placement than at compress time).
        """
        import onnx
        check_record(resolved, "the artifact's int8 step")
        nncf = _nncf()
        fp32 = onnx.load(str(onnx_in))
        names = _graph_inputs(fp32)
        feeds = {k: v for k, v in example_feeds(list(context.inputs), dims_for(list(context.inputs)), 0).items()
                 if k in names}
        kwargs, advanced = _quantize_kwargs(resolved, bias_correction=False)
        kwargs["subset_size"] = 1
        with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bar; nothing is calibrated here
            model = nncf.quantize(fp32, nncf.Dataset([feeds]), advanced_parameters=advanced, **kwargs)
        found, wanted = _activation_quantizers(model), resolved["activations"]
        reverted = set(resolved.get("reverted", ()))
        dq_of = {n.input[0]: n.name for n in model.graph.node if n.op_type == "DequantizeLinear"}
        expected = {n for n in found if dq_of.get(found[n].output[0]) not in reverted}
        if expected != set(wanted):
            missing, extra = sorted(set(wanted) - expected), sorted(expected - set(wanted))
            raise ExportValidationError(
                f"{onnx_in}: the exported graph's INT8 quantizers differ from those recorded at compress time "
                f"(missing {missing[:5]}, unrecorded {extra[:5]}); export with opset {resolved['opset']} and the "
                f"edgeslim/NNCF {resolved['nncf_version']} that wrote the artifact")
        for name, q in wanted.items():
            node = found[name]
            _set_init(model, node.input[1], np.asarray(q["scale"], dtype=np.float32))
            _set_init(model, node.input[2], np.asarray(q["zero_point"], dtype=q["dtype"]))
        dtypes = {i.name: i.data_type for i in fp32.graph.initializer}
        for name, value in resolved["changed"].items():
            try:
                _set_init(model, name, np.asarray(value, dtype=onnx.helper.tensor_dtype_to_np_dtype(dtypes[name])))
            except KeyError:
                raise ExportValidationError(f"{onnx_in}: recorded initializer '{name}' is not in the exported "
                                            "graph") from None
        if reverted:
            _revert(model, fp32, sorted(reverted))
        try:
            close_chains(model, resolved.get("tanh_table", {}), seven_bit=overflow_fix(resolved) == "first_layer")
        except KeyError as exc:
            raise ExportValidationError(f"{onnx_in}: recorded Conv -> Tanh site {exc} is not in the exported graph") from None
        try:  # artifacts written before output_ranges existed replay as they were made
            close_outputs(model, resolved.get("output_ranges", {}))
        except KeyError as exc:
            raise ExportValidationError(f"{onnx_in}: recorded Conv output {exc} is not a quantizable graph output of "
                                        "the exported graph") from None
        unsigned_activations(model)  # lossless; lets ORT fuse Convs between uint8 and int8 activations
        onnx.save(model, str(onnx_out))
