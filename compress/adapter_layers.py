"""The adapter layers (compress/compacter.py trains them): PHM projections (Mahabadi et al., NeurIPS
2021, Eq. 3-5), the bottleneck adapter with its residual (Houlsby et al. 2019), the site that runs a
module then its adapter, LoRA (Hu et al. 2022) and the model wrapper holding a new head and the
shared PHM rule. Every adapter starts at the identity (zero up-projection, zero LoRA B).
"""
from __future__ import annotations

import copy
import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.core.errors import ConfigError

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu}


class PHMLinear(nn.Module):
    """y = x W^T + b with W = sum_i A_i (x) (s_i t_i^T) (Mahabadi et al. 2021, Eq. 3-5).

    Args:
        rule: the shared slow weights A, shape [n, n, n]; the same Parameter object for every layer.
        rank: rank r of the fast weights B_i = s_i t_i^T, s_i [out/n, r], t_i [r, in/n].
        zero: start with s = 0 (W = 0), as the up-projection of an identity adapter does.

    Raises:
        ConfigError: n does not divide in_features or out_features.
    """

    def __init__(self, in_features: int, out_features: int, rule: nn.Parameter, rank: int = 1,
                 bias: bool = True, zero: bool = False) -> None:
        super().__init__()
        n = rule.shape[0]
        for what, dim in (("in", in_features), ("out", out_features)):
            if dim % n:
                raise ConfigError(f"PHM layer {in_features}->{out_features}: n={n} does not divide the {what} "
                                  f"dimension {dim}; choose n among the common divisors "
                                  f"{[d for d in range(1, min(in_features, out_features) + 1) if not in_features % d and not out_features % d][:12]}")
        self.in_features, self.out_features, self.n, self.rank = in_features, out_features, n, rank
        self.rule = rule
        scale = in_features ** -0.25  # var(W) = n * var(A) * var(s) * var(t) ~ 1 / in_features
        self.s = nn.Parameter(torch.zeros(n, out_features // n, rank) if zero
                              else torch.randn(n, out_features // n, rank) * scale / rank ** 0.25)
        self.t = nn.Parameter(torch.randn(n, rank, in_features // n) * scale / rank ** 0.25)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def weight(self) -> torch.Tensor:
        """The dense [out, in] matrix sum_i kron(A_i, s_i t_i^T)."""
        fast = self.s @ self.t  # B_i, [n, out/n, in/n]
        return torch.einsum("nij,nkl->ikjl", self.rule, fast).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)

    def to_dense(self) -> nn.Linear:
        """An nn.Linear holding the same matrix (exact)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(self.weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense


def init_rule(n: int, generator: torch.Generator | None = None) -> nn.Parameter:
    """Shared slow weights A [n, n, n], N(0, 1/n) so that W keeps the fast weights' scale."""
    return nn.Parameter(torch.randn(n, n, n, generator=generator) / math.sqrt(n))


class Adapter(nn.Module):
    """h + up(act(down(h))) (Houlsby et al. 2019); up starts at zero so the adapter is the identity."""

    def __init__(self, width: int, bottleneck: int, nonlinearity: str = "gelu", rule: nn.Parameter | None = None,
                 rank: int = 1) -> None:
        super().__init__()
        if nonlinearity not in ACTIVATIONS:
            raise ConfigError(f"nonlinearity must be one of {sorted(ACTIVATIONS)}, got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        if rule is None:
            self.down, self.up = nn.Linear(width, bottleneck), nn.Linear(bottleneck, width)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        else:
            self.down = PHMLinear(width, bottleneck, rule, rank)
            self.up = PHMLinear(bottleneck, width, rule, rank, zero=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(ACTIVATIONS[self.nonlinearity](self.down(h)))


class AdaptedSite(nn.Module):
    """A trained module followed by an adapter: adapter(inner(...)); the first element of a tuple output."""

    def __init__(self, inner: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.inner, self.adapter = inner, adapter

    @classmethod
    def from_module(cls, inner: nn.Module, adapter: Adapter) -> "AdaptedSite":
        return cls(inner, adapter)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.adapter(out[0]),) + out[1:]
        return self.adapter(out)


class LoRALinear(nn.Module):
    """x W^T + b + (alpha / r) x A^T B^T (Hu et al. 2022, Eq. 3); B starts at zero."""

    def __init__(self, inner: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.inner, self.rank, self.scale = inner, rank, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, inner.in_features))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_b = nn.Parameter(torch.zeros(inner.out_features, rank))

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float) -> "LoRALinear":
        if rank > min(linear.in_features, linear.out_features):
            raise ConfigError(f"LoRA rank {rank} exceeds the Linear's {linear.in_features}x{linear.out_features}")
        return cls(linear, rank, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    def merge(self) -> nn.Linear:
        """The Linear with W + (alpha / r) B A (exact): no extra cost at inference."""
        merged = copy.deepcopy(self.inner)
        with torch.no_grad():
            merged.weight.add_(self.scale * self.lora_b @ self.lora_a)
        return merged


class AdaptedModel(nn.Module):
    """Frozen base (with adapters inside) + optional new task head + the shared PHM rule.

    Built by `adapted_model`, which gives `forward` the base's own signature (named inputs for
    sessions and ONNX export).
    """

    def __init__(self, base: nn.Module, head: nn.Module | None, rule: nn.Parameter | None) -> None:
        super().__init__()
        if rule is not None:
            self.phm_rule = rule  # registered first: named_parameters() names the shared A "phm_rule"
        self.base = base
        self.head = head if head is not None else nn.Identity()

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.head(self.base(*args, **kwargs))


def adapted_model(base: nn.Module, head: nn.Module | None, rule: nn.Parameter | None) -> AdaptedModel:
    """An AdaptedModel whose forward shows the base's parameters (input names) to inspect.signature."""
    params = list(inspect.signature(base.forward).parameters.values())
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return AdaptedModel.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.Signature([self_param] + params)
    cls = type("AdaptedModel", (AdaptedModel,), {"forward": forward, "__doc__": AdaptedModel.__doc__})
    return cls(base, head, rule)
