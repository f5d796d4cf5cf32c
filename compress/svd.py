"""Low-rank factorization of linear maps (nn.Linear, GPT-2's Conv1D): plain, Fisher-weighted and
activation-aware SVD.

All three solve min ||L (W - A B) R||_F over rank-r factors A (m x r), B (r x n) for a weighting L
(rows) and R (columns): take the SVD of L W R, truncate it, and undo the weighting on the factors
(A = L^-1 U_r S_r^1/2, B = S_r^1/2 V_r^T R^-1): the layer and the weighted SVD are in
lowrank_layer.py; this module holds the three families' configs, weightings and rank decisions.
- svd: L = R = I.
- fwsvd (Hsu et al., "Language model compression with weighted low-rank factorization", ICLR 2022,
  Sec. 3, row-wise simplification): L = diag(sqrt(I_i)) with I_i the empirical Fisher summed over row i.
- asvd: R whitens the layer's inputs so the error is measured on real activations,
  ||(W - W') X||_F = ||(W - W') C^1/2||_F (Cholesky of the damped input second moment, SVD-LLM,
  Wang et al. 2024, Sec. 3.1), or scales columns by mean |x|^alpha (ASVD, Yuan et al. 2023, Sec. 3.2).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Mapping, Sequence

import torch
from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.compress.base import (BudgetConfig, CompressContext, CompressResult, Compressor, LayerChange,
                                    ProfiledBudgetConfig, StatsRequest, register, working_copy)
from edgeslim.compress.statistics import CalibStats, collect_stats
from edgeslim.compress.lowrank_budget import LayerSpectrum, allocate, dense_note, weigh
from edgeslim.compress.lowrank_layer import LowRankLinear, WeightedSVD, damped_cholesky, weighted_svd
from edgeslim.compress.lowrank_latency import (LayerTimes, allocate_latency, fastest_speedup, gemm_rows, reaim,
                                               timing_note)
from edgeslim.compress.replace import (linear_types, linear_view, recorded_module, select_linear_maps, set_submodule,
                                       skipped_change)
from edgeslim.compress.sensitivity import LossProfile, compress_by_loss, profile_lowrank
from edgeslim.core.errors import ConfigError
from edgeslim.core.specs import TensorSpec
from edgeslim.core.progress import say

OVERSHOOT = 1.05  # a measured speedup up to this factor above the one asked ends the re-aiming (more costs error)
RETARGET_ROUNDS = 4  # timings of the factored model per speedup budget (each: one ONNX export, timed beside the original)


@dataclass(frozen=True)
class LowRankConfig(ProfiledBudgetConfig):
    """What svd, fwsvd and asvd share beyond ProfiledBudgetConfig (allocation = "loss",
    compress/sensitivity.py): speedup budgets (lowrank_latency.py)."""

    latency_budget: ClassVar[bool] = True


@dataclass(frozen=True)
class SVDConfig(LowRankConfig):
    """Plain truncated SVD; the budget forms are those of BudgetConfig, and speedup (lowrank_latency.py)."""


@dataclass(frozen=True)
class FWSVDConfig(LowRankConfig):
    """Fisher-weighted SVD (Hsu et al., ICLR 2022)."""

    floor: float = 1e-6  # rows with less Fisher than floor * mean row Fisher are raised to it
    # "output": Gauss-Newton diagonal of the model's outputs (label-free, every sample weighs alike);
    # "task": the paper's empirical Fisher of the task loss on the calibration targets, dominated by
    # the few samples a fitted model gets wrong when each sample is one label (bench/fwsvd_why.py);
    # "auto": "task" when each sample's target holds many losses (next tokens, pixels), else "output"
    fisher_loss: Literal["auto", "output", "task"] = "auto"

    def validate(self) -> None:
        super().validate()
        if not self.floor > 0.0:
            raise ConfigError(f"fwsvd floor must be > 0, got {self.floor}")


@dataclass(frozen=True)
class ASVDConfig(LowRankConfig):
    """Activation-aware SVD: whiten by the input second moment, or scale columns by mean |x|^alpha;
    "kfac" whitens the output side too, by the second moment of the gradient there."""

    # "whiten": Cholesky of damped E[x x^T] | "scale": diag(mean |x|)^alpha | "kfac": both sides, the
    # Kronecker factors E[x x^T] and E[g g^T] of the output's Gauss-Newton matrix (one backward pass
    # per calibration batch and probe more)
    mode: Literal["whiten", "scale", "kfac"] = "whiten"
    damping: float = 1e-2  # added to the diagonals, relative to their mean, so the Cholesky factors exist
    alpha: float = 0.5  # exponent of the column scaling in "scale" mode
    draws: int = 1  # "kfac": random probes of the output per calibration sample (each one more backward pass)

    def validate(self) -> None:
        super().validate()
        if not self.damping > 0.0:
            raise ConfigError(f"asvd damping must be > 0, got {self.damping}")
        if self.draws < 1:
            raise ConfigError(f"asvd draws must be a positive integer, got {self.draws}")


class _LowRankCompressor(Compressor):
    """Shared flow: select Linears, (weighted) SVD each, allocate ranks globally, replace."""

    def weighting(self, name: str, linear: nn.Module, config: BudgetConfig, stats: CalibStats | None
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """(row_weight, col_factor, scale of the energy for global allocation) of one linear map."""
        return None, None, 1.0

    def collect(self, model: nn.Module, calib: CalibData, names: list[str], config: BudgetConfig) -> CalibStats:
        """The calibration statistics this method's weighting reads (`statistics`; benchmarks reuse them
        across budgets)."""
        return collect_stats(model, calib, names, self.statistics(config))

    def compress(self, model: nn.Module, config: BudgetConfig, calib: CalibData | None = None,
                 inplace: bool = False, context: CompressContext | None = None) -> CompressResult:
        config = self.make_config(config)
        if self.needs_calibration and calib is None:
            raise ConfigError(f"'{self.name}' needs calibration data (e.g. calib = \"bbc-news:256\")")
        stats = None
        if calib is not None and self.statistics(config) is not None:
            names = [n for n, _ in select_linear_maps(model, config.target, config.exclude)[0]]
            stats = self.collect(model, calib, names, config)
        if config.allocation == "loss":
            if calib is None:
                raise ConfigError(f"{self.name}: allocation = \"loss\" measures each layer's task-loss change on "
                                  "calibration data: give some (e.g. calib = \"bbc-news:64\")")
            data = calib.head(config.profile_batches)
            svds: dict[str, WeightedSVD] = {}  # the probe's factorizations, reused by the allocation
            profile = profile_lowrank(self, model, stats, data, config, context=context, svds=svds)
            result = compress_by_loss(self, model, stats, config, profile, context=context, inplace=inplace, svds=svds)
            result.resolved["loss_profile"] = {"probe_ratio": profile.probe_ratio, "data": calib.name,
                                               "batches": len(data.batches), "seconds": profile.seconds, "layers": len(profile.delta)}
            return result
        return self.compress_with_stats(model, config, stats, inplace=inplace, context=context)

    def compress_with_stats(self, model: nn.Module, config: Mapping[str, Any] | BudgetConfig, stats: CalibStats | None,
                            inplace: bool = False, context: CompressContext | None = None,
                            svds: dict[str, WeightedSVD] | None = None, profile: LossProfile | None = None
                            ) -> CompressResult:
        """compress() with calibration statistics already collected (reused across budgets).

        `svds`: each layer's weighted SVD by name, filled here and reused when already there (calls on
        the same model, statistics and weighting config; the allocation may differ). `profile`: a loss
        profile of this family (compress/sensitivity.py) whose per-layer scales the allocation reads
        (allocation "loss")."""
        config = self.make_config(config)
        if profile is not None:
            if profile.method != self.name:
                raise ConfigError(f"a loss profile of '{profile.method}' cannot allocate '{self.name}'")
            config = dataclasses.replace(config, allocation="loss")
        elif config.allocation == "loss":
            raise ConfigError("allocation = \"loss\" profiles the model on calibration data: call compress() with "
                              "calib, or compress_by_loss() with a profile (compress/sensitivity.py)")
        config = config.resolve(data_aware=self.data_aware and stats is not None, context=context)
        model = working_copy(model, inplace)
        chosen, skipped = select_linear_maps(model, config.target, config.exclude)
        changes = [skipped_change(name, model.get_submodule(name), reason) for name, reason in skipped.items()]
        facts, spectra = {} if svds is None else svds, []
        for name, module in chosen:
            view = linear_view(module)
            row, col, scale = self.weighting(name, module, config, stats)
            if profile is not None:  # the measured loss per unit of relative (weighted) squared error
                scale = profile.scale(name) / max(float(weigh(view.weight, row, col).square().sum()), 1e-300)
            if name not in facts:
                facts[name] = weighted_svd(view.weight, row, col)
            spectra.append(LayerSpectrum(name, view.out_features, view.in_features,
                                         0 if view.bias is None else view.out_features,
                                         facts[name].s.square(), scale))
        def factored(ranks: Mapping[str, int | None]) -> nn.Module:
            """A copy of the model with `ranks` applied (a speedup budget times it on the target)."""
            trial = copy.deepcopy(model)
            for name, module in chosen:
                if ranks[name] is not None:
                    weight, bias, _ = linear_view(module)
                    left, right = facts[name].factors(ranks[name])
                    set_submodule(trial, name, LowRankLinear.from_factors(
                        left, right, None if bias is None else bias.detach(), dtype=weight.dtype))
            return trial

        ranks, times, latency = self.decide(model, config, chosen, spectra, context, factored)
        for (name, module), spec in zip(chosen, spectra):
            rank = ranks[name]
            weight, bias, _ = linear_view(module)
            item = weight.element_size()
            timing = times.get(name)
            ms = {} if timing is None else {"latency_ms_before": timing.dense_ms, "latency_ms_after": timing.ms_at(rank)}
            note = "" if timing is None else timing_note(timing, rank, config.align)
            if rank is None:
                changes.append(LayerChange(name, type(module).__name__, spec.dense_params, spec.dense_params, status="dense",
                                           bytes_before=item * spec.dense_params, bytes_after=item * spec.dense_params,
                                           rel_error=0.0, note=note if config.speedup else dense_note(spec, config),
                                           **ms))
                continue
            left, right = facts[name].factors(rank)
            bias = bias.detach() if bias is not None else None
            set_submodule(model, name, LowRankLinear.from_factors(left, right, bias, dtype=weight.dtype))
            changes.append(LayerChange(name, f"{type(module).__name__} -> LowRankLinear", spec.dense_params,
                                       spec.params_at(rank), rank, bytes_before=item * spec.dense_params,
                                       bytes_after=item * spec.params_at(rank), rel_error=facts[name].rel_error(rank),
                                       sensitivity=self.sensitivity(float(spec.energy[rank:].sum()), config),
                                       note=note, **ms))
        resolved = {"ranks": {n: r for n, r in ranks.items() if r is not None},
                    "dense": [n for n, r in ranks.items() if r is None], "skipped": skipped}
        if latency:
            resolved["latency"] = latency
        if stats is not None and stats.fisher_loss:
            resolved["fisher_loss"] = stats.fisher_loss
        return self.result(model, config, changes, resolved)

    def decide(self, model: nn.Module, config: BudgetConfig, chosen: Sequence[tuple[str, nn.Module]],
               spectra: Sequence[LayerSpectrum], context: CompressContext | None,
               factored: Callable[[Mapping[str, int | None]], nn.Module] | None = None
               ) -> tuple[dict[str, int | None], dict[str, LayerTimes], dict[str, Any]]:
        """(ranks, per-layer GEMM times on the target, latency summary of a speedup budget).

        With a `Measure` in the context every layer is timed on the target's GEMM table (so each row
        says whether factoring paid off); a speedup budget is allocated in milliseconds from it.
        GEMMs timed alone overstate what the factored model gains (measured on MiniLM: asked 1.3 / 1.5 /
        2.0, the model ran 1.18 / 1.22 / 1.62x faster), so with `factored` (ranks -> model) and a
        measure that times models (a local target; a remote table cannot) the allocated model itself is
        timed beside the original (alternating rounds) and the budget re-aimed (lowrank_latency.reaim:
        the measured speedup interpolated against the estimated one), up to RETARGET_ROUNDS times, until
        the measured speedup is the one asked for (up to OVERSHOOT above it). The result is the round
        that reached it with the least compression, else the fastest round.

        Raises:
            ConfigError: a speedup budget without a measure of the target (a profile that is not this
                machine and no GEMM table measured on it).
        """
        measure = context.measure if context is not None else None
        if config.speedup is not None and measure is None:
            where = f"profile '{context.profile}'" if context is not None and context.profile else "no target profile"
            raise ConfigError(f"a speedup budget needs GEMM timings measured on the target, and there are none for "
                              f"{where}: it is not this machine, so give a table measured on that target "
                              "(gemm_table = FILE in the step, --gemm-table FILE), or use ratio, rank or energy")
        times: dict[str, LayerTimes] = {}
        if measure is not None and chosen:
            try:
                rows = gemm_rows(model, [n for n, _ in chosen], context)
            except ConfigError:  # an input size is unknown: rows without timings, unless the budget needs them
                if config.speedup is not None:
                    raise
                rows = None
            times = {s.name: LayerTimes(s, rows[s.name], measure) for s in spectra} if rows else {}
        if config.speedup is None:
            return allocate(spectra, config), times, {}
        model_ms = measure.model_ms(model, context.inputs, context.dims)
        layers = list(times.values())
        timed = factored is not None and measure.times_models
        reachable = fastest_speedup(layers, config.align, model_ms)
        aimed = config.speedup if config.speedup < reachable or not timed else reachable * (1 - 1e-9)
        # an estimate out of reach is not a verdict where models are timed: the fastest allocation is measured first
        ranks, latency = allocate_latency(layers, aimed, config.align, model_ms)
        rounds, trials = [], []  # trials: (ranks, latency summary) of each round
        while timed:
            measured = measure.speedup(model, factored(ranks), context.inputs, context.dims)  # side by side
            rounds.append({"aimed": aimed, "estimated": latency["estimated_speedup"], "measured": measured})
            trials.append((ranks, latency))
            say(f"speedup round {len(rounds)}: aimed at {aimed:.2f}x by the GEMM table, estimated "
                f"{latency['estimated_speedup']:.2f}x, measured {measured:.2f}x (asked {config.speedup:g}x)")
            if config.speedup <= measured <= config.speedup * OVERSHOOT or len(rounds) == RETARGET_ROUNDS:
                break
            if aimed >= reachable * (1 - 1e-6) and measured < config.speedup:  # the fastest allocation, measured
                raise ConfigError(f"speedup {config.speedup:g} is out of reach on this target: the fastest allocation "
                                  f"(every targeted layer at its fastest rank) measured {measured:.2f}x; target more "
                                  "layers or ask for less")
            aimed = reaim(rounds, config.speedup, reachable)
            ranks, latency = allocate_latency(layers, aimed, config.align, model_ms)
            if any(ranks == tried for tried, _ in trials):  # the estimate cannot go further
                break
        extra = {}
        if rounds:  # of the rounds that reached the speedup the least compressed (least error), else the fastest
            reached = [i for i, r in enumerate(rounds) if r["measured"] >= config.speedup]
            best = (min(reached, key=lambda i: rounds[i]["estimated"]) if reached
                    else max(range(len(rounds)), key=lambda i: rounds[i]["measured"]))
            ranks, latency = trials[best]
            extra = {"rounds": rounds, "measured_speedup": rounds[best]["measured"]}
        return ranks, times, {**latency, "dims": dict(context.dims), **extra}

    def sensitivity(self, lost_energy: float, config: BudgetConfig) -> float | None:
        """Estimated task-loss or output change from this layer's truncation; None when unknown."""
        return None

    def replay(self, model: nn.Module, resolved: Mapping[str, Any], inputs: Sequence[TensorSpec]) -> nn.Module:
        """Swap the recorded linear maps for empty LowRankLinears of the recorded ranks (weights load after)."""
        for name, rank in resolved.get("ranks", {}).items():
            view = linear_view(recorded_module(model, name, linear_types()))
            set_submodule(model, name, LowRankLinear(view.in_features, view.out_features, int(rank),
                                                     bias=view.bias is not None, dtype=view.weight.dtype,
                                                     device=view.weight.device))
        return model


