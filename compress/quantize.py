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
from edgeslim.compress.base import CompressContext, CompressResult, Compressor, register, working_copy
from edgeslim.compress.int8_chains import (chain_sites, fold_unfused_weights, image_input_grid, output_ranges,
                                           output_sites, site_ranges)
from edgeslim.compress.int8_grouped_bias import correct_grouped_biases
from edgeslim.compress.int8_replay import apply_activations, correct_output_biases, finish_graph, overflow_fix
from edgeslim.compress.int8_sensitivity import check_op_names, keep_named, keep_sensitive, sensitivity_notes
from edgeslim.compress.int8_dynamic import check_dynamic, dynamic_record, dynamic_rows, quantize_dynamic_graph
from edgeslim.compress.int8_record import (MIN_OPSET, activation_quantizers, check_record, dense_output, layer_rows,
                                           metric, ort_session, probe_values, quantization_errors, record_graph,
                                           revert_quantizers, set_initializer, stem_conv)
from edgeslim.core.config import ConfigBase
from edgeslim.core.errors import ConfigError, ExportValidationError, require
from edgeslim.core.onnx_io import dims_for, export_graph
from edgeslim.core.specs import TensorSpec, example_feeds


@dataclass(frozen=True)
class Int8Config(ConfigBase):
    """NNCF post-training quantization settings (see nncf.quantize)."""

    # activations symmetric int8 ("performance") or asymmetric uint8 ("mixed"); auto: mixed for
    # transformers (measured on MiniLM: closer to fp32, and uint8 x int8 is the fast GEMM on AVX2), else performance
    preset: Literal["auto", "performance", "mixed"] = "auto"
    model_type: Literal["auto", "transformer", "generic"] = "auto"  # auto: transformer when the graph has Softmax
    # calibration samples used for the ranges; None: all the data has, at most 300 (more than it has is refused)
    subset_size: int | None = None
    # None: on, except for models whose output is a Conv's output (image-to-image: see int8_record.dense_output)
    fast_bias_correction: bool | None = None
    # correct the biases of grouped (depthwise) convs too, which NNCF's fast bias correction skips: one by
    # one in graph order on the calibration data (int8_grouped_bias.py); None: with fast_bias_correction
    # (static path without max_drop). EfficientNet-Lite0: output error 0.120 -> 0.064 with every op INT8
    grouped_bias_correction: bool | None = None
    ignored: tuple[str, ...] = ()  # ONNX node names kept in fp32 (left out of NNCF's placement)
    # ONNX node names put back in fp32 after NNCF (and sensitive_fp32) placed every quantizer: their input
    # quantizers taken out, as optimize scores one op; dynamic activations: the same as ignored
    fp32_ops: tuple[str, ...] = ()
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
    # NNCF's default; disable (8 bits) is for VNNI/AMX CPUs, GPUs, or graphs ORT runs in fp32 anyway;
    # auto: follow the target CPU's INT8 features (overflow_fix_for), enable when they are unknown
    overflow_fix: Literal["auto", "enable", "first_layer", "disable"] = "auto"
    # activation ranges from calibration ("static": NNCF's QDQ graph, the record above) or from each input
    # at run time ("dynamic": DynamicQuantizeLinear + MatMulInteger, int8 weights per channel, settings
    # only: compress/int8_dynamic.py); auto: dynamic_mode_wins(model type, the target CPU's INT8 features)
    activations: Literal["auto", "static", "dynamic"] = "auto"
    # keep the stem (a Conv on the pixels: <= 4 input channels) in fp32; None: for every CNN (measured on
    # EfficientNet-Lite0, bundled crops: top-1 agreement 0.875 -> 0.917, output error 0.17 -> 0.12, for a conv
    # with under 3% of the MACs) but one read on the image grid (super-resolution): ESPCN x3's int8 stem, on
    # two input planes and column shifts (int8_kernels.py), ran at 2.02x fp32 against 1.53x with it fp32 (its
    # NCHWc conv, reorder, quantizer and transpose), 0.092 against 0.081 dB lost (bench/int8.py, Xeon AMX)
    stem_fp32: bool | None = None
    # keep in fp32 the compute ops whose INT8 error costs the output most, measured on the calibration data
    # (int8_sensitivity.py): ranked by the output error left with each alone in fp32, reverted in that order
    # while each removes >= sensitive_gain of the all-INT8 output error, their multiply-adds (and those of
    # the kernels they unfuse) within sensitive_macs of the INT8 kernels'; None: for every CNN on the static
    # path without max_drop (EfficientNet-Lite0: 1 op and the head, 0.064 -> 0.062) but one read on the image
    # grid (super-resolution: measured on NNCF's QDQ graph, not on the tables and input planes export builds,
    # it put ESPCN x3's stem back in fp32)
    sensitive_fp32: bool | None = None
    sensitive_gain: float = 0.02  # sensitive_fp32: least share of the all-INT8 output error one more op must remove
    sensitive_macs: float = 0.1  # sensitive_fp32: most multiply-adds kept fp32, as a share of the INT8 kernels'
    # shape quantized Convs for ORT's fast symmetric INT8 conv kernel (int8_kernels.py; exact): an output conv
    # padded to 16 channels, a one-channel conv (a quantized stem) on column shifts; ESPCN x3's last conv 3-5x faster
    conv_kernels: bool = True
    # a quantized one-channel stem on an image's 1/255 grid reads the input as two planes, the grid value and
    # the rest 16x finer (int8_kernels.split_input_planes: 8-bit pixels read exactly as before, BT.601 luma to
    # 1/16 of a step); None: where the stem is quantized and output_grid is image
    fine_input: bool | None = None
    # the biases of the convs whose outputs are the graph's (quantize_output) corrected on the calibration
    # batches by the fp32 graph's channel means minus the final INT8 graph's (tables, grids and input planes
    # included); None: where fast_bias_correction is off (image-to-image); recorded in `changed`
    output_bias_correction: bool | None = None

    def validate(self) -> None:
        if self.subset_size is not None and self.subset_size < 1:
            raise ConfigError(f"subset_size must be >= 1, got {self.subset_size}")
        if self.max_drop is not None and self.max_drop < 0:
            raise ConfigError(f"max_drop must be >= 0, got {self.max_drop}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if not (0.0 <= self.sensitive_gain <= 1.0 and 0.0 <= self.sensitive_macs <= 1.0):
            raise ConfigError(f"sensitive_gain and sensitive_macs must be in [0, 1], got {self.sensitive_gain} and "
                              f"{self.sensitive_macs}")
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


DEFAULT_SUBSET = 300  # calibration samples when subset_size is not set


def calibration_batches(batches: Sequence[dict[str, np.ndarray]], subset_size: int | None,
                        where: str) -> tuple[int, int]:
    """(batches, samples) of the calibration data that `subset_size` samples take, counted in samples
    (NNCF counts batches).

    Raises:
        ConfigError: `subset_size` asks for more samples than the data has; an input holds NaN or inf;
            every floating-point input is one constant (no activation range to measure).
    """
    sizes = [len(next(iter(b.values()))) if b else 1 for b in batches]
    if subset_size is not None and subset_size > sum(sizes):
        raise ConfigError(f"{where}: subset_size={subset_size} asks for more samples than the {sum(sizes)} the "
                          f"data has: ask for more (NAME:{subset_size}) or set subset_size <= {sum(sizes)}")
    floats: dict[str, tuple[float, float]] = {}
    for i, batch in enumerate(batches):
        for name, value in batch.items():
            if value.dtype.kind != "f":
                continue
            if not np.isfinite(value).all():
                raise ConfigError(f"{where}: input '{name}' holds NaN or inf (batch {i}): INT8 ranges need finite data")
            lo, hi = floats.get(name, (np.inf, -np.inf))
            floats[name] = (min(lo, float(value.min())), max(hi, float(value.max())))
    if floats and all(lo == hi for lo, hi in floats.values()):
        name, (lo, _) = next(iter(floats.items()))
        raise ConfigError(f"{where}: every input is constant ('{name}' is {lo:g} everywhere): INT8 ranges need "
                          "varied calibration inputs")
    wanted = min(sum(sizes), subset_size or DEFAULT_SUBSET)
    count = next(k for k in range(1, len(sizes) + 1) if sum(sizes[:k]) >= wanted)
    return count, int(sum(sizes[:count]))


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
# INT8 dot products that add uint8 x int8 products in int32 (vpdpbusd, AMX tiles): no int16 pair sum to saturate
NON_SATURATING = ("avx512_vnni", "avx_vnni", "amx_int8")


def resolve_overflow_fix(setting: str, int8_features: Sequence[str] | None) -> str:
    """The overflow fix `setting` means on a CPU with `int8_features`: "auto" is "disable" (8-bit weights)
    where a VNNI/AMX dot product adds in int32, else "enable" (7 bits: AVX2's vpmaddubsw saturates its
    int16 pair sums, and an unknown target may be such a CPU); any other setting is kept."""
    if setting != "auto":
        return setting
    return "disable" if any(f in NON_SATURATING for f in int8_features or ()) else "enable"


def dynamic_mode_wins(model_type: str, int8_features: Sequence[str] | None) -> bool:
    """Whether "auto" activations are dynamic: for transformers on a CPU with a VNNI/AMX dot product (no
    7-bit weights there; measured on MiniLM, BBC News, Intel Xeon with AMX: sentence cosine 0.9949 against
    0.9945 for the static QDQ graph and for ORT's quantize_dynamic; the latencies at batch 1 and 8 x 128
    are bench/int8.py's to measure on a quiet CPU: none was, see bench/results/int8.json); static elsewhere
    (AVX2 would need 7-bit weights; CNNs fuse Conv chains into QLinearConv, and ConvInteger is slow)."""
    return model_type == "transformer" and any(f in NON_SATURATING for f in int8_features or ())


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
        check_op_names(fp32, config.fp32_ops, "int8")  # before calibrating: a typo costs no NNCF run
        names = _graph_inputs(fp32)
        batches = _numpy_batches(calib, names)
        subset, samples = calibration_batches(batches, config.subset_size, f"int8 calibration on {calib.name}")
        model_type = _detect_type(fp32, config)
        preset = config.preset if config.preset != "auto" else "mixed" if model_type == "transformer" else "performance"
        fix = resolve_overflow_fix(config.overflow_fix, context.int8_features)
        features = None if context.int8_features is None else list(context.int8_features)
        dynamic = config.activations == "dynamic" or (config.activations == "auto" and
                                                      dynamic_mode_wins(model_type, context.int8_features))
        if dynamic:
            if config.max_drop is not None:
                raise ConfigError("max_drop (accuracy control) removes static quantizers: set activations=static "
                                  "with it")
            return self._dynamic(model, config, fp32, batches[:subset], model_type, fix, features, samples)
        bias_correction = config.fast_bias_correction
        if bias_correction is None:
            bias_correction = not dense_output(fp32)
        grid = config.output_grid
        if grid == "auto":
            grid = "image" if context is not None and context.task == "super-resolution" else "calibrated"
        # a super-resolution net on the image grid: its stem INT8, on two input planes (see stem_fp32)
        image_net = model_type == "generic" and grid == "image"
        keep_stem = config.stem_fp32 if config.stem_fp32 is not None else model_type == "generic" and not image_net
        ignored = list(config.ignored) + [n for n in (stem_conv(fp32) if keep_stem else []) if n not in config.ignored]
        resolved = {"nncf": {"preset": preset, "model_type": model_type,
                             "subset_size": subset, "ignored": ignored,
                             "fast_bias_correction": bias_correction,
                             "overflow_fix": fix, "per_tensor_activations": True},
                    "activations_mode": "static", "overflow_fix_for": features,
                    "calibration_samples": samples, "opset": config.opset, "nncf_version": nncf.__version__}
        kwargs, advanced = _quantize_kwargs(resolved, bias_correction=bias_correction)
        kwargs["fast_bias_correction"] = bias_correction
        notes = {}
        if config.max_drop is None:
            quantized, full, drop = nncf.quantize(fp32, nncf.Dataset(batches), advanced_parameters=advanced,
                                                  **kwargs), None, None
            if config.grouped_bias_correction if config.grouped_bias_correction is not None else bias_correction:
                resolved["grouped_bias_correction"] = correct_grouped_biases(fp32, quantized, batches[:subset])
            if config.sensitive_fp32 if config.sensitive_fp32 is not None else model_type == "generic" and not image_net:
                full = quantized
                quantized, resolved["sensitivity"] = keep_sensitive(
                    fp32, full, batches[:subset], config.sensitive_gain, config.sensitive_macs,
                    output_sites(full) if config.quantize_output else ())
                notes = sensitivity_notes(resolved["sensitivity"])
        else:
            quantized, full, drop = self._accuracy_control(fp32, calib, batches, config, kwargs, advanced)
        if config.fp32_ops:  # after the sensitivity step: recorded in `reverted` with it
            full, quantized = quantized if full is None else full, keep_named(fp32, quantized, config.fp32_ops)
            notes |= {op: "kept fp32: fp32_ops" for op in config.fp32_ops}
        record = record_graph(fp32, quantized, full)
        check_record(resolved | record, f"int8 calibration on {calib.name}")  # NaN/inf data: NaN scales
        errors = quantization_errors(fp32, record, quantized, batches)
        changes = layer_rows(fp32, quantized, record, errors, notes)
        sites = chain_sites(quantized) if config.tanh_table else []
        resolved |= record | {"tanh_table": site_ranges(probe_values(fp32, sites, batches)) if sites else {}}
        outs = output_sites(quantized) if config.quantize_output else []
        if grid == "image":
            resolved["output_ranges"] = {z: [0.0, 1.0] for z in outs}
            image_input_grid(quantized, names, resolved["activations"])
        else:
            resolved["output_ranges"] = output_ranges(probe_values(fp32, outs, batches)) if outs else {}
        resolved["output_grid"] = grid if outs else None
        stem_int8 = not keep_stem and bool(stem_conv(fp32))
        resolved["fine_input"] = config.fine_input if config.fine_input is not None else grid == "image" and stem_int8
        resolved["conv_kernels"] = config.conv_kernels
        correct = config.output_bias_correction
        if outs and (correct if correct is not None else not bias_correction):
            resolved["output_bias_correction"] = correct_output_biases(fp32, quantized, resolved, outs, batches[:subset])
        if drop is not None:
            resolved["accuracy"] = drop
        return self.result(model, config, changes, resolved)

    def _dynamic(self, model: nn.Module, config: Int8Config, fp32, batches, model_type: str, fix: str,
                 features: list[str] | None, samples: int) -> CompressResult:
        """Dynamic activations: the settings, one row per compute op, and the output's relative L2 error
        to fp32 on the calibration batches (the data checks the mode; it decides nothing)."""
        import onnx
        record = dynamic_record(fix, (*config.ignored, *config.fp32_ops))
        with tempfile.TemporaryDirectory(prefix="edgeslim-int8-") as tmp:
            onnx.save(fp32, str(Path(tmp) / "fp32.onnx"))
            quantize_dynamic_graph(record, Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx")
            session = ort_session(onnx.load(str(Path(tmp) / "int8.onnx")))
        reference = ort_session(fp32)
        err = 1.0 - metric([session.run(None, f)[0] for f in batches], [reference.run(None, f)[0] for f in batches])
        resolved = {"activations_mode": "dynamic", "dynamic": record, "model_type": model_type,
                    "overflow_fix": fix, "overflow_fix_for": features, "opset": config.opset,
                    "calibration_samples": samples, "calibration_rel_l2": err}
        return self.result(model, config, dynamic_rows(fp32, record), resolved)

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
            session = ort_session(fp32)
            targets = [session.run(None, f)[0] for f in eval_part]
        items = list(zip(eval_part, targets))

        def validate(model, data) -> tuple[float, None]:
            session = ort_session(model)
            pairs = list(data)
            return metric([session.run(None, f)[0] for f, _ in pairs], [t for _, t in pairs]), None

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
        if resolved.get("activations_mode") == "dynamic":
            check_dynamic(resolved.get("dynamic"), "the artifact's int8 step")
            quantize_dynamic_graph(resolved["dynamic"], onnx_in, onnx_out)
            return
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
        found, wanted = activation_quantizers(model), resolved["activations"]
        reverted = set(resolved.get("reverted", ()))
        dq_of = {n.input[0]: n.name for n in model.graph.node if n.op_type == "DequantizeLinear"}
        expected = {n for n in found if dq_of.get(found[n].output[0]) not in reverted}
        if expected != set(wanted):
            missing, extra = sorted(set(wanted) - expected), sorted(expected - set(wanted))
            raise ExportValidationError(
                f"{onnx_in}: the exported graph's INT8 quantizers differ from those recorded at compress time "
                f"(missing {missing[:5]}, unrecorded {extra[:5]}); export with opset {resolved['opset']} and the "
                f"edgeslim/NNCF {resolved['nncf_version']} that wrote the artifact")
        apply_activations(model, wanted)
        dtypes = {i.name: i.data_type for i in fp32.graph.initializer}
        for name, value in resolved["changed"].items():
            try:
                set_initializer(model, name, np.asarray(value, dtype=onnx.helper.tensor_dtype_to_np_dtype(dtypes[name])))
            except KeyError:
                raise ExportValidationError(f"{onnx_in}: recorded initializer '{name}' is not in the exported "
                                            "graph") from None
        if reverted:
            revert_quantizers(model, fp32, sorted(reverted))
        finish_graph(model, fp32, resolved, str(onnx_in))
        fold_unfused_weights(model)  # lossless; no per-call dequantization of weights no int8 kernel reads
        onnx.save(model, str(onnx_out))
