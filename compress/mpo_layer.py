"""Matrix product operators (MPO, tensor-train matrices) for Linear and GPT-2 Conv1D layers.

An m x n weight with m = o_1...o_k and n = i_1...i_k is viewed as a k-way tensor with paired
indices (o_1 i_1, ..., o_k i_k) and decomposed left to right by sequential truncated SVDs, the
TT-SVD of Oseledets ("Tensor-train decomposition", SIAM J. Sci. Comput. 2011, Algorithm 1), into
cores G_j of shape (r_{j-1}, o_j, i_j, r_j), r_0 = r_k = 1 (Novikov et al., "Tensorizing Neural
Networks", NeurIPS 2015, eq. 3; CompactifAI, Tomut et al. 2024, Sec. 3). The bond dimensions r_j
are capped by a rank chi, by an energy threshold (Oseledets' delta = eps / sqrt(k-1) ||W||_F per
step) or by a kept-parameter budget. With all r_j at their maximum min(prod_{l<=j} o_l i_l,
prod_{l>j} o_l i_l) the decomposition is exact. Parameters: sum_j r_{j-1} o_j i_j r_j (+ m bias).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from edgeslim.compress.replace import linear_view
from edgeslim.core.errors import ConfigError


def factorize(dim: int, k: int) -> tuple[int, ...]:
    """`dim` as a product of k ascending factors, as equal as possible (smallest largest factor).

    A prime dimension becomes (1, ..., 1, p): the MPO then cannot split that side, which the
    compressor reports. Raises ConfigError for dim < 1 or k < 1.
    """
    if dim < 1 or k < 1:
        raise ConfigError(f"cannot factor dimension {dim} into {k} factors")
    best: tuple[int, ...] | None = None

    def search(rest: int, left: int, low: int, acc: tuple[int, ...]) -> None:
        nonlocal best
        if left == 1:
            cand = acc + (rest,)
            if rest >= low and (best is None or _balance(cand) < _balance(best)):
                best = cand
            return
        for f in range(low, int(round(rest ** (1.0 / left))) + 2):
            if rest % f == 0 and f ** left <= rest:
                search(rest // f, left - 1, f, acc + (f,))

    search(dim, k, 1, ())
    return best


def _balance(factors: tuple[int, ...]) -> tuple:
    return max(factors), -min(factors), factors


def default_factors(in_features: int, out_features: int, k: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(in_factors, out_factors): inputs descending, outputs ascending.

    Contracting core j costs r_{j-1} r_j i_j o_j (i_{j+1}...i_k)(o_1...o_{j-1}) multiply-adds per
    row, so a large i_1 (the first contraction removes most of the input) and a small o_1 (the
    output grows last) keep the intermediate states, and the FLOPs, smallest.
    """
    return factorize(in_features, k)[::-1], factorize(out_features, k)


def tt_svd(tensor: torch.Tensor, max_bonds: Sequence[int] | None = None, rel_error: float | None = None,
           first: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[float]]:
    """TT-SVD (Oseledets 2011, Algorithm 1): cores (r_{j-1}, d_j, r_j) and the energy each step drops.

    Args:
        tensor: a k-way tensor (computed in float64).
        max_bonds: cap on each of the k-1 bond dimensions (None: no cap).
        rel_error: target relative Frobenius error eps; each step drops at most
            (eps^2 / (k-1)) ||A||^2 of squared singular values (Oseledets' delta).
        first: the SVD (u, s, vh) of the first unfolding A(d_1, d_2...d_k), which no bond changes:
            pass it to reuse it across many bond choices of one tensor.

    Returns:
        (cores, lost): the squared error of the result is exactly sum(lost), because the left
        cores are orthonormal and each truncation is an orthogonal projection.
    """
    dims = tensor.shape
    k = len(dims)
    limit = None if rel_error is None else rel_error ** 2 * float(tensor.double().square().sum()) / max(k - 1, 1)
    rest = tensor.double().reshape(1, -1)
    cores, lost, r = [], [], 1
    for j in range(k - 1):
        u, s, vh = first if j == 0 and first is not None else torch.linalg.svd(rest.reshape(r * dims[j], -1),
                                                                             full_matrices=False)
        keep = s.numel()
        if max_bonds is not None:
            keep = min(keep, int(max_bonds[j]))
        if limit is not None:  # smallest rank whose dropped tail is within delta^2
            tail = torch.flip(torch.cumsum(torch.flip(s.square(), [0]), 0), [0])  # tail[i] = sum s[i:]^2
            keep = min(keep, int((tail > limit).sum()))
        keep = max(keep, 1)
        lost.append(float(s[keep:].square().sum()))
        cores.append(u[:, :keep].reshape(r, dims[j], keep))
        rest = s[:keep, None] * vh[:keep]
        r = keep
    cores.append(rest.reshape(r, dims[-1], 1))
    return cores, lost


