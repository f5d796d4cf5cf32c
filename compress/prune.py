"""Structured pruning that removes channels, attention heads and FFN neurons physically.

Torch-Pruning's dependency graph (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR
2023) couples every layer a removed channel touches: Conv-BN chains, depthwise/grouped convs,
residual adds, concatenations, the classifier's input, q/k/v/o of an attention block, LLaMA's
gate/up/down. One coupled set is a *group*; a group is pruned in *units* (one channel, or one head of
`head_dim` channels), never so that the model's output shape changes (that protects the classifier
output). `resolved` holds the graph's pruning history (root module, out/in, removed indices) and the
kept indices per group, so replay redoes it on the untouched source model without data.

Criteria: magnitude (`l1`, `l2`: group-mean norm of the coupled weights, Li et al., "Pruning Filters
for Efficient ConvNets", ICLR 2017), first-order Taylor (`taylor`: |sum grad * weight| on the
calibration data, Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019,
eq. 8) and data-free feature merging (`merge`, see compress/prune_merge.py).
"""
from __future__ import annotations

import bisect
import copy
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.compress.base import (CompressContext, CompressResult, Compressor, LayerChange, RatioBudgetConfig,
                                    register, working_copy)
from edgeslim.compress.prune_checks import (check_pruned, fused_parts, gqa_projections, nonzero_outputs,
                                           relative_bias_projections)
from edgeslim.compress import prune_gqa
from edgeslim.compress.prune_conv1d import conv1d_pruners, conv1d_scores, is_conv1d
from edgeslim.compress.prune_merge import MergePlan, merge_plan
from edgeslim.compress.replace import matches, count_params
from edgeslim.compress.train import HealingConfig, task_loss
from edgeslim.core.errors import ConfigError, require
from edgeslim.core.specs import TensorSpec

TRACE_DIMS = {"batch": 2, "sequence": 16, "height": 32, "width": 32}  # sizes for tracing named dims


@dataclass(frozen=True)
class PruneConfig(HealingConfig, RatioBudgetConfig):
    """Structured pruning; `ratio` keeps that fraction of the targeted groups' parameters.

    `target` selects groups by any Conv/Linear whose output channels they remove (default: all);
    `exclude` names protected layers: a group touching one is left whole.
    """

    criterion: Literal["l1", "l2", "taylor", "merge"] = "l2"  # taylor needs calib; merge is data-free


def _tp():
    return require("torch_pruning", "", "structured pruning (pip install torch-pruning)")


