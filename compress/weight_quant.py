"""Weight-only INT8 / INT4 quantization of every linear map (NNCF `compress_weights`, Torch backend).

Each weight is stored as integers with a scale (and, asymmetric, a zero point) per output channel
(INT8) or per group of `group_size` consecutive input weights (INT4, two values packed per byte):
w ~ s * (q - z), q = clamp(round(w / s) + z) (min/max "round to nearest" weight quantization, as in
Dettmers et al., "LLM.int8()", NeurIPS 2022, Sec. 3.1 for per-channel absmax, and the group-wise
INT4 of Frantar et al., "GPTQ", ICLR 2023, Sec. 4, without its error feedback). Activations stay fp32;
the weights are dequantized on the fly by NNCF decompressor hooks. It is data-free: the example
inputs only trace the model, so `replay` re-applies the same quantization to rebuild the structure
(packed integer weights, scale and zero-point buffers) and the artifact's weights load into it.
`target` / `exclude` select the layers as in every other family (compress/replace.py); the layers
left out, and any whose weight is tied to one of them, stay fp32 (an NNCF ignored scope), and the
record names them so replay leaves them out again.

The size gain is in the torch model and its artifact. `export` runs the decompression in the graph
and ONNX constant-folds it: the ONNX file holds the dequantized fp32 weights (same outputs, fp32 size).
A causal LM's key/value-cache export (`export --kv-cache`) keeps the integers instead: `integer_weights`
gives each quantized weight as unsigned integers, scales and zero points per block, `dequantized` the
fake-quantized fp32 model they define, and export/nbits.py lowers its MatMuls to ORT's MatMulNBits.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.compress.block_quant import IntegerWeight, grid_layers, integers, snap
from edgeslim.compress.base import (CompressContext, CompressResult, Compressor, LayerChange, TargetConfig, register,
                                    working_copy)
from edgeslim.compress.replace import linear_types, nearest_names, select_modules, skipped_change, tied_parameters
from edgeslim.core.errors import ConfigError, require
from edgeslim.core.onnx_io import dims_for
from edgeslim.core.specs import TensorSpec, example_feeds

NNCF_MODES = {"int8": "int8_asym", "int8_sym": "int8_sym", "int4": "int4_asym", "int4_sym": "int4_sym"}
HOOKS = "__nncf_hooks"
GRID_NOTE = ("int4_min: the artifact keeps fp32 weights on the grid (bytes_after counts the integers); "
             "`export --kv-cache` writes the integers (MatMulNBits)")
ONNX_NOTE = ("export constant-folds the decompression: the ONNX file holds dequantized fp32 weights (a causal LM's "
             "`export --kv-cache` keeps the integers: MatMulNBits)")


@dataclass(frozen=True)
class WeightQuantConfig(TargetConfig):
    """Weight-only quantization settings (see nncf.compress_weights); excluded layers stay fp32."""

    # int8/int4: asymmetric (integer zero point, NNCF); int4_min: a float minimum per block (GGUF Q4_1's
    # grid, compress/block_quant.py), embeddings and LM head on int8 blocks (Q8_0)
    mode: Literal["int8", "int8_sym", "int4", "int4_sym", "int4_min"] = "int8"
    group_size: int = 64  # int4: input weights sharing one scale (-1: per output channel); int8 is per channel
    all_layers: bool = False  # int4: also the embeddings and last linear map (NNCF keeps them int8 by default)

    def validate(self) -> None:
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"group_size must be a positive integer or -1 (per channel), got {self.group_size}")
        if self.mode == "int4_min" and self.all_layers:
            raise ConfigError("all_layers applies to NNCF's int4 modes; int4_min keeps the embeddings and the LM head "
                              "on int8 blocks (GGUF Q8_0)")


def _nncf():
    return require("nncf", "quantize", "weight-only quantization")


def _candidates() -> tuple[type[nn.Module], ...]:
    """Module types whose weight NNCF compresses and `target` / `exclude` choose among."""
    return (*linear_types(), nn.Embedding)


def _kept_fp32(model: nn.Module, config: WeightQuantConfig) -> dict[str, str]:
    """{module: why} for the layers that stay fp32: not selected, or sharing a weight with one that is not.

    Raises:
        ConfigError: the selection is empty (select_modules), or `exclude` leaves nothing out
            (a regex matches the whole dotted name: '.*lm_head', or a list of suffixes ["lm_head"]).
    """
    if config.target is None and config.exclude is None:
        return {}
    names = [n for n, _ in select_modules(model, None, None, types=_candidates())]
    targeted = {n for n, _ in select_modules(model, config.target, None, types=_candidates())}
    chosen = {n for n, _ in select_modules(model, config.target, config.exclude, types=_candidates())}
    if config.exclude is not None and chosen == targeted:
        raise ConfigError(f"exclude={config.exclude!r} matches no layer wq quantizes (a string is a regex matched "
                          f"against the whole dotted name, e.g. '.*lm_head'; a list holds names or dotted "
                          f"suffixes); nearest names: {nearest_names(config.exclude, names, 3)}")
    kept = {n: "excluded" if n in targeted else "not in target" for n in names if n not in chosen}
    tied = tied_parameters(model)
    for name in list(kept):
        for other in tied.get(f"{name}.weight", []):
            owner = other.rsplit(".", 1)[0]
            if owner != name and owner in chosen:
                kept[owner] = f"weight tied to {name}, which stays fp32"
    return kept


def _checked(model: nn.Module, config: WeightQuantConfig) -> tuple[dict[str, str], int | None]:
    """(layers kept fp32, int4 group size or None): the data-free checks every mode shares."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"wq quantizes the weights of linear maps (nn.Linear); {type(model).__name__} has none")
    kept = _kept_fp32(model, config)
    linears = [(n, m) for n, m in linears if n not in kept]
    if not linears:
        raise ConfigError(f"target/exclude leave no linear map to quantize (kept fp32: {sorted(kept)[:5]})")
    int4 = config.mode.startswith("int4")
    group = config.group_size if int4 and config.group_size != -1 else None
    if group is not None:
        bad = [(n, m.in_features) for n, m in linears if m.in_features % group]
        if bad:
            common = math.gcd(*(m.in_features for _, m in linears))
            raise ConfigError(f"group_size={group} does not divide the input dimension of layer '{bad[0][0]}' "
                              f"({bad[0][1]} inputs; {len(bad)} layer(s) in all): use a divisor of {common} "
                              "or group_size=-1 (per channel)")
    return kept, group


