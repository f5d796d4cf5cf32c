"""The search space of `edgeslim optimize`: whole-model stages, and per-layer low-rank options on each.

A candidate is a list of recipe steps in the pipeline's step order: pruning first (it changes the shapes
later steps see), then low-rank factorization of single linear maps (asvd: one step per rank, each
targeting its layers by name), then INT8 (an ONNX-level stage, last) or weight-only quantization (wq,
last: its weights are no longer float). Three kinds of choices:
- **stages**, whole-model choices of a family (a pruning ratio, INT8, wq int8/int4): every product of
  them (a `Combo`) is really applied to the source, exported and timed on the target beside the
  original (so INT8 kernels are timed, never assumed), and its task-loss change measured on the
  calibration data;
- **per-layer ranks** (asvd) on each combo's model, each with its measured GEMM times on the target
  (`LayerTimes`: the target's GEMM table) and its estimated loss change: the layer's loss-measured
  sensitivity (compress/sensitivity.py, one probe of every layer alone on the original) per unit of its
  relative weighted squared error, times that error at the rank (`LayerSpectrum.error_at`).
- **per-weight precision** of a wq stage alone under a size budget (optimize_precision): each weight
  quantized or left fp32, with its bytes both ways and its loss change (Fisher's estimate with class or
  next-token targets, else measured with it alone quantized);
- **per-op precision** of an INT8 stage alone under a time budget (optimize_int8): each Conv / MatMul / Gemm
  INT8 or left fp32, with its share of the stage's measured time saving and its measured loss change.
A family that cannot apply to the model (no linear map, a runtime without INT8 kernels, no gain on the
budget's axis) is left out with the reason (`Space.skipped`).
"""
from __future__ import annotations

import dataclasses
import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from edgeslim.compress.base import CompressContext, get_compressor
from edgeslim.compress.lowrank_budget import LayerSpectrum, weigh
from edgeslim.compress.lowrank_latency import LayerTimes, gemm_rows
from edgeslim.compress.lowrank_layer import weighted_svd
from edgeslim.compress.replace import linear_view, select_linear_maps
from edgeslim.compress.sensitivity import LossProfile, mean_loss, profile_lowrank
from edgeslim.compress.train import teacher_targets
from edgeslim.core.calib import CalibData
from edgeslim.core.errors import ConfigError, EdgeslimError
from edgeslim.core.progress import say
from edgeslim.loaded import LoadedModel
from edgeslim.optimize_int8 import Timing, int8_layers
from edgeslim.optimize_precision import PrecisionLayer, precision_layers

FAMILIES = ("asvd", "prune", "int8", "wq")
PRUNE_KEPT = (0.75, 0.5)  # pruning stages: kept fraction of the prunable groups' parameters
WQ_MODES = ("int8", "int4")  # weight-only stages (a --size-mb budget)
PROBE_RATIO = 0.5  # the uniform asvd probe the loss-measured sensitivities are taken at
LOWRANK = "asvd"  # the low-rank family the per-layer ranks come from (activation-aware SVD)
# the step option that names what a precision mix keeps fp32; int8's fp32_ops reverts the ops after NNCF's
# placement, as optimize_int8 scored each one (NNCF's `ignored` moves other quantizers: EfficientNet-Lite0)
KEPT_FP32 = {"wq": "exclude", "int8": "fp32_ops"}


@dataclass(frozen=True)
class Stage:
    """One whole-model choice of a family, as the recipe step that applies it."""

    family: str
    label: str  # e.g. "prune 0.75", "int8"
    step: Mapping[str, Any]