def example_inputs(specs: Sequence[TensorSpec], dims: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Example tensors for tracing the dependency graph (named dims from TRACE_DIMS unless given)."""
    from edgeslim.core.specs import dynamic_dims, example_feeds
    sizes = {d: int((dims or {}).get(d, TRACE_DIMS.get(d, 8))) for d in dynamic_dims(specs)}
    return {k: torch.from_numpy(v) for k, v in example_feeds(specs, sizes).items()}


def build_graph(model: nn.Module, inputs: Mapping[str, torch.Tensor]):
    """Torch-Pruning's dependency graph of `model` traced on keyword inputs.

    Raises:
        ConfigError: tracing fails; the message names the module that was running.
    """
    tp = _tp()
    running: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, n=n: running.append(n)) for n, m in model.named_modules() if n]
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=dict(inputs),
                                                     customized_pruners=conv1d_pruners())
    except Exception as exc:
        where = running[-1] if running else "(model input)"
        raise ConfigError(f"Torch-Pruning cannot trace the model: failed in or after module '{where}' "
                          f"({type(exc).__name__}: {exc})") from exc
    finally:
        for h in hooks:
            h.remove()


def _head_dims(model: nn.Module) -> dict[nn.Module, tuple[nn.Module, int]]:
    """Linear projections whose outputs are split into heads -> (attention module, head_dim)."""
    out: dict[nn.Module, tuple[nn.Module, int]] = {}
    for module in model.modules():
        hd = getattr(module, "attention_head_size", None) or getattr(module, "head_dim", None)
        if not isinstance(hd, int) or hd < 1:
            continue
        for child in module.children():
            if isinstance(child, nn.Linear) and child.out_features % hd == 0 and child.out_features > hd:
                out[child] = (module, hd)
    return out


@dataclass
class Group:
    """One coupled set of channels pruned together, in units of `unit` channels."""

    root: str  # name of the root module (its output channels index the group)
    channels: int
    unit: int  # 1, or head_dim for attention heads
    items: Any  # Torch-Pruning's group with the full index lists ((dependency, idxs) items)
    dims: list[tuple[str, int, int]]  # (parameter key, dim, indices of that dim per unit) it shrinks
    scores: torch.Tensor | None = None  # importance per unit
    heads_of: nn.Module | None = None  # attention module whose head count changes
    parts: int = 1  # a fused projection (Phi-3 gate_up_proj): its channels are `parts` stacked parts, cut in step

    @property
    def units(self) -> int:
        return self.channels // (self.unit * self.parts)

    def unit_channels(self, units: Sequence[int]) -> list[int]:
        """The root's channel indices of these units: `unit` consecutive channels in each of the `parts`."""
        inner = self.channels // self.parts
        return sorted(p * inner + u * self.unit + c for u in units for p in range(self.parts) for c in range(self.unit))


def _probe_dims(name: str, module: nn.Module, handler, per_unit: int) -> list[tuple[str, int, int]]:
    """Which parameter dims the handler shrinks: prune index 0 of a copy and compare shapes."""
    probe = copy.deepcopy(module)
    handler(probe, [0])
    after = dict(probe.named_parameters())
    dims = []
    for pname, p in module.named_parameters():
        q = after.get(pname)
        for d in range(p.dim()):
            if q is not None and q.shape[d] == p.shape[d] - 1:
                dims.append((f"{name}.{pname}" if pname else name, d, per_unit))
    return dims


def collect_groups(model: nn.Module, graph, config: PruneConfig) -> tuple[list[Group], list[str]]:
    """Targeted groups of the graph and the notes on those left whole.

    Raises:
        ConfigError: no group can be pruned (the reasons are listed).
    """
    tp = _tp()
    names = {m: n for n, m in model.named_modules()}
    heads = _head_dims(model)
    groups, notes = [], []
    for g in _all_groups(model, graph, notes):
        root = names[g[0].dep.target.module]
        layers = [(names.get(d.target.module), d) for d, _ in g if isinstance(d.target.module, nn.Module)
                  and d.target.module in names]
        producers = [n for n, d in layers if graph.is_out_channel_pruning_fn(d.handler)
                     and (isinstance(d.target.module, (nn.modules.conv._ConvNd, nn.Linear)) or is_conv1d(d.target.module))]
        if any(d.target.type == tp.ops.OPTYPE.OUTPUT or (not d.target.outputs and graph.is_out_channel_pruning_fn(
                d.handler)) for d, _ in g):  # a sink of the graph produces a model output
            notes.append(f"{root}: left whole (its channels reach the model's output)")
            continue
        if config.target is not None and not any(matches(n, config.target) for n in producers):
            continue
        if config.exclude is not None and any(matches(n, config.exclude) for n, _ in layers):
            notes.append(f"{root}: left whole (protected by exclude)")
            continue
        if any(isinstance(d.target.module, nn.Embedding) for _, d in layers):
            notes.append(f"{root}: left whole (the embedding width / residual stream)")
            continue
        grouped = [n for n, d in layers if isinstance(d.target.module, nn.modules.conv._ConvNd)
                   and 1 < d.target.module.groups < d.target.module.out_channels]
        if grouped:
            notes.append(f"{root}: left whole (grouped conv {grouped[0]} needs equal cuts per conv group)")
            continue
        head = [heads[d.target.module] for _, d in layers if d.target.module in heads
                and graph.is_out_channel_pruning_fn(d.handler)]
        unit = head[0][1] if head else 1
        if head and len({d.target.module.out_features for _, d in layers if d.target.module in heads}) > 1:
            notes.append(f"{root}: left whole (attention projections of different widths, fused q/k/v or "
                         "grouped-query attention, are not pruned by head)")
            continue
        channels = len(g[0].idxs)
        parts = fused_parts(g, channels)
        if not head and _in_attention(model, root):
            notes.append(f"{root}: left whole (an attention projection whose heads are not recognised, such as "
                         "GPT-2's fused q/k/v c_attn: cut per channel it would break the head layout)")
            continue
        if parts is None or (parts > 1 and (head or config.criterion == "merge")):
            why = "criterion merge does not fold fused parts" if parts else "its parts do not map one-to-one"
            notes.append(f"{root}: left whole (a fused projection: {why})")
            continue
        units = channels // (unit * parts)
        dims: dict[tuple[str, int], int] = {}
        for n, d in layers:
            if any(p.numel() for p in d.target.module.parameters(recurse=False)):
                for key, dim, per in _probe_dims(n, d.target.module, d.handler, len(_idxs(g, d)) // units):
                    dims.setdefault((key, dim), per)  # a depthwise conv is reached as both out and in
        groups.append(Group(root, channels, unit, g, [(k, d, p) for (k, d), p in dims.items()],
                            heads_of=head[0][0] if head else None, parts=parts))
    if not groups:
        raise ConfigError(f"nothing to prune: {'; '.join(notes) or 'no Conv/Linear group matches target'}")
    return groups, notes


def _all_groups(model: nn.Module, graph, notes: list[str]):
    """Torch-Pruning's groups rooted at each Conv/Linear's output channels, each coupled set once.

    Grouped-query attention projections are not used as roots: Torch-Pruning's graph does not
    resolve the key/value head sharing (its traversal does not end), so those heads stay whole.
    """
    gqa = gqa_projections(model)
    for block in sorted(set(gqa.values()) - set(prune_gqa.gqa_blocks(model))):
        notes.append(f"{block}: heads left whole (grouped-query attention with fused projections is not pruned)")
    biased = relative_bias_projections(model)
    for block in sorted(set(biased.values())):
        notes.append(f"{block}: heads left whole (a relative position bias per head, T5 / Swin style, is not "
                     "pruned with its heads)")
    gqa |= biased
    visited: set[nn.Module] = set()
    for module in list(graph.module2node):
        if not (isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or is_conv1d(module)) or module in visited \
                or module in gqa:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        g = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module))))
        visited.update(d.target.module for d, _ in g if graph.is_out_channel_pruning_fn(d.handler))
        yield g


