"""Data-free feature merging for structured pruning (criterion `merge` of compress/prune.py).

Iterative Feature Merging (Chen, Zhou, Yan, "Going Beyond Neural Network Feature Similarity: The
Network Feature Complexity and Its Interpretation Using Category Theory", 2023, arXiv 2310.06756,
Sec. 5): a feature h_j whose producing weights are a positive multiple of another's, v_j = c v_i, is
functionally redundant under a positively homogeneous activation (ReLU: relu(c z) = c relu(z)), since
then h_j = c h_i. Removing j and adding c times its outgoing weights to i's (U[:, i] += c U[:, j])
leaves the network's function unchanged. For near multiples the error is the residual
r = ||v_j - c v_i|| / ||v_j||, with c = <v_j, v_i> / <v_i, v_i> (least squares).

The producer vector of a channel is its effective affine map: the Conv/Linear row with its bias, scaled
and shifted by a following BatchNorm; several producers feeding one residual sum are concatenated.
A depthwise conv in the chain (MobileNet/EfficientNet blocks) is a second stage: with the first
stage's scale c1, its effective (c1 k_j, e_j) must be a multiple c2 of (k_i, e_i), and h_j = c2 h_i.
Exact for ReLU (and for ReLU6 while activations stay below 6); for GELU/SiLU an approximation.
Attention heads are not merged: their units fall back to the magnitude score.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

_Conv = nn.modules.conv._ConvNd
_BN = nn.modules.batchnorm._BatchNorm


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, _Conv) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _affine(module: nn.Module, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, bias) of the module's effective per-channel affine map, BatchNorm folded in (float64)."""
    w = module.weight.detach().double()
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        w = w.transpose(0, 1)
    w = w.reshape(w.shape[0], -1)
    b = module.bias.detach().double() if module.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if bn is not None:
        a = bn.weight.detach().double() / (bn.running_var.double() + bn.eps).sqrt()
        b = a * (b - bn.running_mean.double()) + bn.bias.detach().double()
        w = a[:, None] * w
    return w, b


@dataclass
class MergePlan:
    """Scores of a group's units and how to fold a removed channel into its best kept partner."""

    scores: torch.Tensor  # estimated output damage of removing each unit (lower = remove first)
    compensated: bool  # True: removed channels are merged into kept ones (else only ranked)
    residual: torch.Tensor | None = None  # r[j, i]: relative error of h_j ~ scale[j, i] * h_i
    scale: torch.Tensor | None = None
    consumers: list = field(default_factory=list)  # (weight parameter, {root channel: [input indices]})

    def absorb(self, removed: list[int], kept: list[int]) -> int:
        """Add c * U[:, j] to U[:, i] for each removed j with a partner i among `kept`; merged count."""
        if not self.compensated or not removed or not kept:
            return 0
        keep = torch.tensor(kept)
        merged = 0
        with torch.no_grad():
            for j in removed:
                r = self.residual[j, keep]
                best = int(torch.argmin(r))
                if not float(r[best]) < 1.0:
                    continue  # no partner closer than removing outright
                i, c = kept[best], float(self.scale[j, keep[best]])
                for weight, cols in self.consumers:
                    for ci, cj in zip(cols[i], cols[j]):
                        weight[:, ci] += c * weight[:, cj]
                merged += 1
        return merged


def _pair_fit(v: torch.Tensor, vv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares scale c[j, i] of v_j ~ c v_i and the relative residual r[j, i] (inf on the diagonal)."""
    gram = v @ v.T
    sq = gram.diagonal()
    c = gram / sq.clamp_min(1e-300)[None, :]
    r2 = (sq[:, None] - 2 * c * gram + c.square() * sq[None, :]) / sq.clamp_min(1e-300)[:, None]
    r = r2.clamp_min(0).sqrt()
    r.fill_diagonal_(float("inf"))
    return c, r


def merge_plan(model: nn.Module, graph, items: list, unit: int) -> MergePlan:
    """Scores and merge pairs of one full group (Torch-Pruning items with the full index lists)."""
    order = {m: k for k, (_, m) in enumerate(model.named_modules())}
    layers = sorted({d.target.module for d, _ in items if isinstance(d.target.module, nn.Module)
                     and d.target.module in order and any(True for _ in d.target.module.parameters(recurse=False))},
                    key=order.get)
    outs = {d.target.module for d, _ in items if graph.is_out_channel_pruning_fn(d.handler)}
    consumers, stages, simple = [], [], unit == 1
    for m in layers:
        if _is_depthwise(m):
            stages.append(["dw", m, None])
        elif isinstance(m, (_Conv, nn.Linear)) and m in outs:
            stages.append(["dense", m, None])
        elif isinstance(m, _BN) and stages and stages[-1][2] is None:
            stages[-1][2] = m
        elif isinstance(m, (_Conv, nn.Linear)) and getattr(m, "groups", 1) == 1:
            item = next(it for it in items if it.dep.target.module is m)
            cols: dict[int, list[int]] = {}
            for idx, root in zip(item.idxs, item.root_idxs):
                cols.setdefault(int(root), []).append(int(idx))
            consumers.append((m.weight, cols))
        else:
            simple = False  # LayerNorm, embeddings, grouped convs: no exact merge
    dense = [s for s in stages if s[0] == "dense"]
    dws = [s for s in stages if s[0] == "dw"]
    simple = simple and bool(dense) and bool(consumers) and (not dws or (len(dense) == 1 and len(dws) == 1))
    channels = len(items[0].idxs)
    u_norm = torch.zeros(channels, dtype=torch.float64)
    for weight, cols in consumers:
        w = weight.detach().double()
        for root, idx in cols.items():
            u_norm[root] += w[:, idx].square().sum()
    if not dense:
        return MergePlan(torch.ones(channels // unit, dtype=torch.float64), False)
    v = torch.cat([torch.cat([w, b[:, None]], 1) for w, b in (_affine(m, bn) for _, m, bn in dense)], 1)
    mag = v.norm(dim=1) * u_norm.sqrt()
    if not simple:
        return MergePlan(mag.reshape(-1, unit).sum(1), False)
    c, r = _pair_fit(v)
    if dws:
        k, e = _affine(dws[0][1], dws[0][2])
        kk, ee = k @ k.T, e[:, None] * e[None, :]
        sj = c.square() * kk.diagonal()[:, None] + e.square()[:, None]  # ||(c1 k_j, e_j)||^2 per pair
        si = (kk.diagonal() + e.square())[None, :]
        dot = c * kk + ee
        c2 = dot / si.clamp_min(1e-300)
        r2 = ((sj - 2 * c2 * dot + c2.square() * si) / sj.clamp_min(1e-300)).clamp_min(0).sqrt()
        r, c = r + r2, c2
        mag = mag * (k.square().sum(1) + e.square()).sqrt()
    r = torch.where(c > 0, r, torch.full_like(r, float("inf")))
    best = r.min(dim=1).values.clamp(max=1.0)
    return MergePlan(best * mag, True, r, c, consumers)