@dataclass
class Combo:
    """A product of stages applied to the source, measured: its model, time or size, loss change, and the
    per-layer low-rank options on it."""

    stages: tuple[Stage, ...]
    loaded: LoadedModel  # the model after the torch-level stages (pruning; wq)
    cost: float = 0.0  # measured: p50 ms on the target (speed budgets) or weight bytes (size budget)
    dense_cost: float = 0.0  # ms of the same torch model without INT8 (what the GEMM table's times add up to)
    loss: float = 0.0  # task-loss change on the calibration data against the original
    layers: list[LayerTimes] = field(default_factory=list)  # asvd options (speed budgets)
    spectra: list[LayerSpectrum] = field(default_factory=list)  # asvd options (all budgets)
    precision: list[PrecisionLayer] = field(default_factory=list)  # fp32 options: a wq stage's weights, int8's ops

    @property
    def label(self) -> str:
        return " + ".join(s.label for s in self.stages) or "dense"

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(s.family for s in self.stages)

    def steps(self, ranks: Mapping[str, int | None], calib: str, align: int, fp32: Sequence[str] = ()
              ) -> list[dict[str, Any]]:
        """The recipe steps of this combo with `ranks` (None: dense) of asvd, in the pipeline's step order; `fp32`:
        the modules its wq stage (the ONNX ops its int8 stage) leaves fp32."""
        by_rank: dict[int, list[str]] = {}
        for name, rank in ranks.items():
            if rank is not None:
                by_rank.setdefault(int(rank), []).append(name)
        lowrank = [{"method": LOWRANK, "rank": r, "target": sorted(names), "align": align, "calib": calib}
                   for r, names in sorted(by_rank.items())]
        first = [dict(s.step) for s in self.stages if s.family == "prune"]
        last = [dict(s.step) | ({KEPT_FP32[s.family]: list(fp32)} if fp32 and s.family in KEPT_FP32 else {})
                for s in self.stages if s.family != "prune"]
        return first + lowrank + last


@dataclass
class Space:
    """Every measured combo, the original's cost, and the families left out (family -> why)."""

    combos: list[Combo]
    base_cost: float
    skipped: dict[str, str]
    profile: LossProfile | None
    align: int


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (what a --size-mb budget counts)."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def bytes_per_weight(model: torch.nn.Module) -> float:
    """Stored bytes per stored number (4 for fp32; about 1 after wq int8, 0.5 after int4): what one parameter
    that a smaller rank removes saves in a --size-mb budget."""
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    return weight_bytes(model) / max(sum(t.numel() for t in tensors), 1)


def stage_options(loaded: LoadedModel, families: Sequence[str], axis: str, runtime: str, calib: str
                  ) -> tuple[list[list[Stage]], dict[str, str]]:
    """The stages of each family that applies on the budget's `axis` ("ms" or "bytes"), and why the others
    do not. Each inner list holds one family's alternatives (the combo takes at most one of them)."""
    skipped: dict[str, str] = {}
    groups: list[list[Stage]] = []
    if "asvd" in families and not select_linear_maps(loaded.model)[0]:
        skipped["asvd"] = "the model has no linear map to factor"
    if "prune" in families:
        groups.append([Stage("prune", f"prune {r:g}", {"method": "prune", "ratio": r}) for r in PRUNE_KEPT])
    if "int8" in families:
        if axis != "ms":
            skipped["int8"] = "INT8 lives in the exported graph: the model's stored weights keep their size"
        elif runtime != "onnxruntime":
            skipped["int8"] = f"INT8 runs as ONNX Runtime kernels; the target's runtime is {runtime}"
        else:
            groups.append([Stage("int8", "int8", {"method": "int8", "calib": calib})])
    if "wq" in families:
        if axis == "ms":
            skipped["wq"] = ("weight-only quantization saves size, not time, on an ONNX target: the export folds "
                             "its weights back to fp32 (compress/weight_quant.py)")
        elif not select_linear_maps(loaded.model)[0]:
            skipped["wq"] = "the model has no linear map to quantize"
        else:
            groups.append([Stage("wq", f"wq {m}", {"method": "wq", "mode": m}) for m in WQ_MODES])
    return groups, skipped


def combos_of(groups: Sequence[Sequence[Stage]]) -> list[tuple[Stage, ...]]:
    """Every product of at most one stage per family (the empty product first: the dense model)."""
    choices = [[None, *g] for g in groups]
    return [tuple(s for s in pick if s is not None) for pick in itertools.product(*choices)]


def lowrank_spectra(loaded: LoadedModel, calib: CalibData, profile: LossProfile | None, align: int
                    ) -> list[LayerSpectrum]:
    """asvd's weighted spectrum of every linear map of `loaded`, scaled so that error_at(rank) is the estimated
    task-loss change at that rank (the loss profile's scale per unit of relative weighted squared error)."""
    comp = get_compressor(LOWRANK)
    cfg = comp.make_config({"ratio": PROBE_RATIO, "align": align})
    chosen = select_linear_maps(loaded.model, cfg.target, cfg.exclude)[0]
    stats = comp.collect(loaded.model, calib, [n for n, _ in chosen], cfg)
    out = []
    for name, module in chosen:
        view = linear_view(module)
        row, col, _ = comp.weighting(name, module, cfg, stats)
        norm = max(float(weigh(view.weight, row, col).square().sum()), 1e-300)
        scale = (profile.scale(name) if profile is not None else 1.0) / norm
        energy = weighted_svd(view.weight, row, col).s.square()
        out.append(LayerSpectrum(name, view.out_features, view.in_features,
                                 0 if view.bias is None else view.out_features, energy, scale))
    return out