def _plan(model: nn.Module, config: WeightQuantConfig) -> dict[str, Any]:
    """The data-free decisions: NNCF mode and group size, checked against every quantized linear map,
    and the layers kept fp32."""
    kept, group = _checked(model, config)
    int4 = config.mode.startswith("int4")
    return {"nncf_mode": NNCF_MODES[config.mode], "group_size": group if int4 else None,
            "all_layers": bool(config.all_layers and int4), "fp32": kept,
            "nncf_version": _nncf().__version__}


def _apply(model: nn.Module, plan: Mapping[str, Any], inputs: Sequence[TensorSpec]) -> nn.Module:
    """nncf.compress_weights on `model` (in place), traced with example inputs; NNCF's log kept quiet."""
    nncf = _nncf()
    if not inputs:
        raise ConfigError("wq needs the model's input spec to trace it: pass CompressContext(inputs=...) "
                          "(the pipeline does)")
    feeds = {k: torch.from_numpy(v) for k, v in example_feeds(list(inputs), dims_for(list(inputs)), seed=0).items()}
    kwargs: dict[str, Any] = {}
    if plan["nncf_mode"].startswith("int4"):
        kwargs = {"ratio": 1.0, "group_size": plan["group_size"] or -1, "all_layers": plan["all_layers"]}
    if plan.get("fp32"):
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=_op_nodes(model, feeds, plan["fp32"]), validate=False)
    log = logging.getLogger("nncf")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            return nncf.compress_weights(model.eval(), mode=nncf.CompressWeightsMode(plan["nncf_mode"]),
                                         dataset=nncf.Dataset([feeds]), **kwargs)
    finally:
        log.setLevel(level)


