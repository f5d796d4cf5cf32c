"""Weight sparsity baked into dense weights: unstructured magnitude and 2:4 semi-structured masks.

- unstructured: the `sparsity` fraction of smallest-|w| weights of each targeted layer set to zero
  (magnitude pruning, Han et al., "Learning both Weights and Connections", NeurIPS 2015).
- 2:4: in every group of 4 consecutive weights along the input dimension (Linear columns, Conv
  input channels at each kernel position) the 2 smallest |w| are zero: the pattern of NVIDIA's
  Ampere sparse tensor cores and TensorRT's sparse kernels (Mishra et al., "Accelerating Sparse Deep
  Neural Networks", 2021, Sec. 2).

The weights stay dense tensors: the model is exactly as fast on a CPU (ONNX Runtime runs dense
kernels), only a sparse-aware runtime (TensorRT with sparsity enabled on Ampere+) can gain. The
report counts zeros, not parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.compress.base import (CompressContext, CompressResult, Compressor, LayerChange, TargetConfig,
                                    register, working_copy)
from edgeslim.core.specs import TensorSpec
from edgeslim.compress.replace import select_modules
from edgeslim.core.errors import ConfigError

NO_SPEEDUP = "zeros stored densely: no CPU speedup (2:4 needs TensorRT sparse kernels on Ampere+ GPUs)"


@dataclass(frozen=True)
class SparsifyConfig(TargetConfig):
    """Which weights to zero (in the targeted Linear/Conv layers; default: all)."""

    pattern: Literal["unstructured", "2:4"] = "unstructured"  # "unstructured": smallest |w| per layer; "2:4": 2 of every 4 consecutive input weights
    sparsity: float = 0.5  # zeroed fraction per layer for "unstructured" (2:4 is always 0.5)

    def validate(self) -> None:
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.pattern == "2:4" and float(self.sparsity) != 0.5:
            raise ConfigError("the 2:4 pattern zeroes exactly half of the weights: leave sparsity at 0.5")


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask zeroing the floor(sparsity * numel) smallest |w| (ties broken by position)."""
    k = int(sparsity * weight.numel())
    mask = torch.ones(weight.numel(), dtype=torch.bool)
    if k:
        mask[torch.argsort(weight.detach().abs().flatten(), stable=True)[:k]] = False
    return mask.reshape(weight.shape)


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keep-mask with 2 of every 4 consecutive input weights kept (the largest |w|).

    Raises:
        ConfigError: the input dimension is not a multiple of 4.
    """
    w = weight.detach()
    moved = w.movedim(1, -1) if w.dim() > 2 else w  # Conv (out, in, kh, kw) -> (out, kh, kw, in)
    if moved.shape[-1] % 4:
        raise ConfigError(f"2:4 needs an input dimension divisible by 4, got {moved.shape[-1]}")
    groups = moved.abs().reshape(-1, 4)
    top = torch.topk(groups, 2, dim=1, sorted=False).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True).reshape(moved.shape)
    return keep.movedim(-1, 1) if w.dim() > 2 else keep


def is_two_four(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive input weights holds at most 2 non-zeros."""
    moved = weight.movedim(1, -1) if weight.dim() > 2 else weight
    return moved.shape[-1] % 4 == 0 and bool(((moved.reshape(-1, 4) != 0).sum(1) <= 2).all())


@register
class Sparsify(Compressor):
    """Zero weights by magnitude (unstructured) or in the 2:4 pattern; weights stay dense."""

    name = "sparsify"
    Config = SparsifyConfig
    kind = "sparsity"

    def compress(self, model: nn.Module, config: SparsifyConfig, calib: CalibData | None = None,
                 inplace: bool = False, context: CompressContext | None = None) -> CompressResult:
        config = self.make_config(config)
        model = working_copy(model, inplace)
        changes = []
        for name, module in select_modules(model, config.target, config.exclude, types=(nn.Linear, nn.Conv2d)):
            w = module.weight
            grouped = isinstance(module, nn.Conv2d) and module.groups > 1
            if config.pattern == "2:4" and (grouped or w.shape[1] % 4):
                changes.append(LayerChange(name, type(module).__name__, w.numel(), int((w != 0).sum()), status="skipped",
                                           note="left dense: 2:4 needs a dense input dimension divisible by 4"))
                continue
            mask = two_four_mask(w) if config.pattern == "2:4" else magnitude_mask(w, float(config.sparsity))
            with torch.no_grad():
                lost = float((w * ~mask).square().sum() / w.square().sum().clamp_min(1e-30)) ** 0.5
                w.mul_(mask)
            changes.append(LayerChange(name, f"{type(module).__name__} ({config.pattern} sparse)", w.numel(),
                                       int((w != 0).sum()), status="sparsified", rel_error=lost, note=NO_SPEEDUP))
        zeros = sum(c.params_before - c.params_after for c in changes)
        total = sum(c.params_before for c in changes)
        resolved = {"zeros": zeros, "weights": total, "sparsity": zeros / max(total, 1), "note": NO_SPEEDUP}
        return self.result(model, config, changes, resolved)

    def replay(self, model: nn.Module, resolved: Mapping[str, Any], inputs: Sequence[TensorSpec]) -> nn.Module:
        return model  # the zeros are in the saved weights; the structure is unchanged
