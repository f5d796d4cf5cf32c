"""Sub-pixel super-resolution: the SubPixelConv2d layer, exact deconvolution-to-sub-pixel, ESPCN training.

The models themselves (ESPCN, BicubicUpsampler, DeconvSR, SRCNN) live in edgeslim/core/sr_models.py.

Shi et al., "Real-Time Single Image and Video Super-Resolution Using an Efficient Sub-Pixel
Convolutional Neural Network" (CVPR 2016): features are computed in low-resolution (LR) space and a
last convolution to r^2 channels is rearranged by PixelShuffle (periodic shuffling, eq. 4).
Shi et al., "Is the deconvolution layer the same as a convolutional layer?" (arXiv 1609.07009, 2016):
a stride-r ConvTranspose2d equals a convolution in LR space with r^2 sub-kernels followed by that
shuffle, which `SubPixelConv2d.from_conv_transpose` builds exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.compress.base import (CompressContext, CompressResult, Compressor, ConfigBase, LayerChange, TargetConfig,
                                    register, working_copy)
from edgeslim.compress.replace import count_params, select_modules, set_submodule
from edgeslim.compress.train import fit
from edgeslim.core.errors import ConfigError
from edgeslim.core.specs import TensorSpec
from edgeslim.core.sr_models import ESPCN, BicubicUpsampler, check_scale

def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _quad(value: int | tuple[int, ...], key: str) -> tuple[int, int, int, int]:
    quad = (value,) * 4 if isinstance(value, int) else tuple(value)
    if len(quad) != 4 or not all(isinstance(v, int) for v in quad):
        raise ConfigError(f"{key} must be an int or 4 ints (top, bottom, left, right), got {value!r}")
    return quad  # type: ignore[return-value]


def _pad_or_crop(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Zero-pad (positive amounts) or crop (negative amounts) the last two dims; exports as Pad/Slice."""
    if max(top, bottom, left, right) > 0:
        x = F.pad(x, (max(left, 0), max(right, 0), max(top, 0), max(bottom, 0)))
    if min(top, bottom, left, right) < 0:
        h, w = x.shape[-2], x.shape[-1]
        x = x[..., max(-top, 0):h - max(-bottom, 0), max(-left, 0):w - max(-right, 0)]
    return x