@register
class SVD(_LowRankCompressor):
    """Truncated SVD of each targeted Linear (Eckart-Young optimal in the Frobenius norm)."""

    name = "svd"
    Config = SVDConfig
    kind = "structural"

    def weighting(self, name, linear, config, stats):
        # no data: layers compared by the fraction of their spectral energy lost
        return None, None, 1.0 / max(float(linear_view(linear).weight.detach().double().square().sum()), 1e-30)


@register
class FWSVD(_LowRankCompressor):
    """Fisher-weighted SVD, row-wise (Hsu et al., ICLR 2022, Sec. 3.2)."""

    name = "fwsvd"
    Config = FWSVDConfig
    kind = "structural"
    needs_calibration = True
    data_aware = True

    def statistics(self, config):
        return StatsRequest(fisher=True, fisher_loss=config.fisher_loss)

    def weighting(self, name, linear, config, stats):
        # Mean Fisher per row: the row-wise estimate of the loss change is sum_i (I_i / n) ||dW_i||^2,
        # so weighted energies of different layers are on one (loss) scale for global allocation.
        row = stats.fisher[name].to(torch.float64).sum(dim=1) / linear_view(linear).in_features
        floor = config.floor * max(float(row.mean()), torch.finfo(torch.float64).tiny)
        return row.clamp_min(floor).sqrt(), None, 1.0

    def sensitivity(self, lost_energy, config):
        # second-order estimate of the loss increase: the task loss ("task"), half the expected squared
        # output change ("output", the Gauss-Newton diagonal), on one scale for every layer either way
        return 0.5 * lost_energy


