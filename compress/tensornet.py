"""MPO compression (CompactifAI, Tomut et al. 2024): each targeted Linear/Conv1D becomes an MPOLinear
(compress/mpo_layer.py: the layer and the TT-SVD) whose bond dimensions the shared allocator decides,
through `MPOPlan`, the layer as a `BudgetLayer`; the loss profile (compress/sensitivity.py) sets
each plan's scale; healing is the shared `heal_steps`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.compress.base import (CompressContext, CompressResult, Compressor, LayerChange, ProfiledBudgetConfig,
                                    register, working_copy)
from edgeslim.compress.lowrank_budget import allocate, dense_note
from edgeslim.compress.mpo_layer import MPOLinear, default_factors, dense_weight, paired, tt_svd
from edgeslim.compress.replace import select_linear_maps, set_submodule, skipped_change
from edgeslim.compress.sensitivity import LossProfile, profile_layers
from edgeslim.compress.train import HealingConfig
from edgeslim.core.errors import ConfigError
from edgeslim.core.specs import TensorSpec


class MPOPlan:
    """One targeted layer as the budget allocator sees it: decisions are bond-dimension tuples."""

    def __init__(self, name: str, module: nn.Module, cores: int, factors: Mapping[int, Sequence[int]]) -> None:
        weight, bias = dense_weight(module)
        self.scale = 1.0  # multiplies the relative error in the global greedy (set from the layer profile)
        m, n = weight.shape
        self.name, self.bias, self.dtype = name, bias, weight.dtype
        auto_in, auto_out = default_factors(n, m, cores)
        self.in_factors, self.out_factors = tuple(factors.get(n) or auto_in), tuple(factors.get(m) or auto_out)
        self.tensor = paired(weight.double(), self.out_factors, self.in_factors)
        self.norm2 = max(float(self.tensor.square().sum()), 1e-300)
        d = self.dims = tuple(self.tensor.shape)
        self.max_bonds = tuple(min(math.prod(d[:j + 1]), math.prod(d[j + 1:])) for j in range(len(d) - 1))
        self.bias_params = 0 if bias is None else m
        self.dense_params = m * n + self.bias_params
        self._cache: dict[tuple[int, ...], tuple[list[torch.Tensor], list[float]]] = {}
        self._first: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def params_at(self, bonds: Sequence[int]) -> int:
        r = (1, *bonds, 1)
        return sum(r[j] * d * r[j + 1] for j, d in enumerate(self.dims)) + self.bias_params

    def bonds_at(self, chi: int) -> tuple[int, ...]:
        """Every bond capped at chi (and at its maximum)."""
        return tuple(min(chi, b) for b in self.max_bonds)

    def saves(self, bonds: Sequence[int]) -> bool:
        return self.params_at(bonds) < self.dense_params

    def decisions(self, align: int) -> list[tuple[int, ...]]:
        """Admissible bond tuples (chi = align, 2 align, ...), ascending in parameters, all saving some."""
        out: list[tuple[int, ...]] = []
        for chi in range(align, max(self.max_bonds) + align, align):
            bonds = self.bonds_at(chi)
            if self.saves(bonds) and (not out or bonds != out[-1]):
                out.append(bonds)
        return out

    def decompose(self, bonds: Sequence[int]) -> tuple[list[torch.Tensor], list[float]]:
        key = tuple(bonds)
        if key not in self._cache:
            if self._first is None:  # the first unfolding's SVD is the same for every bond choice
                self._first = torch.linalg.svd(self.tensor.reshape(self.dims[0], -1), full_matrices=False)
            self._cache[key] = tt_svd(self.tensor, key, first=self._first)
        return self._cache[key]

    def rel_error2(self, bonds: Sequence[int]) -> float:
        """Relative squared Frobenius error ||W - W_mpo||^2 / ||W||^2 of the TT-SVD at these bonds."""
        return sum(self.decompose(bonds)[1]) / self.norm2

    def error_at(self, bonds: Sequence[int]) -> float:
        return self.scale * self.rel_error2(bonds)

    def rank_decision(self, rank: int, align: int) -> tuple[int, ...] | None:
        """Every bond capped at chi = rank (rounded down to align); None when that saves nothing."""
        bonds = self.bonds_at(max(rank - rank % align, min(align, rank)))
        return bonds if self.saves(bonds) else None

    def energy_decision(self, fraction: float, align: int) -> tuple[int, ...] | None:
        """Bonds of the TT-SVD keeping `fraction` of the energy (Oseledets' delta), rounded up to align."""
        cores, _ = tt_svd(self.tensor, rel_error=math.sqrt(max(1.0 - fraction, 0.0)))
        bonds = tuple(min(-(-int(c.shape[-1]) // align) * align, b) for c, b in zip(cores[:-1], self.max_bonds))
        return bonds if self.saves(bonds) else None

    def build(self, bonds: Sequence[int]) -> MPOLinear:
        return MPOLinear.from_cores(self.decompose(bonds)[0], self.in_factors, self.out_factors, self.bias, self.dtype)

    def note(self) -> str:
        prime = [f"{side} {math.prod(f)} is prime or 1" for side, f in (("in", self.in_factors), ("out", self.out_factors))
                 if sorted(f)[-2] == 1]
        return f"factors in {self.in_factors} out {self.out_factors}" + "".join(f"; {p}" for p in prime)


@dataclass(frozen=True)
class MPOConfig(HealingConfig, ProfiledBudgetConfig):
    """MPO (tensor-train matrix) compression; the budget forms are those of BudgetConfig (rank = chi),
    allocation "loss" profiles each layer alone (CompactifAI), healing is the shared `heal_steps`."""

    cores: int = 3  # k: MPO cores, i.e. factors of each layer's in and out dimension
    factors: dict[str, tuple[int, ...]] | None = None  # {dimension: factors} overriding the automatic ones

    def validate(self) -> None:
        super().validate()
        if self.cores < 2:
            raise ConfigError(f"mpo cores must be >= 2, got {self.cores}")
        for dim, fs in (self.factors or {}).items():
            if not dim.isdigit() or len(fs) != self.cores or math.prod(fs) != int(dim) or min(fs) < 1:
                raise ConfigError(f"mpo factors for dimension {dim!r}: {list(fs)} must be {self.cores} positive "
                                  f"integers whose product is {dim}")

    def resolve(self, *, data_aware: bool, context: CompressContext | None) -> "MPOConfig":
        """As BudgetConfig's, but with calibration data and a ratio, "auto" is "loss" (CompactifAI's profile);
        so is "sensitivity", this family's name for the profile before the allocation words were shared
        (recipes that say it keep their meaning)."""
        resolved = super().resolve(data_aware=data_aware, context=context)
        if data_aware and self.ratio is not None and self.allocation in ("auto", "sensitivity"):
            return dataclasses.replace(resolved, allocation="loss")
        return resolved

    def factor_map(self) -> dict[int, tuple[int, ...]]:
        return {int(d): tuple(f) for d, f in (self.factors or {}).items()}


@register
class MPO(Compressor):
    """MPO layers as in CompactifAI (Tomut et al. 2024): TT-SVD per layer, profiled bonds, healing."""

    name = "mpo"
    Config = MPOConfig
    kind = "structural"
    data_aware = True  # calibration data sets the per-layer bonds through the sensitivity profile
    distils = True

    def compress(self, model: nn.Module, config: MPOConfig, calib: CalibData | None = None,
                 inplace: bool = False, context: CompressContext | None = None) -> CompressResult:
        config = self.make_config(config).resolve(data_aware=calib is not None, context=context)
        if config.allocation == "loss" and calib is None:
            raise ConfigError("mpo allocation = \"loss\" measures each layer's task-loss change on calibration "
                              "data: give some (e.g. calib = \"bbc-news:64\")")
        heal_data = config.healing_data(model, calib)
        model = working_copy(model, inplace)
        chosen, skipped = select_linear_maps(model, config.target, config.exclude)  # tied weights stay dense
        changes = [skipped_change(name, model.get_submodule(name), reason) for name, reason in skipped.items()]
        plans = [MPOPlan(name, module, config.cores, config.factor_map()) for name, module in chosen]
        sens: dict[str, float] = {}
        if config.allocation == "loss":
            profile = self.profile(model, plans, config, calib)
            for plan in plans:  # the allocator reads each layer's measured scale
                plan.scale = profile.scale(plan.name)
            sens = profile.delta
        decisions = allocate(plans, config)
        layers = {}
        for plan in plans:
            bonds, module = decisions[plan.name], model.get_submodule(plan.name)
            item, kind = module.weight.element_size(), type(module).__name__
            if bonds is None:
                changes.append(LayerChange(plan.name, kind, plan.dense_params, plan.dense_params, status="dense",
                                           bytes_before=item * plan.dense_params, bytes_after=item * plan.dense_params,
                                           rel_error=0.0, sensitivity=sens.get(plan.name),
                                           note=f"{dense_note(plan, config)}; {plan.note()}"))
                continue
            set_submodule(model, plan.name, plan.build(bonds))
            layers[plan.name] = {"in_factors": list(plan.in_factors), "out_factors": list(plan.out_factors),
                                 "bonds": list(bonds)}
            after = plan.params_at(bonds)
            changes.append(LayerChange(plan.name, f"{kind} -> MPOLinear", plan.dense_params, after, tuple(bonds),
                                       bytes_before=item * plan.dense_params, bytes_after=item * after,
                                       rel_error=math.sqrt(plan.rel_error2(bonds)), sensitivity=sens.get(plan.name),
                                       note=plan.note()))
        resolved = {"layers": layers, "dense": [p.name for p in plans if decisions[p.name] is None], "skipped": skipped}
        report = config.heal(model, heal_data)
        if report is not None:
            resolved["heal_final_loss"] = report.final_loss
        return self.result(model, config, changes, resolved)

    @staticmethod
    def profile(model: nn.Module, plans: Sequence[MPOPlan], config: MPOConfig, calib: CalibData) -> LossProfile:
        """Task-loss change per layer compressed alone at its uniform bonds (compress/sensitivity.py).

        The profile's scale of a layer is its loss change per unit of relative squared error at the
        probe, so the global greedy on the plans' scaled errors minimizes the estimated total loss
        increase (CompactifAI's profiling turned into per-layer bond dimensions).
        """
        probe = allocate(plans, dataclasses.replace(config, allocation="uniform"))
        built = {p.name: p for p in plans if probe[p.name] is not None}
        builders = {name: (lambda _m, p=p: p.build(probe[p.name])) for name, p in built.items()}
        return profile_layers("mpo", config.ratio, model, calib.head(config.profile_batches), builders,
                              {name: p.rel_error2(probe[name]) for name, p in built.items()},
                              {name: probe[name] for name in built})

    def replay(self, model: nn.Module, resolved: Mapping[str, Any], inputs: Sequence[TensorSpec]) -> nn.Module:
        """Swap the recorded layers for empty MPOLinears of the recorded shapes (weights load after)."""
        for name, rec in resolved.get("layers", {}).items():
            try:
                module = model.get_submodule(name)
            except AttributeError as exc:
                raise ConfigError(f"replay: the model has no module '{name}'") from exc
            weight, bias = dense_weight(module)
            set_submodule(model, name, MPOLinear(weight.shape[1], weight.shape[0], rec["in_factors"],
                                                 rec["out_factors"], rec["bonds"], bias=bias is not None,
                                                 dtype=weight.dtype, device=weight.device))
        return model