def _in_attention(model: nn.Module, name: str) -> bool:
    """Whether module `name` sits directly in an attention block (a parent with a head size): a fused q/k/v
    projection there is cut per head or not at all."""
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return any(isinstance(getattr(parent, k, None), int) for k in ("head_dim", "attention_head_size", "num_heads"))


def _idxs(g, dep) -> list[int]:
    return next(list(i) for d, i in g if d is dep)


class ParamModel:
    """Exact parameter count of the targeted layers as a function of the kept units per group."""

    def __init__(self, model: nn.Module, groups: list[Group]) -> None:
        params = dict(model.named_parameters(remove_duplicate=False))
        self.shapes: dict[str, list[int]] = {}
        self.touch: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for gi, g in enumerate(groups):
            for key, dim, per_unit in g.dims:
                self.shapes[key] = list(params[key].shape)
                self.touch.setdefault((key, dim), []).append((gi, per_unit))
        self.units = [g.units for g in groups]

    def count(self, kept: Sequence[int]) -> int:
        total = 0
        for key, shape in self.shapes.items():
            n = 1
            for d, size in enumerate(shape):
                n *= size - sum((self.units[gi] - kept[gi]) * per for gi, per in self.touch.get((key, d), ()))
            total += n
        return total

    @property
    def full(self) -> int:
        return self.count(self.units)


def _kept_units(units: int, unit: int, fraction: float, align: int) -> int:
    """Units kept at `fraction`, the channel count rounded down to align (at least one aligned step)."""
    step = max(1, align // unit) if unit < align else 1
    k = int(math.floor(units * fraction + 1e-9))
    k -= k % step
    return min(units, max(step, k))


def allocate(groups: list[Group], pm: ParamModel, config: PruneConfig) -> list[int]:
    """Kept units per group so that the targeted parameters are <= ratio of the full count.

    uniform: one kept fraction for every group (bisection on it). sensitivity: one global threshold
    on the group-normalised importance (bisection on the sorted scores), so groups whose channels
    matter less lose more.
    """
    budget = float(config.ratio) * pm.full
    if config.ratio >= 1.0:
        return [g.units for g in groups]
    if config.allocation == "uniform":
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            kept = [_kept_units(g.units, g.unit, mid, config.align) for g in groups]
            lo, hi = (mid, hi) if pm.count(kept) <= budget else (lo, mid)
        return [_kept_units(g.units, g.unit, lo, config.align) for g in groups]
    normed = [g.scores / g.scores.mean().clamp_min(1e-12) for g in groups]
    sorted_scores = [sorted(s.tolist()) for s in normed]
    levels = sorted(set(v for s in sorted_scores for v in s))

    def kept_at(threshold: float) -> list[int]:
        out = []
        for g, s in zip(groups, sorted_scores):
            keep = len(s) - bisect.bisect_right(s, threshold)
            out.append(_kept_units(g.units, g.unit, max(keep, 1) / g.units, config.align))
        return out

    lo, hi = -1, len(levels) - 1  # kept_at(levels[hi]) keeps the minimum everywhere
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if pm.count(kept_at(levels[mid])) <= budget else (mid, hi)
    return kept_at(levels[hi]) if lo < 0 or pm.count(kept_at(levels[lo])) > budget else kept_at(levels[lo])


def _unit_scores(group: Group, channel_scores: torch.Tensor) -> torch.Tensor:
    return channel_scores.reshape(group.parts, group.units, group.unit).sum(dim=(0, 2)).double()


def score_groups(model: nn.Module, graph, groups: list[Group], config: PruneConfig,
                 calib: CalibData | None) -> dict[str, MergePlan]:
    """Fill each group's unit scores for the criterion; the merge plans for `merge`."""
    tp = _tp()
    plans: dict[str, MergePlan] = {}
    if config.criterion == "taylor":
        _accumulate_grads(model, calib)
        imp = tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None)
    elif config.criterion in ("l1", "l2"):
        imp = tp.importance.GroupMagnitudeImportance(p=1 if config.criterion == "l1" else 2,
                                                     group_reduction="mean", normalizer=None)
    for g in groups:
        if config.criterion == "merge":
            plans[g.root] = merge_plan(model, graph, g.items, g.unit)
            g.scores = plans[g.root].scores.double()
        else:
            scores = imp(g.items)  # None when no layer of the group is one Torch-Pruning scores (GPT-2's Conv1D)
            scores = conv1d_scores(g.items, g.channels, config.criterion) if scores is None else scores.detach()
            g.scores = _unit_scores(g, scores)
    if config.criterion == "taylor":
        model.zero_grad(set_to_none=True)
    return plans