def build_combo(loaded: LoadedModel, stages: tuple[Stage, ...], profile_name: str, folder: Path | None) -> tuple[
        LoadedModel, Path | None]:
    """Apply the stages (pipeline.apply_steps) and export the result with its ONNX stages into `folder` (None:
    no export, a size budget times nothing)."""
    from edgeslim.pipeline import apply_steps, export_model

    current, _ = apply_steps(loaded, [dict(s.step) for s in stages], quiet=True, profile=profile_name)
    if folder is None:
        return current, None
    path = folder / f"combo{len(list(folder.iterdir()))}.onnx"
    export_model(current, "onnx", path, profile_name, quiet=True)
    return current, path


def build_space(loaded: LoadedModel, calib: CalibData, calib_spec: str, measure: Any, profile_name: str,
                runtime: str, families: Sequence[str], axis: str, context: CompressContext, explicit: bool = False,
                known: Mapping[str, tuple[float, float]] | None = None,
                known_precision: Mapping[str, Sequence[Sequence[Any]]] | None = None) -> Space:
    """Apply and measure every combo of the families' stages, and the per-layer asvd options on each.

    `known`: combo label -> (cost, loss) measured by an earlier run of the same search (resumed: not measured
    again, so that its estimates, and so its candidates, are the same); `known_precision`: combo label -> its
    PrecisionLayer fields, likewise.

    Raises:
        ConfigError: a family the user named explicitly (`explicit`) cannot apply (named, with why), or none can.
    """
    known = known or {}
    groups, skipped = stage_options(loaded, families, axis, runtime, calib_spec)
    _refuse_skipped(loaded, skipped, explicit)
    align = int(context.align or 1)
    data = calib if calib.targets is not None else teacher_targets(loaded.model, calib)
    base_loss = mean_loss(loaded.model.eval(), data.head(2))
    built: list[tuple[Combo, Path]] = []
    with tempfile.TemporaryDirectory(prefix="edgeslim-optimize-") as tmp:
        from edgeslim.pipeline import export_model, runnable
        folder = Path(tmp) if axis == "ms" else None
        if folder is not None:
            export_model(loaded, "onnx", folder / "original.onnx", profile_name, quiet=True)
        built.append((Combo((), loaded), Path(tmp) / "original.onnx"))
        broken: dict[str, str] = {}  # stage label -> why it cannot apply to this model
        for stages in combos_of(groups)[1:]:
            if {s.family for s in stages} & set(skipped) or any(s.label in broken for s in stages):
                continue
            try:
                current, path = build_combo(loaded, stages, profile_name, folder)
            except EdgeslimError as exc:  # a stage (or product) that cannot apply to this model is left out
                why = " ".join(str(exc).split())
                if len(stages) == 1:
                    broken[stages[0].label] = why
                else:
                    say(f"{' + '.join(s.label for s in stages)} left out: {why}")
                continue
            built.append((Combo(stages, current), path))
        for group in groups:  # a family none of whose stages applies is left out, with the first one's why
            if all(s.label in broken for s in group):
                skipped[group[0].family] = broken[group[0].label]
            for stage in (s for s in group if s.label in broken and group[0].family not in skipped):
                say(f"stage {stage.label} left out: {broken[stage.label]}")
        combos = [c for c, _ in built if not {s.family for s in c.stages} & set(skipped)]
        paths = [p for c, p in built if not {s.family for s in c.stages} & set(skipped)]
        if all(c.label in known for c in combos):  # a resumed search: the combos as measured before
            for combo in combos:
                combo.cost, combo.loss = known[combo.label]
        else:
            if axis == "ms":
                say(f"timing the original and {len(combos) - 1} whole-model stage combinations side by side on "
                    "the target")
                times = measure.files_ms(paths, loaded.inputs, context.dims)
            for i, combo in enumerate(combos):
                combo.cost = times[i] if axis == "ms" else float(weight_bytes(combo.loaded.model))
                combo.loss = 0.0 if i == 0 else mean_loss(runnable(combo.loaded), data.head(2)) - base_loss
        _refuse_skipped(loaded, skipped, explicit)
        set_dense_costs(combos)
        if axis == "ms":
            _int8_precision(combos, paths, data.head(2), known_precision or {},
                            lambda files: measure.files_ms(files, loaded.inputs, context.dims))
    if axis == "bytes":
        fisher: dict[str, torch.Tensor] = {}  # shared by the wq stages (the same weights at other precisions)
        for combo in combos:  # a wq stage alone: which weights could stay fp32, at what loss each
            if combo.families == ("wq",) and combo.label in (known_precision or {}):
                combo.precision = [PrecisionLayer(*row) for row in known_precision[combo.label]]
            elif combo.families == ("wq",):
                combo.precision = precision_layers(loaded.model, combo.loaded.model, data.head(2), combo.label, fisher)
    profile = None
    if "asvd" in families and "asvd" not in skipped:
        profile = _lowrank_profile(loaded, calib, context)
        shared: dict[tuple[str, ...], list[LayerSpectrum]] = {}
        for combo in combos:
            key = tuple(s.label for s in combo.stages if s.family == "prune")
            if key not in shared:
                shared[key] = lowrank_spectra(combo.loaded, calib, profile, align)
            combo.spectra = shared[key]
            if axis == "ms":
                rows = gemm_rows(combo.loaded.model, [s.name for s in combo.spectra], context)
                combo.layers = [LayerTimes(s, rows[s.name], measure) for s in combo.spectra]
    if len(combos) == 1 and not combos[0].spectra:
        raise ConfigError("no compression family applies to this model: " +
                          "; ".join(f"{f}: {why}" for f, why in skipped.items()))
    return Space(combos, combos[0].cost, skipped, profile, align)


