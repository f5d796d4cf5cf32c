"""Super-resolution model definitions: ESPCN, the bicubic baseline, an FSRCNN-style and an SRCNN model.

A leaf beside the zoo (imports only torch and edgeslim.core.errors), so compressors (compress/subpixel.py),
the zoo and the benchmarks all build the same classes. Every model works on [B, C, H, W] images with
values in [0, 1] (the Y channel of YCbCr by default) and is called as model(x=...).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.core.errors import ConfigError

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def check_scale(scale: Any) -> int:
    """`scale` as a positive int (ConfigError otherwise)."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ConfigError(f"scale must be a positive integer (2, 3 or 4 for the shipped models), got {scale!r}")
    return scale


class ESPCN(nn.Module):
    """ESPCN (Shi et al. 2016): convs with tanh in LR space, a last conv to r^2 channels, PixelShuffle.

    Works on the Y channel of YCbCr (in_channels=1), values in [0, 1]; forward(x) maps
    [B, C, H, W] to [B, C, rH, rW]. Parameters: sum over layers of c_in*c_out*k^2 + c_out, the last
    layer having c_out = C*r^2. Kernels are odd, zero-padded by k // 2 ("same"), so the receptive
    field is 1 + sum(k - 1) LR pixels and a tile with that many pixels of overlap is exact.
    """

    def __init__(self, scale: int, channels: tuple[int, ...] = (64, 32), kernels: tuple[int, ...] = (5, 3, 3),
                 activation: str = "tanh", in_channels: int = 1):
        super().__init__()
        check_scale(scale)
        channels, kernels = tuple(channels), tuple(kernels)
        if len(kernels) != len(channels) + 1:
            raise ConfigError(f"ESPCN needs one kernel size per hidden layer plus the last: {len(channels)} "
                              f"channels need {len(channels) + 1} kernels, got {kernels}")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not all(isinstance(v, int) and v > 0 for v in channels + kernels + (in_channels,)):
            raise ConfigError(f"channels, kernels and in_channels must be positive integers, got "
                              f"{channels}, {kernels}, {in_channels}")
        if any(k % 2 == 0 for k in kernels):
            raise ConfigError(f"ESPCN kernels must be odd (same-size zero padding), got {kernels}")
        self.architecture = {"scale": scale, "channels": list(channels), "kernels": list(kernels),
                             "activation": activation, "in_channels": in_channels}
        layers: list[nn.Module] = []
        c = in_channels
        for ch, k in zip(channels, kernels):
            layers += [nn.Conv2d(c, ch, k, padding=k // 2), ACTIVATIONS[activation]()]
            c = ch
        self.features = nn.Sequential(*layers)
        k = kernels[-1]
        self.upsample = nn.Sequential(OrderedDict(conv=nn.Conv2d(c, in_channels * scale ** 2, k, padding=k // 2),
                                                  shuffle=nn.PixelShuffle(scale)))

    @property
    def halo(self) -> int:
        """LR pixels on each side that influence an output pixel (the overlap exact tiling needs)."""
        return sum(k // 2 for k in self.architecture["kernels"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.features(x))


class BicubicUpsampler(nn.Module):
    """Bicubic interpolation by `scale` as a module (the baseline, and the default ESPCN teacher).

    torch's bicubic uses a = -0.75 (PIL and MATLAB use -0.5); it exports to ONNX Resize (cubic).
    """

    def __init__(self, scale: int):
        super().__init__()
        self.scale = check_scale(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)


class DeconvSR(nn.Module):
    """FSRCNN-style model (Dong, Loy & Tang 2016): LR convs with PReLU, then a stride-r ConvTranspose2d.

    Defaults are the small FSRCNN-s (d=32, s=5, m=1, 9x9 deconvolution); output is exactly r*H x r*W.
    """

    def __init__(self, scale: int, d: int = 32, s: int = 5, m: int = 1, kernel: int = 9, in_channels: int = 1):
        super().__init__()
        check_scale(scale)
        pad = math.ceil((kernel - scale) / 2)
        if pad < 0:
            raise ConfigError(f"deconvolution kernel {kernel} must be at least the scale {scale}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, d, 5, padding=2), nn.PReLU(d), nn.Conv2d(d, s, 1), nn.PReLU(s)]
        for _ in range(m):
            layers += [nn.Conv2d(s, s, 3, padding=1), nn.PReLU(s)]
        layers += [nn.Conv2d(s, d, 1), nn.PReLU(d)]
        self.features = nn.Sequential(*layers)
        self.upsample = nn.ConvTranspose2d(d, in_channels, kernel, stride=scale, padding=pad,
                                           output_padding=2 * pad - (kernel - scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.features(x))


class SRCNN(nn.Module):
    """SRCNN (Dong et al. 2014/2016, 9-5-5): bicubic upsampling first, then three convs in HR space."""

    def __init__(self, scale: int, channels: tuple[int, int] = (64, 32), kernels: tuple[int, int, int] = (9, 5, 5),
                 in_channels: int = 1):
        super().__init__()
        self.upscale = BicubicUpsampler(scale)
        (c1, c2), (k1, k2, k3) = channels, kernels
        self.body = nn.Sequential(nn.Conv2d(in_channels, c1, k1, padding=k1 // 2), nn.ReLU(),
                                  nn.Conv2d(c1, c2, k2, padding=k2 // 2), nn.ReLU(),
                                  nn.Conv2d(c2, in_channels, k3, padding=k3 // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.upscale(x))
