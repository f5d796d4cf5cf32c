"""SeparableConv2d / SeparableConv3d: convolutions as products of one-way filters (CP form).

Boukraichi et al., "A priori compression of convolutional neural networks for wave simulators"
(arXiv 2304.04964, 2023): a d-way kernel is replaced by a rank-R canonical polyadic (CP) product
of one-way factors (their Sec. 3, the CP format W = sum_r a_r (x) b_r (x) v_r (x) h_r), and the
network is trained in that form from the start. The same layer compresses a trained convolution
when its factors come from a CP decomposition of the kernel (Lebedev et al., "Speeding-up
convolutional neural networks using fine-tuned CP-decomposition", ICLR 2015, eq. 2-5).

For a Conv2d kernel W[o, i, y, x] (per group) of rank R:
    W[o, i, y, x] = sum_r A[o, r] B[i, r] V[y, r] H[x, r]
computed as four convolutions (plain ONNX Conv, plus a Pad for asymmetric padding):
    in_proj   1x1,      Cin -> g*R, groups g, no bias       R*Cin weights        (B)
    filter_y  kh x 1,   depthwise on g*R, stride/dil. in y  g*R*kh weights       (V)
    filter_x  1 x kw,   depthwise on g*R, stride/dil. in x  g*R*kw weights       (H)
    out_proj  1x1,      g*R -> Cout, groups g, bias          R*Cout (+ Cout)      (A)
Parameters: R*(Cin + Cout + g*(kh + kw)) + Cout, against Conv2d's Cout*(Cin/g)*kh*kw + Cout. An axis
of kernel size 1 has no filter (its factor is absorbed, its stride moves into a 1x1 projection), so a
1x1 convolution becomes a rank-R pair of 1x1 convolutions (truncated SVD). Conv3d adds filter_z
(kd x 1 x 1): R*(Cin + Cout + g*(kd + kh + kw)) + Cout.

Exactness: any kernel is represented exactly at rank R* = prod(n) / max(n) over the per-group
modes n = (Cout/g, Cin/g, k_1, ...) of size > 1 (e.g. Cin*kh*kw when Cout is the largest): one
component per multi-index of the other modes, with unit vectors there and the kernel's fiber along
the largest mode (`exact_factors`, no ALS).
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.core.errors import ConfigError, require

_CONVS = {2: nn.Conv2d, 3: nn.Conv3d}


def _tuple(value: int | Sequence[int], ndim: int, key: str) -> tuple[int, ...]:
    out = (value,) * ndim if isinstance(value, int) else tuple(value)
    if len(out) != ndim or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in out):
        raise ConfigError(f"{key} must be a positive int or {ndim} of them, got {value!r}")
    return out


def _padding_pairs(padding: str | int | Sequence[int], kernel: tuple[int, ...], dilation: tuple[int, ...],
                   stride: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """(before, after) zero padding per spatial axis from an int, per-axis ints, 2*ndim ints or a string."""
    ndim = len(kernel)
    if padding == "valid":
        return ((0, 0),) * ndim
    if padding == "same":
        if any(s != 1 for s in stride):
            raise ConfigError(f"padding='same' needs stride 1, got stride {stride}")
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in total)  # torch's split: the extra pixel after
    if isinstance(padding, int):
        padding = (padding,) * ndim
    pad = tuple(padding) if not isinstance(padding, str) else ()
    if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in pad) or len(pad) not in (ndim, 2 * ndim):
        raise ConfigError(f"padding must be 'same', 'valid', an int >= 0, {ndim} ints or {2 * ndim} ints "
                          f"(before, after per axis), got {padding!r}")
    if len(pad) == ndim:
        return tuple((p, p) for p in pad)
    return tuple((pad[2 * a], pad[2 * a + 1]) for a in range(ndim))


class SeparableConvNd(nn.Module):
    """Rank-R CP convolution: 1x1 into g*R channels, one depthwise one-way filter per spatial axis of
    kernel size > 1, 1x1 back out (see the module docstring for the structure and parameter count).

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, groups, bias: as for nn.ConvNd.
        rank: R, components per group (g*R channels between the projections).
        padding: 'same', 'valid', an int, one int per axis, or (before, after) per axis (asymmetric).
    """

    ndim: int = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int], rank: int,
                 stride: int | Sequence[int] = 1, padding: str | int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        nd = self.ndim
        conv = _CONVS[nd]
        self.kernel_size = _tuple(kernel_size, nd, "kernel_size")
        self.stride = _tuple(stride, nd, "stride")
        self.dilation = _tuple(dilation, nd, "dilation")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ConfigError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {rank!r}")
        self.in_channels, self.out_channels, self.groups, self.rank = in_channels, out_channels, groups, rank
        self.pads = _padding_pairs(padding, self.kernel_size, self.dilation, self.stride)
        self.axes = [a for a, k in enumerate(self.kernel_size) if k > 1]  # axes that get a filter
        # a kernel-1 axis: its stride goes into in_proj when it has no padding, else into out_proj
        early = tuple(s if k == 1 and self.pads[a] == (0, 0) else 1
                      for a, (k, s) in enumerate(zip(self.kernel_size, self.stride)))
        late = tuple(s if k == 1 and self.pads[a] != (0, 0) else 1
                     for a, (k, s) in enumerate(zip(self.kernel_size, self.stride)))
        mid = groups * rank
        self.in_proj = conv(in_channels, mid, 1, stride=early, groups=groups, bias=False)
        # symmetric padding of a filtered axis stays in its conv; the rest is one explicit Pad
        self.filters = nn.ModuleList()
        pad_rest = []
        for a in range(nd):
            before, after = self.pads[a]
            inside = a in self.axes and before == after
            pad_rest.append((0, 0) if inside else (before, after))
            if a in self.axes:
                def along(v: int, rest: int, a: int = a) -> tuple[int, ...]:
                    return tuple(v if b == a else rest for b in range(nd))

                self.filters.append(conv(mid, mid, along(self.kernel_size[a], 1), stride=along(self.stride[a], 1),
                                         padding=along(before if inside else 0, 0),
                                         dilation=along(self.dilation[a], 1), groups=mid, bias=False))
        # F.pad takes the last axis first
        self.explicit_pad = tuple(v for pair in reversed(pad_rest) for v in pair)
        self.out_proj = conv(mid, out_channels, 1, stride=late, groups=groups, bias=bias)
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.in_proj(x)
        if any(self.explicit_pad):
            y = F.pad(y, self.explicit_pad)
        for f in self.filters:
            y = f(y)
        return self.out_proj(y)

    @property
    def weight(self) -> torch.Tensor:
        """The equivalent dense kernel (the CP product), computed on each access: code that reads a conv's
        `.weight` (its dtype, device or shape, as ViT's patch embedding does) keeps working."""
        return self.dense_kernel()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.out_proj.bias

    @property
    def per_group_modes(self) -> tuple[int, ...]:
        """Sizes of the CP modes per group: (Cout/g, Cin/g, k of each filtered axis)."""
        return (self.out_channels // self.groups, self.in_channels // self.groups,
                *(self.kernel_size[a] for a in self.axes))

    @staticmethod
    def param_count(in_channels: int, out_channels: int, kernel_size: Sequence[int], rank: int, groups: int = 1,
                    bias: bool = True) -> int:
        """R*(Cin + Cout + g*sum of kernel sizes > 1) + Cout: the formula of the module docstring."""
        return rank * (in_channels + out_channels + groups * sum(k for k in kernel_size if k > 1)) + \
            (out_channels if bias else 0)

    @classmethod
    def exact_rank(cls, conv: nn.Module) -> int:
        """R* = prod(n) / max(n) over the per-group modes n: the rank `from_conv` reproduces exactly."""
        modes = [conv.out_channels // conv.groups, conv.in_channels // conv.groups,
                 *(k for k in conv.kernel_size if k > 1)]
        return math.prod(modes) // max(modes)

    def reset_parameters(self, gain: float = 3 ** -0.5) -> None:
        """Fresh, variance-preserving init for training from scratch (a priori use).

        Every stage keeps the variance of its input (uniform weights of variance 1/fan_in, fan_in =
        Cin/g, k or R), and out_proj has gain^2/R, so the effective kernel has variance gain^2 /
        (Cin/g * prod k), that of the dense layer; the default gain^2 = 1/3 is PyTorch's Conv
        default (kaiming_uniform with a = sqrt(5)). The bias is uniform(+-1/sqrt(fan_in)) as there.
        """
        def fill(w: torch.Tensor, var: float) -> None:
            bound = math.sqrt(3.0 * var)
            nn.init.uniform_(w, -bound, bound)

        with torch.no_grad():
            fill(self.in_proj.weight, 1.0 / (self.in_channels // self.groups))
            for a, f in zip(self.axes, self.filters):
                fill(f.weight, 1.0 / self.kernel_size[a])
            fill(self.out_proj.weight, gain ** 2 / self.rank)
            if self.out_proj.bias is not None:
                fan_in = self.in_channels // self.groups * math.prod(self.kernel_size)
                nn.init.uniform_(self.out_proj.bias, -fan_in ** -0.5, fan_in ** -0.5)

    # -- factors <-> weights ---------------------------------------------------------------------
    def factors(self) -> list[torch.Tensor]:
        """Per-group CP factors [A (g, Cout/g, R), B (g, Cin/g, R), one (g, k, R) per filtered axis]."""
        g, r = self.groups, self.rank
        out = [self.out_proj.weight.reshape(g, -1, r), self.in_proj.weight.reshape(g, r, -1).transpose(1, 2)]
        for a, f in zip(self.axes, self.filters):
            out.append(f.weight.reshape(g, r, self.kernel_size[a]).transpose(1, 2))
        return out

    @torch.no_grad()
    def set_factors(self, factors: Sequence[torch.Tensor], bias: torch.Tensor | None = None) -> None:
        """Load per-group factors (layout of `factors()`); each component is rescaled so that all its
        vectors have one norm (the product is unchanged and one learning rate suits every stage)."""
        factors = [f.to(torch.float64) for f in factors]
        norms = torch.stack([f.norm(dim=1) for f in factors])  # (modes, g, R)
        geo = norms.clamp_min(1e-300).log().mean(0).exp()
        factors = [f * torch.where(n > 0, geo / n.clamp_min(1e-300), 1.0)[:, None, :] for f, n in zip(factors, norms)]
        dtype = self.in_proj.weight.dtype
        self.out_proj.weight.copy_(factors[0].reshape(self.out_proj.weight.shape).to(dtype))
        self.in_proj.weight.copy_(factors[1].transpose(1, 2).reshape(self.in_proj.weight.shape).to(dtype))
        for f, fac in zip(self.filters, factors[2:]):
            f.weight.copy_(fac.transpose(1, 2).reshape(f.weight.shape).to(dtype))
        if bias is not None and self.out_proj.bias is not None:
            self.out_proj.bias.copy_(bias.to(dtype))

    def dense_kernel(self) -> torch.Tensor:
        """The equivalent ConvNd weight (Cout, Cin/g, *kernel_size)."""
        facs = self.factors()
        letters = "ijklm"[:len(facs)]  # o, i, then one per filtered axis
        expr = ",".join(f"g{c}r" for c in letters) + "->g" + letters
        core = torch.einsum(expr, *facs)  # (g, Cout/g, Cin/g, k_axes...)
        shape = [self.out_channels, self.in_channels // self.groups] + [1] * self.ndim
        for a in self.axes:
            shape[2 + a] = self.kernel_size[a]
        return core.reshape(shape)

    def to_dense(self) -> nn.Module:
        """The equivalent nn.Conv2d / nn.Conv3d (its weight is the CP product).

        Raises:
            ConfigError: the padding is asymmetric, which a dense ConvNd cannot express.
        """
        if any(b != a for b, a in self.pads):
            raise ConfigError(f"to_dense: asymmetric padding {self.pads} has no nn.Conv{self.ndim}d form")
        dense = _CONVS[self.ndim](self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                                  padding=tuple(b for b, _ in self.pads), dilation=self.dilation, groups=self.groups,
                                  bias=self.out_proj.bias is not None, dtype=self.in_proj.weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.dense_kernel())
            if self.out_proj.bias is not None:
                dense.bias.copy_(self.out_proj.bias)
        return dense

    # -- construction from a trained convolution ----------------------------------------------------
    @classmethod
    def empty_like(cls, conv: nn.Module, rank: int) -> "SeparableConvNd":
        """A freshly initialised layer with the geometry of `conv`.

        Raises:
            ConfigError: a padding mode other than zeros, or a conv of another dimensionality.
        """
        if not isinstance(conv, _CONVS[cls.ndim]):
            raise ConfigError(f"{cls.__name__} replaces nn.Conv{cls.ndim}d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ConfigError(f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
        padding = conv.padding
        if type(conv).forward is not _CONVS[cls.ndim].forward:
            # EfficientNet's Conv2dStaticSamePadding: a ZeroPad2d (left, right, top, bottom) before the conv
            extra = getattr(conv, "static_padding", None)
            identity = isinstance(extra, nn.Module) and type(extra).__name__ == "Identity"  # theirs or torch's
            if not (isinstance(extra, nn.ZeroPad2d) or identity) or isinstance(padding, str):
                raise ConfigError(f"{type(conv).__name__} overrides Conv{cls.ndim}d.forward; only a static "
                                  "ZeroPad2d before the convolution (Conv2dStaticSamePadding) is understood")
            left, right, top, bottom = extra.padding if isinstance(extra, nn.ZeroPad2d) else (0, 0, 0, 0)
            padding = (top + padding[0], bottom + padding[0], left + padding[1], right + padding[1])
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, rank, stride=conv.stride,
                    padding=padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
        return layer.to(dtype=conv.weight.dtype, device=conv.weight.device)

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: int | None = None, n_iter: int = 100, seed: int = 0
                  ) -> "SeparableConvNd":
        """Factor a trained ConvNd: exact at rank None or R* (`exact_rank`), else the best rank-R CP
        (truncated SVD when only two modes are > 1, which is optimal; TensorLy's ALS `parafac`
        from an SVD start otherwise).

        Raises:
            ConfigError: rank above R*, or what `empty_like` refuses.
        """
        exact = cls.exact_rank(conv)
        rank = exact if rank is None else rank
        if rank > exact:
            raise ConfigError(f"rank {rank} is above {exact}, where the CP form is already exact")
        layer = cls.empty_like(conv, rank)
        modes = list(layer.per_group_modes)
        kernel = conv.weight.detach().to(torch.float64).reshape(conv.groups, *modes)
        if rank == exact:
            factors = exact_factors(kernel)
        else:
            factors = cp_factors(kernel, rank, n_iter, seed)
        layer.set_factors(factors, conv.bias.detach() if conv.bias is not None else None)
        return layer

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
                f"stride={self.stride}, padding={self.pads}, dilation={self.dilation}, groups={self.groups}")


class SeparableConv2d(SeparableConvNd):
    """Conv2d as 1x1 -> (kh x 1) depthwise -> (1 x kw) depthwise -> 1x1, rank R per group."""

    ndim = 2


class SeparableConv3d(SeparableConvNd):
    """Conv3d as 1x1x1 -> three one-way depthwise filters (kd, kh, kw) -> 1x1x1, rank R per group."""

    ndim = 3


def separable_class(conv: nn.Module) -> type[SeparableConvNd]:
    """SeparableConv2d for an nn.Conv2d, SeparableConv3d for an nn.Conv3d."""
    return SeparableConv3d if isinstance(conv, nn.Conv3d) else SeparableConv2d


def exact_factors(kernel: torch.Tensor) -> list[torch.Tensor]:
    """Exact CP factors of a batch of tensors (g, n_0, ..., n_d): one component per multi-index of
    every mode but the largest, unit vectors on those modes and the tensor's fiber on the largest;
    rank prod(n) / max(n)."""
    modes = list(kernel.shape[1:])
    free = max(range(len(modes)), key=lambda m: (modes[m], -m))
    g = kernel.shape[0]
    others = [m for m in range(len(modes)) if m != free]
    rank = math.prod(modes[m] for m in others)
    index = torch.cartesian_prod(*[torch.arange(modes[m]) for m in others]).reshape(rank, len(others))
    factors: list[torch.Tensor] = [torch.zeros(0)] * len(modes)
    for j, m in enumerate(others):
        unit = torch.zeros(modes[m], rank, dtype=kernel.dtype)
        unit[index[:, j], torch.arange(rank)] = 1.0
        factors[m] = unit.expand(g, -1, -1)
    fibers = kernel.movedim(1 + free, -1).reshape(g, rank, modes[free])  # row-major over the other modes
    factors[free] = fibers.transpose(1, 2)
    return factors


def cp_factors(kernel: torch.Tensor, rank: int, n_iter: int = 100, seed: int = 0) -> list[torch.Tensor]:
    """Rank-R CP factors of each tensor of a batch (g, n_0, ..., n_d), float64."""
    g, modes = kernel.shape[0], list(kernel.shape[1:])
    big = [m for m, n in enumerate(modes) if n > 1]
    if len(big) == 2:  # a matrix: truncated SVD is the optimal rank-R CP (Eckart-Young)
        mat = kernel.reshape(g, *(modes[m] for m in big))
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        keep = min(rank, s.shape[1])
        left = torch.zeros(g, mat.shape[1], rank, dtype=kernel.dtype)
        right = torch.zeros(g, mat.shape[2], rank, dtype=kernel.dtype)
        left[:, :, :keep] = u[:, :, :keep] * s[:, None, :keep]
        right[:, :, :keep] = vh[:, :keep].transpose(1, 2)
        pair = iter([left, right])
        return [next(pair) if m in big else torch.ones(g, 1, rank, dtype=kernel.dtype) for m in range(len(modes))]
    tl = require("tensorly", purpose="CP decomposition of convolution kernels")
    from tensorly.decomposition import parafac

    per_group = [[] for _ in modes]
    for t in kernel.numpy():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # svd init with rank above a mode size pads randomly (seeded)
            weights, facs = parafac(tl.tensor(t), rank, n_iter_max=n_iter, init="svd", tol=1e-8,
                                    random_state=seed, normalize_factors=False)
        facs = [np.asarray(f) for f in facs]
        facs[0] = facs[0] * np.asarray(weights)[None, :]
        for m, f in enumerate(facs):
            per_group[m].append(torch.from_numpy(np.ascontiguousarray(f)))
    return [torch.stack(f) for f in per_group]