def paired(weight: torch.Tensor, out_factors: Sequence[int], in_factors: Sequence[int]) -> torch.Tensor:
    """W (m x n) as the k-way tensor with modes (o_1 i_1, ..., o_k i_k)."""
    k = len(out_factors)
    t = weight.reshape(*out_factors, *in_factors)
    t = t.permute(*[p for j in range(k) for p in (j, k + j)])
    return t.reshape([o * i for o, i in zip(out_factors, in_factors)])


def dense_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight as out x in, bias) of an nn.Linear or a transformers GPT-2 Conv1D, detached."""
    view = linear_view(module)
    return view.weight.detach(), None if view.bias is None else view.bias.detach()


class MPOLinear(nn.Module):
    """y = x W^T + b with W held as k MPO cores; the forward pass never rebuilds W.

    Core j is stored as the matrix C_j[(i_j, r_{j-1}), (o_j, r_j)] = G_j[r_{j-1}, o_j, i_j, r_j], and
    the input is contracted with one core at a time (a Reshape, a Transpose and a MatMul each), so
    the ONNX graph holds only MatMul/Reshape/Transpose (no Einsum) with dynamic leading dims.
    """

    def __init__(self, in_features: int, out_features: int, in_factors: Sequence[int], out_factors: Sequence[int],
                 bonds: Sequence[int], bias: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_factors, self.out_factors = tuple(int(f) for f in in_factors), tuple(int(f) for f in out_factors)
        self.bonds = tuple(int(b) for b in bonds)
        k = len(self.in_factors)
        if k < 2 or len(self.out_factors) != k or len(self.bonds) != k - 1:
            raise ConfigError(f"an MPO needs k >= 2 input and output factors and k-1 bonds, got in "
                              f"{self.in_factors}, out {self.out_factors}, bonds {self.bonds}")
        if math.prod(self.in_factors) != in_features or math.prod(self.out_factors) != out_features:
            raise ConfigError(f"factors in {self.in_factors} / out {self.out_factors} do not multiply to "
                              f"{in_features} / {out_features}")
        if min(self.bonds) < 1:
            raise ConfigError(f"bond dimensions must be >= 1, got {self.bonds}")
        self.in_features, self.out_features = in_features, out_features
        r = (1, *self.bonds, 1)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(i * r[j], o * r[j + 1], dtype=dtype, device=device))
            for j, (o, i) in enumerate(zip(self.out_factors, self.in_factors)))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        """The equivalent dense weight (out x in), rebuilt on each access (for parents that peek at it)."""
        return self.to_dense().weight

    def core(self, j: int) -> torch.Tensor:
        """Core j as the tensor G_j of shape (r_{j-1}, o_j, i_j, r_j)."""
        r = (1, *self.bonds, 1)
        return self.cores[j].reshape(self.in_factors[j], r[j], self.out_factors[j], r[j + 1]).permute(1, 2, 0, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        i1 = self.in_factors[0]
        # state after core j: (i_{j+1} ... i_k, batch, o_1 ... o_j, r_j), flattened to 2-D for the MatMul
        t = x.reshape(-1, i1, self.in_features // i1).permute(2, 0, 1).reshape(-1, i1) @ self.cores[0]
        for j in range(1, len(self.cores)):
            ij, r = self.in_factors[j], self.bonds[j - 1]
            t = t.reshape(ij, -1, r).permute(1, 0, 2).reshape(-1, ij * r) @ self.cores[j]
        y = t.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    @classmethod
    def from_cores(cls, cores: Sequence[torch.Tensor], in_factors: Sequence[int], out_factors: Sequence[int],
                   bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> "MPOLinear":
        """Build from TT cores of shape (r_{j-1}, o_j i_j, r_j) or (r_{j-1}, o_j, i_j, r_j)."""
        bonds = [int(c.shape[-1]) for c in cores[:-1]]
        layer = cls(math.prod(in_factors), math.prod(out_factors), in_factors, out_factors, bonds,
                    bias=bias is not None, dtype=dtype, device=cores[0].device)
        with torch.no_grad():
            for j, (c, o, i) in enumerate(zip(cores, out_factors, in_factors)):
                g = c.reshape(c.shape[0], o, i, c.shape[-1])
                layer.cores[j].copy_(g.permute(2, 0, 1, 3).reshape(i * g.shape[0], o * g.shape[-1]).to(dtype))
            if bias is not None:
                layer.bias.copy_(bias.to(dtype))
        return layer

    @classmethod
    def from_linear(cls, module: nn.Module, rank: int | None = None, energy: float | None = None,
                    cores: int = 3, in_factors: Sequence[int] | None = None,
                    out_factors: Sequence[int] | None = None) -> "MPOLinear":
        """TT-SVD of a trained nn.Linear or Conv1D; bonds capped by `rank` and/or kept `energy`.

        With neither cap the layer is exact (maximal bond dimensions).
        """
        weight, bias = dense_weight(module)
        auto_in, auto_out = default_factors(weight.shape[1], weight.shape[0], len(in_factors or ()) or cores)
        in_factors, out_factors = tuple(in_factors or auto_in), tuple(out_factors or auto_out)
        caps = None if rank is None else [rank] * (len(in_factors) - 1)
        eps = None if energy is None else math.sqrt(max(1.0 - energy, 0.0))
        got, _ = tt_svd(paired(weight.double(), out_factors, in_factors), caps, eps)
        return cls.from_cores(got, in_factors, out_factors, bias, dtype=weight.dtype)

    def to_dense(self) -> nn.Linear:
        """The equivalent nn.Linear (weight rebuilt by contracting the cores, differentiably)."""
        k = len(self.cores)
        t = self.core(0)  # (1, o_1, i_1, r_1) -> accumulate (o_1, i_1, ..., o_j, i_j, r_j)
        for j in range(1, k):
            t = torch.tensordot(t, self.core(j), dims=([t.dim() - 1], [0]))
        t = t.reshape(*[f for o, i in zip(self.out_factors, self.in_factors) for f in (o, i)])
        t = t.permute(*range(0, 2 * k, 2), *range(1, 2 * k, 2)).reshape(self.out_features, self.in_features)
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          dtype=t.dtype, device=t.device)
        with torch.no_grad():
            dense.weight.copy_(t)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def flops_per_row(self) -> int:
        """FLOPs of the core contractions for one input row (a multiply-add counting 2).

        Core j costs r_{j-1} r_j i_j o_j (i_{j+1}...i_k)(o_1...o_{j-1}) multiply-adds; a dense layer
        costs in x out, a rank-r pair r (in + out).
        """
        r, k = (1, *self.bonds, 1), len(self.cores)
        return 2 * sum(r[j] * r[j + 1] * self.in_factors[j] * self.out_factors[j] * math.prod(self.in_factors[j + 1:])
                       * math.prod(self.out_factors[:j]) for j in range(k))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, in_factors={self.in_factors}, "
                f"out_factors={self.out_factors}, bonds={self.bonds}")