def _op_nodes(model: nn.Module, feeds: Mapping[str, torch.Tensor], modules: Sequence[str]) -> list[str]:
    """The NNCF graph nodes that read the weights of `modules` (NNCF's ignored scope for them). Found by the
    weight each op reads, not by name: NNCF's op names drop ModuleList indices ("encoder/attention/.../linear/1"
    for layer 1), so a module's dotted name does not spell them."""
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph
    graph = build_nncf_graph(model, dict(feeds))
    weights = {f"{m}.weight" for m in modules}
    return sorted({n.node_name for n in graph.get_all_nodes()
                   if any(e.from_node.node_name in weights for e in graph.get_input_edges(n))})


def decompressors(model: nn.Module) -> dict[str, nn.Module]:
    """NNCF's weight decompressor of each quantized parameter, by the parameter's dotted name."""
    if HOOKS not in dict(model.named_children()):
        return {}
    out = {}
    for key, hooks in model.get_submodule(HOOKS).post_hooks.items():
        param = key.rsplit("__", 1)[0].replace(":", ".")
        out[param] = next(iter(hooks.values()))
    return out


def _layout(model: nn.Module) -> dict[str, str]:
    """Quantized parameter -> decompressor type: the structure replay must rebuild."""
    return {name: type(d).__name__ for name, d in sorted(decompressors(model).items())}


def _nbytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def _changes(original: nn.Module, quantized: nn.Module) -> list[LayerChange]:
    """One row per quantized weight: bytes before (fp32 weight + bias) and after (integer weight, scales,
    zero points, bias), and the relative error of the dequantized weight."""
    before = dict(original.named_parameters(remove_duplicate=False))
    ties: dict[int, list[str]] = {}
    for name, p in before.items():
        ties.setdefault(id(p), []).append(name.rsplit(".", 1)[0])
    rows = []
    for param, dec in sorted(decompressors(quantized).items()):
        owner = param.rsplit(".", 1)[0]
        w, stored = before[param], quantized.get_parameter(param)
        bias = getattr(quantized.get_submodule(owner), "bias", None)
        bias_bytes = _nbytes([bias]) if isinstance(bias, torch.Tensor) else 0
        with torch.no_grad():
            deq = dec(stored).reshape(w.shape).float()
            err = float(torch.linalg.vector_norm(deq - w) / torch.linalg.vector_norm(w).clamp_min(1e-30))
        mode = type(dec).__name__.removesuffix("WeightsDecompressor")  # e.g. INT4Asymmetric
        group = _group_size(dec, w)
        shape = "per channel" if group is None else f"groups of {group}"
        tied = [t for t in ties[id(w)] if t != owner]
        params = w.numel() + (bias.numel() if isinstance(bias, torch.Tensor) else 0)
        rows.append(LayerChange(
            owner, f"{type(quantized.get_submodule(owner)).__name__} -> {mode} weights ({shape})", params, params,
            status="quantized", bytes_before=_nbytes([w]) + bias_bytes,
            bytes_after=_nbytes([stored, *dec.buffers()]) + bias_bytes, rel_error=err,
            note="; ".join([ONNX_NOTE] + ([f"weight tied to {', '.join(tied)}"] if tied else []))))
    return rows


def _group_size(dec: nn.Module, weight: torch.Tensor) -> int | None:
    """The group size of a decompressor (inputs per scale), None when its scales are per output channel."""
    per_row = dec.get_buffer("_scale").numel() // weight.shape[0]
    return None if per_row <= 1 else weight[0].numel() // per_row