def _accumulate_grads(model: nn.Module, calib: CalibData | None) -> None:
    """Gradients of the task loss summed over the calibration batches (distillation noise without targets)."""
    if calib is None:
        raise ConfigError("criterion 'taylor' needs calibration data (calib = ...)")
    gen = torch.Generator().manual_seed(0)
    model.zero_grad(set_to_none=True)
    for _, batch, target in calib:
        out = model(**batch)
        if target is None:  # MSE to the model's own output plus unit noise: Gauss-Newton-like gradients
            target = out.detach() + torch.randn(out.shape, generator=gen, dtype=out.dtype)
        task_loss(out, target).backward()


def _removed_channels(group: Group, keep_units: int) -> tuple[list[int], list[int]]:
    """(kept, removed) channel indices of the group for the highest-scoring `keep_units` units."""
    order = torch.argsort(group.scores, descending=True, stable=True).tolist()
    return group.unit_channels(order[:keep_units]), group.unit_channels(order[keep_units:])


def _set_heads(attention: nn.Module, head_dim: int, channels: int) -> dict[str, int]:
    """Update an attention module's head counts after its projections lost heads."""
    attrs = {}
    for key in ("num_attention_heads", "num_heads"):
        if isinstance(getattr(attention, key, None), int):
            attrs[key] = channels // head_dim
    if isinstance(getattr(attention, "all_head_size", None), int):
        attrs["all_head_size"] = channels
    for key, value in attrs.items():
        setattr(attention, key, value)
    return attrs