class SubPixelConv2d(nn.Module):
    """Conv2d in LR space, PixelShuffle by `scale`, then an HR crop: a stride-`scale` deconvolution.

    Args:
        in_channels, out_channels: channels before and after the upsampling.
        scale: upscaling factor r (the conv has out_channels * r^2 output channels).
        kernel_size: LR kernel size (int or (h, w)).
        padding: LR zero padding (top, bottom, left, right); negative values crop. "same" keeps
            the output at exactly r*H x r*W.
        crop: HR pixels removed after the shuffle (top, bottom, left, right), each >= 0.
        bias: whether the conv has a bias (one per sub-pixel channel).
    """

    def __init__(self, in_channels: int, out_channels: int, scale: int, kernel_size: int | tuple[int, int],
                 padding: str | int | tuple[int, ...] = "same", crop: int | tuple[int, ...] = 0, bias: bool = True):
        super().__init__()
        self.scale = check_scale(scale)
        kh, kw = _pair(kernel_size)
        if padding == "same":
            padding = ((kh - 1) // 2, kh // 2, (kw - 1) // 2, kw // 2)
        self.padding = _quad(padding, "padding")
        self.crop = _quad(crop, "crop")
        if min(self.crop) < 0:
            raise ConfigError(f"crop must be >= 0, got {self.crop}")
        # The symmetric non-negative part of the padding goes into the conv (ONNX Conv pads attribute).
        t, b, left, r = self.padding
        self._conv_pad = (max(0, min(t, b)), max(0, min(left, r)))
        ph, pw = self._conv_pad
        self._extra = (t - ph, b - ph, left - pw, r - pw)
        self.conv = nn.Conv2d(in_channels, out_channels * self.scale ** 2, (kh, kw), padding=self._conv_pad, bias=bias)

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels // self.scale ** 2

    def geometry(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this layer's structure (JSON-ready)."""
        return {"in_channels": self.conv.in_channels, "out_channels": self.out_channels, "scale": self.scale,
                "kernel_size": list(self.conv.kernel_size), "padding": list(self.padding), "crop": list(self.crop),
                "bias": self.conv.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pixel_shuffle(self.conv(_pad_or_crop(x, *self._extra)), self.scale)
        t, b, left, r = self.crop
        if t or b or left or r:
            y = y[..., t:y.shape[-2] - b, left:y.shape[-1] - r]
        return y

    @classmethod
    def from_conv_transpose(cls, deconv: nn.ConvTranspose2d) -> "SubPixelConv2d":
        """The sub-pixel layer computing exactly what `deconv` computes (same weights, rearranged).

        Output phase r of the deconvolution uses the taps w[j*s + r], j = 0..ceil(k/s)-1, on
        x[q - j]: a correlation in LR space with the flipped sub-kernel (Shi et al. 2016b, sec. 3).

        Raises:
            ConfigError: groups != 1, dilation != 1, unequal strides, or non-zero padding mode.
        """
        if not isinstance(deconv, nn.ConvTranspose2d):
            raise ConfigError(f"expected nn.ConvTranspose2d, got {type(deconv).__name__}")
        unsupported = {"groups": deconv.groups != 1, "dilation": tuple(deconv.dilation) != (1, 1),
                       "padding_mode": deconv.padding_mode != "zeros",
                       "stride (unequal in h and w)": deconv.stride[0] != deconv.stride[1]}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ConfigError(f"ConvTranspose2d with {bad} is not supported by SubPixelConv2d (needs groups=1, "
                              f"dilation=1, padding_mode='zeros', equal strides); got groups={deconv.groups}, "
                              f"dilation={deconv.dilation}, stride={deconv.stride}")
        s = deconv.stride[0]
        taps, pads, crops = [], [], []
        for k, p, op in zip(deconv.kernel_size, deconv.padding, deconv.output_padding):
            n = math.ceil(k / s)  # LR taps per phase
            q_lo = p // s  # first LR position of the output, whose phase offset is p % s
            delta = k - 2 * p + op - s  # output length is s*H + delta
            extra = (p + delta - 1) // s - q_lo + 1  # LR positions computed beyond H
            lead = n - 1 - q_lo
            taps.append(n)
            pads += [lead, extra + n - 1 - lead]
            crops += [p - q_lo * s, s * extra - (p - q_lo * s) - delta]
        cin, cout = deconv.in_channels, deconv.out_channels
        layer = cls(cin, cout, s, tuple(taps), padding=tuple(pads), crop=tuple(crops), bias=deconv.bias is not None)
        with torch.no_grad():
            w = deconv.weight.new_zeros(cin, cout, taps[0] * s, taps[1] * s)
            w[..., :deconv.kernel_size[0], :deconv.kernel_size[1]] = deconv.weight
            w = w.reshape(cin, cout, taps[0], s, taps[1], s).flip(2, 4)
            layer.conv.weight.copy_(w.permute(1, 3, 5, 0, 2, 4).reshape(cout * s * s, cin, taps[0], taps[1]))
            if deconv.bias is not None:
                layer.conv.bias.copy_(deconv.bias.repeat_interleave(s * s))
        return layer

    def to_conv_transpose(self) -> nn.ConvTranspose2d:
        """The ConvTranspose2d computing exactly what this layer computes.

        Raises:
            ConfigError: the sub-pixel biases differ within an output channel, or the padding/crop
                has no deconvolution equivalent (padding beyond the kernel, too much crop).
        """
        s, (nh, nw) = self.scale, self.conv.kernel_size
        cin, cout = self.conv.in_channels, self.out_channels
        bias = self.conv.bias
        if bias is not None and not torch.equal(bias.view(cout, s * s), bias.view(cout, s * s)[:, :1].expand(-1, s * s)):
            raise ConfigError("this SubPixelConv2d has a different bias per sub-pixel position, which a "
                              "ConvTranspose2d (one bias per output channel) cannot express")
        w = self.conv.weight.detach().reshape(cout, s, s, cin, nh, nw).permute(3, 0, 4, 1, 5, 2)
        w = w.flip(2, 4).reshape(cin, cout, nh * s, nw * s)
        geometry = []
        for dim, n in enumerate((nh, nw)):
            (lead, trail), (c0, c1) = self.padding[2 * dim:2 * dim + 2], self.crop[2 * dim:2 * dim + 2]
            p = c0 + (n - 1 - lead) * s
            op = s * (lead + trail - 2 * n + 2) - c0 - c1 + 2 * p
            k = n * s
            while k > 1 and op + 1 < s and not w.narrow(2 + dim, k - 1, 1).any():
                k, op = k - 1, op + 1  # a trailing all-zero tap is the same as one more output_padding
            if p < 0 or not 0 <= op < s:
                raise ConfigError(f"padding {self.padding} / crop {self.crop} has no ConvTranspose2d equivalent "
                                  f"(would need padding={p}, output_padding={op} along dim {dim})")
            geometry.append((k, p, op))
        (kh, ph, oph), (kw, pw, opw) = geometry
        deconv = nn.ConvTranspose2d(cin, cout, (kh, kw), stride=s, padding=(ph, pw), output_padding=(oph, opw),
                                    bias=bias is not None)
        with torch.no_grad():
            deconv.weight.copy_(w[..., :kh, :kw])
            if bias is not None:
                deconv.bias.copy_(bias.view(cout, s * s)[:, 0])
        return deconv


@dataclass(frozen=True)
class DeconvToSubpixelConfig(TargetConfig):
    """Which strided ConvTranspose2d layers to convert (all by default); the conversion is exact."""


@register
class DeconvToSubpixel(Compressor):
    """Replace every strided ConvTranspose2d by the equal SubPixelConv2d (Shi et al. 2016b)."""

    name = "deconv_to_subpixel"
    Config = DeconvToSubpixelConfig
    kind = "structural"

    def compress(self, model: nn.Module, config: ConfigBase, calib: CalibData | None = None,
                 inplace: bool = False, context: CompressContext | None = None) -> CompressResult:
        config = self.make_config(config)
        model = working_copy(model, inplace)
        chosen = [(n, m) for n, m in select_modules(model, config.target, config.exclude, types=(nn.ConvTranspose2d,))
                  if tuple(m.stride) != (1, 1)]
        if not chosen:
            raise ConfigError("no strided ConvTranspose2d (stride > 1) among the selected layers; "
                              "a stride-1 deconvolution is already a plain convolution")
        gen = torch.Generator().manual_seed(0)
        changes, layers = [], {}
        for name, deconv in chosen:
            layer = SubPixelConv2d.from_conv_transpose(deconv)
            probe = torch.randn(2, deconv.in_channels, 7, 9, generator=gen, dtype=deconv.weight.dtype)
            with torch.no_grad():
                ref, out = deconv(probe), layer(probe)
            diff = (out - ref).abs().max().item()
            changes.append(LayerChange(name, "ConvTranspose2d -> SubPixelConv2d", count_params(deconv),
                                       count_params(layer), rel_error=((out - ref).norm() / ref.norm()).item(),
                                       note=f"exact conversion; max abs diff {diff:.2e} on a random probe"))
            set_submodule(model, name, layer)
            layers[name] = layer.geometry()
        return self.result(model, config, changes, {"layers": layers})

    def replay(self, model: nn.Module, resolved: Mapping[str, Any], inputs: Sequence[TensorSpec]) -> nn.Module:
        for name, geometry in resolved["layers"].items():
            try:
                model.get_submodule(name)
            except AttributeError as exc:
                raise ConfigError(f"deconv_to_subpixel replay: the model has no module '{name}'") from exc
            set_submodule(model, name, SubPixelConv2d(**geometry))
        return model


@dataclass(frozen=True)
class ESPCNConfig(ConfigBase):
    """ESPCN student architecture and its training (Adam, cosine learning-rate decay, MSE loss)."""

    scale: int = 3  # upscaling factor r
    channels: tuple[int, ...] = (64, 32)  # hidden layer widths (paper: 64, 32)
    kernels: tuple[int, ...] = (5, 3, 3)  # kernel sizes, one more than channels (paper: 5, 3, 3)
    activation: Literal["tanh", "relu"] = "tanh"  # "tanh" as in the paper
    in_channels: int = 1  # 1 = Y channel of YCbCr
    steps: int = 2000  # optimizer steps
    batch_size: int = 16  # patches per step, drawn at random from the calibration pool
    lr: float = 3e-3  # Adam learning rate, decayed by cosine to lr/100
    augment: bool = True  # random flips and 90-degree rotations of each batch
    seed: int = 0  # student initialisation and batch sampling

    def validate(self) -> None:
        ints = {k: getattr(self, k) for k in ("steps", "batch_size", "in_channels")}
        bad = {k: v for k, v in ints.items() if v < 1}
        if bad:
            raise ConfigError(f"espcn: these must be positive integers: {bad}")
        if not self.lr > 0:
            raise ConfigError(f"espcn: lr must be > 0, got {self.lr}")
        ESPCN(self.scale, self.channels, self.kernels, self.activation, self.in_channels)  # validates the rest


def _dihedral(t: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    t = torch.rot90(t, k, dims=(2, 3))
    return t.flip(3) if flip else t


def _augment(batch: dict[str, torch.Tensor], target: torch.Tensor | None, gen: torch.Generator
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The same random rotation by k*90 degrees and flip of the LR batch and its HR target."""
    k, flip = int(torch.randint(4, (1,), generator=gen)), bool(torch.randint(2, (1,), generator=gen))
    return {"x": _dihedral(batch["x"], k, flip)}, None if target is None else _dihedral(target, k, flip)


@register
class ESPCNTrainer(Compressor):
    """Train an ESPCN student on HR targets, or distil the source model (the teacher) into ESPCN form."""

    name = "espcn"
    Config = ESPCNConfig
    kind = "structural"
    needs_calibration = True

    def compress(self, model: nn.Module, config: ConfigBase, calib: CalibData | None = None,
                 inplace: bool = False, context: CompressContext | None = None) -> CompressResult:
        config = self.make_config(config)
        if calib is None:
            raise ConfigError("espcn trains a model: give calibration data (LR patches, optionally HR targets)")
        if any("x" not in batch for batch in calib.batches):
            raise ConfigError(f"espcn: every batch of '{calib.name}' needs the LR images under key 'x'")
        pool_x = torch.cat([batch["x"] for batch in calib.batches]).float()
        pool_y = None if calib.targets is None else torch.cat(list(calib.targets)).float()
        n, c, h, w = pool_x.shape
        r = config.scale
        if c != config.in_channels or (pool_y is not None and tuple(pool_y.shape) != (n, c, r * h, r * w)):
            got = None if pool_y is None else tuple(pool_y.shape)
            raise ConfigError(f"espcn x{r}: LR batches {tuple(pool_x.shape)} and HR targets {got} do not fit "
                              f"in_channels={config.in_channels} and scale={r}")
        teacher = model
        self._target(teacher, pool_x[:1], None if pool_y is None else pool_y[:1], r)  # a x`r` upscaler?
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            student = ESPCN(r, config.channels, config.kernels, config.activation, config.in_channels)
        # the pool reshuffled once, cut into batches that fit() cycles through in a new order each pass
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
        chunks = [order[i:i + config.batch_size] for i in range(0, n, config.batch_size)]
        data = CalibData(calib.name, [{"x": pool_x[idx]} for idx in chunks],
                         None if pool_y is None else [pool_y[idx] for idx in chunks])
        report = fit(student, data, steps=config.steps, lr=config.lr, teacher=teacher, seed=config.seed,
                     schedule="cosine", lr_end=config.lr / 100, augment=_augment if config.augment else None,
                     label=f"training ESPCN x{r}", monitor=context.monitor if context else None)
        student.eval()
        rel = self._rel_error(student, teacher, pool_x[:256], None if pool_y is None else pool_y[:256], r)
        first, tail = report.losses[0], report.tail_loss(50)
        change = LayerChange("model", f"{type(teacher).__name__} -> ESPCN", count_params(teacher),
                             count_params(student), rel_error=rel,
                             note=f"{'ground truth' if pool_y is not None else 'distilled'} on {calib.name}; "
                                  f"MSE {first:.2e} -> {tail:.2e} (last 50 steps)")
        resolved = {"architecture": student.architecture,
                    "training": {"data": calib.name, "samples": n, "targets": pool_y is not None,
                                 "loss_first": first, "loss_last50": tail}}
        return self.result(student, config, [change], resolved)

    @staticmethod
    def _target(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor | None, r: int) -> torch.Tensor:
        if y is not None:
            return y
        was_training = teacher.training
        try:
            with torch.no_grad():
                y = teacher.eval()(x=x)
        finally:
            teacher.train(was_training)
        if tuple(y.shape) != (x.shape[0], x.shape[1], r * x.shape[2], r * x.shape[3]):
            raise ConfigError(f"the teacher maps {tuple(x.shape)} to {tuple(y.shape)}, not a x{r} upscale")
        return y

    def _rel_error(self, student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor | None,
                   r: int) -> float:
        with torch.no_grad():
            ref = self._target(teacher, x, y, r)
            return ((student(x=x) - ref).norm() / ref.norm()).item()

    def replay(self, model: nn.Module, resolved: Mapping[str, Any], inputs: Sequence[TensorSpec]) -> nn.Module:
        return ESPCN(**resolved["architecture"])