@register
class WeightQuant(Compressor):
    """Weight-only INT8 (per channel) / INT4 (per group) of every linear map; activations stay fp32."""

    name, Config, kind = "wq", WeightQuantConfig, "quantized"
    ends_torch_steps = True

    def compress(self, model: nn.Module, config: WeightQuantConfig, calib: CalibData | None = None,
                 inplace: bool = False, context: CompressContext | None = None) -> CompressResult:
        config = self.make_config(config)
        if config.mode == "int4_min":
            return self._compress_grid(model, config, inplace)
        if decompressors(model):
            raise ConfigError("this model's weights are already quantized by NNCF (a wq step): apply wq once")
        # the rows compare against the fp32 weights, which quantizing in place overwrites
        original = copy.deepcopy(model) if inplace else model
        model = working_copy(model, inplace)
        plan = _plan(model, config)
        model = _apply(model, plan, context.inputs if context else ())
        changes = _changes(original, model)
        if not changes:
            raise ConfigError("NNCF quantized no weight of this model (no nn.Linear it could trace)")
        leaked = sorted(c.name for c in changes if c.name in plan["fp32"])
        if leaked:
            raise ConfigError(f"NNCF quantized {leaked[:5]} although they are to stay fp32 (their weight is "
                              "reached by another operation than the module's own)")
        before, after = sum(c.bytes_before for c in changes), sum(c.bytes_after for c in changes)
        resolved = {**plan, "layers": _layout(model), "bytes_before": before, "bytes_after": after,
                    "size_ratio": after / before, "onnx_note": ONNX_NOTE}
        kept = [skipped_change(n, original.get_submodule(n), f"kept fp32 ({why})") for n, why in plan["fp32"].items()]
        return self.result(model, config, changes + kept, resolved)

    def _compress_grid(self, model: nn.Module, config: WeightQuantConfig, inplace: bool) -> CompressResult:
        """int4_min: the weights snapped onto GGUF's grids (compress/block_quant.py), one row per weight."""
        original = copy.deepcopy(model) if inplace else model
        model = working_copy(model, inplace)
        kept, group = _checked(model, config)
        layers = grid_layers(model, kept)
        ints = snap(model, layers, group)
        owners = {id(p): n.rsplit(".", 1)[0] for n, p in original.named_parameters()}
        changes = []
        for name, iw in ints.items():
            w = original.get_parameter(name)
            err = float(torch.linalg.vector_norm(iw.dense().reshape(w.shape) - w.detach().float())
                        / torch.linalg.vector_norm(w.detach().float()).clamp_min(1e-30))
            stored = iw.q.numel() * iw.bits // 8 + _nbytes([iw.scale]) + \
                (iw.offset_q.numel() + _nbytes([iw.offset_scale]) if iw.offset is not None else 0)
            grid = layers[name]
            shape = "per row" if iw.scale.shape[1] == 1 else f"blocks of {w.shape[1] // iw.scale.shape[1]}"
            changes.append(LayerChange(owners[id(w)], f"{type(original.get_submodule(owners[id(w)])).__name__} -> "
                                       f"{grid} weights ({shape})", w.numel(), w.numel(), status="quantized",
                                       bytes_before=_nbytes([w]), bytes_after=stored, rel_error=err, note=GRID_NOTE))
        before, after = sum(c.bytes_before for c in changes), sum(c.bytes_after for c in changes)
        resolved = {"grid": layers, "group_size": group, "fp32": kept, "bytes_before": before, "bytes_after": after,
                    "size_ratio": after / before, "onnx_note": GRID_NOTE}
        kept_rows = [skipped_change(n, original.get_submodule(n), f"kept fp32 ({why})") for n, why in kept.items()]
        return self.result(model, config, changes + kept_rows, resolved)

    def replay(self, model: nn.Module, resolved: Mapping[str, Any], inputs: Sequence[TensorSpec]) -> nn.Module:
        """Re-apply the recorded quantization (data-free, deterministic) so the stored weights load."""
        if "grid" in resolved:  # int4_min: fp32 weights on the grid, the structure unchanged
            names = dict(model.named_parameters())
            missing = [n for n in resolved["grid"] if n not in names]
            if missing:
                raise ValueError(f"the recorded int4_min weights are not in this model: {missing[:5]}")
            return model
        model = _apply(model, resolved, inputs)
        if _layout(model) != dict(resolved["layers"]):
            raise ValueError("the rebuilt weight quantization differs from the recorded one (another model or "
                             f"NNCF than {resolved['nncf_version']}): {sorted(_layout(model))[:5]}")
        return model


