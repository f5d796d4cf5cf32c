"""The low-rank layer and the weighted SVD it is built from (svd.py's families decide the ranks).

`LowRankLinear` is a rank-r factorization y = A (B x) + b of a linear map; `weighted_svd` computes the
SVD of L W R for a row weighting L and a column factor R, whose `factors(r)` undo the weighting
(A = L^-1 U_r S_r^1/2, B = S_r^1/2 V_r^T R^-1), so that the truncation minimizes ||L (W - A B) R||_F
(Eckart-Young on the weighted matrix). At full rank A B = W exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgeslim.compress.lowrank_budget import weigh
from edgeslim.compress.replace import linear_view
from edgeslim.core.errors import ConfigError

class LowRankLinear(nn.Module):
    """y = second(first(x)): a rank-r factorization of an m x n Linear as two thin Linears.

    Parameters: r*(n + m) weights, plus m bias in `second`. Exports to ONNX as a MatMul/Gemm pair.
    `weight` and `bias` read like nn.Linear's (weight = A B, computed), so a parent module that
    peeks at them (T5 checks `wo.weight.dtype`, TransformerEncoderLayer's inference fast path
    passes `linear1.weight` to a fused kernel) still computes the right thing.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ConfigError(f"rank must be in [1, {min(in_features, out_features)}] for a "
                              f"{out_features}x{in_features} layer, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)  # B: r x n
        self.second = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)  # A: m x r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @property
    def weight(self) -> torch.Tensor:
        """The equivalent dense weight A B (m x n), computed on each access."""
        return self.second.weight @ self.first.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    @classmethod
    def from_factors(cls, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype | None = None) -> "LowRankLinear":
        """Build from A (m x r) and B (r x n) so that the layer computes x B^T A^T + bias."""
        m, r = left.shape
        dtype = dtype or (bias.dtype if bias is not None else torch.float32)
        layer = cls(right.shape[1], m, r, bias=bias is not None, dtype=dtype, device=left.device)
        with torch.no_grad():
            layer.first.weight.copy_(right.to(dtype))
            layer.second.weight.copy_(left.to(dtype))
            if bias is not None:
                layer.second.bias.copy_(bias.to(dtype))
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int, row_weight: torch.Tensor | None = None,
                    col_factor: torch.Tensor | None = None) -> "LowRankLinear":
        """Truncated (weighted) SVD of a trained Linear (or Conv1D); plain SVD when no weighting is given."""
        weight, bias, _ = linear_view(linear)
        left, right = weighted_svd(weight, row_weight, col_factor).factors(rank)
        return cls.from_factors(left, right, bias.detach() if bias is not None else None, dtype=weight.dtype)

    @classmethod
    def from_conv1d(cls, conv1d: nn.Module, rank: int, row_weight: torch.Tensor | None = None,
                    col_factor: torch.Tensor | None = None) -> "LowRankLinear":
        """Truncated SVD of a GPT-2 style Conv1D (y = x W + b, W stored n x m), as from_linear."""
        if linear_view(conv1d).kind != "conv1d":
            raise ConfigError(f"from_conv1d takes a transformers Conv1D, got {type(conv1d).__name__}")
        return cls.from_linear(conv1d, rank, row_weight, col_factor)

    def to_dense(self) -> nn.Linear:
        """The equivalent single Linear (weight = A B)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.second.bias is not None,
                          dtype=self.first.weight.dtype, device=self.first.weight.device)
        with torch.no_grad():
            dense.weight.copy_(self.second.weight @ self.first.weight)
            if self.second.bias is not None:
                dense.bias.copy_(self.second.bias)
        return dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@dataclass
class WeightedSVD:
    """SVD of L W R in float64 with the weighting kept to undo it on the factors."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    row_weight: torch.Tensor | None  # L: a vector (diagonal) or an upper-triangular m x m matrix
    col_factor: torch.Tensor | None  # R: a vector (diagonal) or a lower-triangular n x n matrix

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A (m x r), B (r x n) with A B the truncated, unweighted approximation; columns of A and rows of B balanced."""
        root = self.s[:rank].sqrt()
        left = self.u[:, :rank] * root
        right = root[:, None] * self.vh[:rank]
        if self.row_weight is not None:
            if self.row_weight.dim() == 1:
                left = left / self.row_weight[:, None]
            else:  # L A = U_r S^1/2  ->  A = L^-1 U_r S^1/2, L upper triangular
                left = torch.linalg.solve_triangular(self.row_weight, left, upper=True)
        if self.col_factor is not None:
            if self.col_factor.dim() == 1:
                right = right / self.col_factor
            else:  # B R = V_r^T  ->  B = V_r^T R^-1, R lower triangular
                right = torch.linalg.solve_triangular(self.col_factor, right, upper=False, left=False)
        # Undoing the weighting leaves A and B on very different scales (Fisher ~1e-8 makes B tiny),
        # which a fine-tune with one learning rate destroys: rescale each rank component so that
        # ||a_k|| = ||b_k||, which keeps A B unchanged.
        scale = (right.norm(dim=1) / left.norm(dim=0).clamp_min(1e-300)).sqrt().clamp_min(1e-150)
        return left * scale, right / scale[:, None]

    def rel_error(self, rank: int) -> float:
        """Relative weighted error ||L (W - A B) R|| / ||L W R|| of truncation at `rank`."""
        energy = self.s.square()
        total = float(energy.sum())
        return (float(energy[rank:].sum()) / total) ** 0.5 if total > 0 else 0.0


def weighted_svd(weight: torch.Tensor, row_weight: torch.Tensor | None = None,
                 col_factor: torch.Tensor | None = None) -> WeightedSVD:
    """SVD of L W R in float64: L = diag(row_weight) or an upper-triangular factor, R = diag(col_factor)
    or a lower-triangular factor."""
    u, s, vh = torch.linalg.svd(weigh(weight, row_weight, col_factor), full_matrices=False)
    return WeightedSVD(u, s, vh, None if row_weight is None else row_weight.to(torch.float64),
                       None if col_factor is None else col_factor.to(torch.float64))


def damped_cholesky(moment: torch.Tensor, damping: float) -> torch.Tensor:
    """Lower Cholesky factor of a second-moment matrix plus `damping` times its mean diagonal."""
    moment = moment.to(torch.float64)
    shift = damping * float(moment.diagonal().mean().clamp_min(1e-12))
    return torch.linalg.cholesky(moment + shift * torch.eye(moment.shape[0], dtype=moment.dtype))