def set_dense_costs(combos: Sequence[Combo]) -> None:
    """Each combo's dense_cost: the cost of the fp32 torch model its INT8 stage quantizes, the same stages
    without int8 (keyed by the stages themselves: prune 0.75 and prune 0.5 are one family, two models)."""
    torch_level = {tuple(s.label for s in c.stages): c for c in combos}
    for combo in combos:
        combo.dense_cost = torch_level[tuple(s.label for s in combo.stages if s.family != "int8")].cost


def _int8_precision(combos: Sequence[Combo], paths: Sequence[Path], data: CalibData,
                    known: Mapping[str, Sequence[Sequence[Any]]], timing: Timing) -> None:
    """An INT8 stage alone that is faster than the original: which ops could stay fp32, at what loss and time
    each (optimize_int8; `known`: as measured by an earlier run of the search; `timing`: files -> p50 ms on the
    target). `paths`: each combo's export, the original's first."""
    for combo, path in zip(combos, paths):
        if combo.families != ("int8",) or combo.cost >= combo.dense_cost:
            continue
        if combo.label in known:
            combo.precision = [PrecisionLayer(*row) for row in known[combo.label]]
            continue
        resolved = next(s.get("resolved", {}) for s in combo.loaded.steps if s["method"] == "int8")
        combo.precision = int8_layers(paths[0], path, resolved, data, combo.dense_cost - combo.cost, timing)


def _refuse_skipped(loaded: LoadedModel, skipped: Mapping[str, str], explicit: bool) -> None:
    """A family the user named that cannot apply is an error (named, with why); a default one is left out."""
    if explicit and skipped:
        family, why = next(iter(skipped.items()))
        raise ConfigError(f"family '{family}' cannot apply to {loaded.source.identifier}: {why}")


def _lowrank_profile(loaded: LoadedModel, calib: CalibData, context: CompressContext) -> LossProfile:
    """asvd's loss-measured sensitivities on the original (each layer factored alone at the uniform probe)."""
    comp = get_compressor(LOWRANK)
    cfg = comp.make_config({"ratio": PROBE_RATIO})
    names = [n for n, _ in select_linear_maps(loaded.model, cfg.target, cfg.exclude)[0]]
    stats = comp.collect(loaded.model, calib, names, cfg)
    return profile_lowrank(comp, loaded.model, stats, calib.head(1), cfg, progress=False,
                           context=dataclasses.replace(context, measure=None))