@register
class Prune(Compressor):
    """Structured channel / head / neuron pruning through Torch-Pruning's dependency graph."""

    name = "prune"
    Config = PruneConfig
    kind = "structural"
    distils = True

    def compress(self, model: nn.Module, config: PruneConfig, calib: CalibData | None = None,
                 inplace: bool = False, context: CompressContext | None = None) -> CompressResult:
        config = self.make_config(config)
        config = config.resolve(data_aware=calib is not None and config.criterion == "taylor", context=context)
        specs = list(context.inputs if context is not None else ())
        if specs:
            inputs = example_inputs(specs)
        elif calib is not None:
            inputs = {k: v[:2] for k, v in calib.batches[0].items()}
            specs = [TensorSpec(k, ("batch", *v.shape[1:]), str(v.dtype).removeprefix("torch.")) for k, v in inputs.items()]
        else:
            raise ConfigError("prune traces the model: give calibration data or the model's input spec")
        heal_data = config.healing_data(model, calib)
        model = working_copy(model, inplace)
        was_training = model.training
        model.eval()
        graph = build_graph(model, inputs)
        groups, notes = collect_groups(model, graph, config)
        pm = ParamModel(model, groups)
        plans = score_groups(model, graph, groups, config, calib)
        kept_units = allocate(groups, pm, config)
        before = {n: count_params(m) for n, m in model.named_modules()}
        names = {m: n for n, m in model.named_modules()}
        touched = sorted({names[d.target.module] for g in groups for d, _ in g.items
                          if d.target.module in names and isinstance(d.target.module, nn.Module)
                          and any(True for _ in d.target.module.parameters(recurse=False))}, key=list(before).index)
        alive = nonzero_outputs(model, inputs, touched)
        records, merged = [], 0
        cuts = []
        for g, k in zip(groups, kept_units):
            kept, removed = _removed_channels(g, k)
            if g.root in plans and removed:
                merged += plans[g.root].absorb(removed, kept)
            cuts.append((g, kept, removed))
        for g, kept, removed in cuts:
            root_dep = g.items[0].dep
            if removed:
                try:
                    graph.get_pruning_group(root_dep.target.module, root_dep.handler, removed).prune()
                except Exception as exc:  # Torch-Pruning's handlers raise bare errors on layers they mis-handle
                    raise ConfigError(f"Torch-Pruning failed pruning the group of '{g.root}': "
                                      f"{type(exc).__name__}: {exc}") from exc
            attrs = _set_heads(g.heads_of, g.unit, len(kept)) if g.heads_of is not None and removed else {}
            records.append({"root": g.root, "channels": g.channels, "unit": g.unit, "kept": kept, "attrs":
                            {names[g.heads_of]: attrs} if attrs else {}})
        gqa = prune_gqa.plan(model, config.ratio) if config.ratio is not None else {}
        prune_gqa.apply(model, gqa)
        touched += [f"{b}.{p}" for b in gqa for p in prune_gqa.PROJECTIONS]
        notes += [f"{b}: heads left whole (the ratio keeps every key/value group)"
                  for b in prune_gqa.gqa_blocks(model) if b not in gqa]
        check_pruned(model, inputs, alive)
        history = [[n, bool(out), [int(i) for i in idx]] for n, out, idx in graph.pruning_history()]
        heal_report = config.heal(model, heal_data)
        model.train(was_training)
        changes = self._changes(model, touched, before, groups, kept_units, plans)
        resolved = {"history": history, "groups": records, "inputs": [s.to_dict() for s in specs],
                    "params_targeted": pm.full, "params_kept": pm.count(kept_units), "merged": merged,
                    "notes": notes, "skipped": dict(n.split(": ", 1) for n in notes), "gqa": gqa,
                    "heal_final_loss": heal_report.final_loss if heal_report else None}
        return self.result(model, config, changes, resolved)

    @staticmethod
    def _changes(model, touched, before, groups, kept_units, plans) -> list[LayerChange]:
        """One row per touched layer; the row of a group's root carries its kept channels and score loss."""
        lost = {g.root: (float(torch.sort(g.scores).values[:g.units - k].sum() / g.scores.sum().clamp_min(1e-30)),
                         k * g.unit, g.channels) for g, k in zip(groups, kept_units)}
        rows = []
        for name in touched:
            module = model.get_submodule(name)
            after = count_params(module)
            info = lost.get(name)
            note = "" if info is None else f"kept {info[1]}/{info[2]} channels"
            if info is not None and name in plans and plans[name].compensated:
                note += "; removed features merged into the next layer"
            pruned = after < before[name]
            rows.append(LayerChange(name, f"{type(module).__name__} (pruned)" if pruned else type(module).__name__,
                                    before[name], after, decision=info[1] if info else None,
                                    status="replaced" if pruned else "dense",
                                    sensitivity=info[0] if info else None, note=note))
        return rows

    def replay(self, model: nn.Module, resolved: Mapping[str, Any], inputs: Sequence[TensorSpec]) -> nn.Module:
        """Redo the recorded pruning history on the source model's structure (weights load after)."""
        specs = list(inputs or [TensorSpec.from_dict(s) for s in resolved.get("inputs", [])])
        if not specs:
            raise ConfigError("replay of 'prune' needs the model's input spec to trace it")
        was_training = model.training
        model.eval()
        graph = build_graph(model, example_inputs(specs))
        try:
            graph.load_pruning_history([[n, out, list(idx)] for n, out, idx in resolved.get("history", [])])
        except (AttributeError, IndexError, ValueError) as exc:
            raise ConfigError(f"replay of 'prune' does not fit this model: {exc}") from exc
        for record in resolved.get("groups", []):
            for name, attrs in record.get("attrs", {}).items():
                for key, value in attrs.items():
                    setattr(model.get_submodule(name), key, int(value))
        gqa = resolved.get("gqa", {})
        if not isinstance(gqa, Mapping):
            raise ConfigError("replay of 'prune': 'gqa' must map attention blocks to kept key/value heads")
        prune_gqa.apply(model, gqa)
        model.train(was_training)
        return model