@register
class ASVD(_LowRankCompressor):
    """Activation-aware SVD: truncation error measured on the layer's calibration inputs.

    mode "kfac" weighs the output side as well (the Kronecker-factored curvature of LLM Surgeon,
    van der Ouderaa et al., ICLR 2024): with C = E[x x^T] = L_C L_C^T of the inputs and G = E[g g^T]
    = L_G L_G^T of the gradients at the outputs (Gauss-Newton of the model's output), the truncated SVD
    of L_G^T W L_C minimizes tr(dW^T G dW C), twice the estimated squared change of the model's output,
    where "whiten" minimizes the layer's own output change E||dW x||^2 (G = I). On the demo's MiniLM
    at kept 0.5, loss-measured ranks, no healing: cosine 0.811 -> 0.872 with 1 probe, 0.881 with 2
    (bench/demo_ceiling.py).
    """

    name = "asvd"
    Config = ASVDConfig
    kind = "structural"
    needs_calibration = True
    data_aware = True

    def statistics(self, config):
        return StatsRequest(input_moments=True, output_gradients=config.mode == "kfac", draws=config.draws)

    def weighting(self, name, linear, config, stats):
        if config.mode == "scale":
            col = stats.mean_abs(name).to(torch.float64).clamp_min(1e-12).pow(config.alpha)
        else:
            col = damped_cholesky(stats.second_moment(name), config.damping)
        if config.mode == "kfac":
            # energies of every layer on one scale, the output's (as fwsvd's), for global allocation
            return damped_cholesky(stats.gradient_moment(name), config.damping).T, col, 1.0
        # relative output error: layers compared by the fraction of their (weighted) output energy lost
        return None, col, 1.0 / max(float(weigh(linear_view(linear).weight, None, col).square().sum()), 1e-30)

    def sensitivity(self, lost_energy, config):
        # whiten: E ||(W - W') x||^2 over the calibration inputs; kfac: half the estimated squared change
        # of the model's output; the scaled proxy has no such meaning
        return {"whiten": lost_energy, "kfac": 0.5 * lost_energy}.get(config.mode)