def integer_weights(model: nn.Module, resolved: Mapping[str, Any] | None = None) -> dict[str, IntegerWeight]:
    """Every quantized weight of `model` (a wq step's output, whose record is `resolved`) as an
    IntegerWeight, by parameter name: NNCF's integers, or (int4_min) the grid read back from the weights.

    Raises:
        ConfigError: a decompressor type this reading does not know (another NNCF than the tested one).
    """
    if resolved and "grid" in resolved:
        return integers(model, resolved["grid"], resolved["group_size"])
    from nncf.torch.quantization.layers import unpack_uint4
    out = {}
    for name, dec in decompressors(model).items():
        stored = model.get_parameter(name).detach()
        kind = type(dec).__name__
        scale = dec.get_buffer("_scale").detach().float()
        if kind.startswith("INT4"):
            q = unpack_uint4(stored).reshape(dec.compressed_weight_shape)  # [N, G, group]
            if kind == "INT4AsymmetricWeightsDecompressor":
                zero = unpack_uint4(dec.get_buffer("_zero_point")).reshape(dec.zero_point_shape)
            elif kind == "INT4SymmetricWeightsDecompressor":
                zero = torch.full_like(scale, 8, dtype=torch.uint8)  # unpack_int4 is unpack_uint4 - 8
            else:
                raise ConfigError(f"unknown NNCF decompressor {kind} for {name}")
            n, groups = q.shape[0], q.shape[1]
            out[name] = IntegerWeight(q.reshape(n, -1).to(torch.uint8), scale.reshape(n, groups),
                                      zero.reshape(n, groups).to(torch.uint8), 4)
        elif kind == "INT8AsymmetricWeightsDecompressor":
            out[name] = IntegerWeight(stored.to(torch.uint8), scale.reshape(stored.shape[0], -1),
                                      dec.get_buffer("_zero_point").detach().reshape(stored.shape[0], -1).to(torch.uint8), 8)
        elif kind == "INT8SymmetricWeightsDecompressor":
            q = (stored.to(torch.int16) + 128).to(torch.uint8)
            out[name] = IntegerWeight(q, scale.reshape(stored.shape[0], -1),
                                      torch.full((stored.shape[0], 1), 128, dtype=torch.uint8), 8)
        else:
            raise ConfigError(f"unknown NNCF decompressor {kind} for {name}")
    return out


def dequantized(model: nn.Module, resolved: Mapping[str, Any] | None = None
                ) -> tuple[nn.Module, dict[str, IntegerWeight]]:
    """A plain copy of a wq model (no NNCF hooks) whose quantized weights are fp32 again, computed from
    their integers (`IntegerWeight.dense`), and those integers by parameter name. Tied weights stay tied.
    `resolved`: the wq step's record (int4_min names each weight's grid there)."""
    ints = integer_weights(model, resolved)
    copy_ = copy.deepcopy(model)
    for attr in ("forward", "_replicate_for_data_parallel"):
        copy_.__dict__.pop(attr, None)  # NNCF's wrap_model sets them on the instance
    copy_._modules.pop(HOOKS, None)
    for name, iw in ints.items():
        owner, _, leaf = name.rpartition(".")
        module = copy_.get_submodule(owner)
        shape = tuple(module.weight.shape) if isinstance(module, nn.Linear) and module.weight.dtype.is_floating_point \
            else None
        dense = iw.dense()
        if shape is not None and dense.shape != shape:
            raise ValueError(f"{name}: integers of shape {tuple(dense.shape)} for a weight of shape {shape}")
        setattr(module, leaf, nn.Parameter(dense, requires_grad=False))
    tied = tied_parameters(model)
    for name in ints:  # a weight shared with others (an LM head tied to the embedding): the others follow
        for other in tied.get(name, []):
            if other != name:
                owner, _, leaf = other.rpartition(".")
                setattr(copy_.get_submodule(owner), leaf, copy_.get_parameter(name))
    return copy_.eval(), ints
