"""What a compression step did beside what was asked, said the same way for every family (as warnings)."""
from __future__ import annotations

from typing import Any

from torch import nn

from edgeslim.compress.base import CompressResult

LINEAR_MAP_FAMILIES = ("svd", "fwsvd", "asvd", "mpo")  # they factor nn.Linear / Conv1D weights, never a conv
RATIO_SLACK = 0.02  # a reached ratio this much above the asked one (rounding to align) is not worth a word


def step_warnings(result: CompressResult, before: nn.Module) -> list[str]:
    """A requested kept-params ratio the step did not reach (with the reached one), and a linear-map
    family applied to a model whose parameters sit mostly in convolutions (pointing to factorize/prune)."""
    out: list[str] = []
    config: dict[str, Any] = result.config
    ratio = config.get("ratio")
    asked = result.params_before
    if isinstance(ratio, (int, float)) and asked:
        reached = result.params_after / asked
        if reached > ratio + RATIO_SLACK:
            dense = sum(c.status in ("dense", "skipped") for c in result.changes)
            out.append(f"{result.method}: ratio {ratio:g} asked, {reached:.3f} reached on the targeted layers "
                       f"({dense} of {len(result.changes)} left as they were: no smaller shape saved parameters there)")
    if result.method in LINEAR_MAP_FAMILIES:
        fused = [f"{n} ({type(m).__name__})" for n, m in before.named_modules()
                 if isinstance(m, (nn.MultiheadAttention, nn.RNNBase))]
        if fused:
            out.append(f"{result.method} does not factor {', '.join(fused[:4])}{' ...' if len(fused) > 4 else ''}: "
                       "their weights (in_proj_weight, recurrent gates) are not nn.Linear maps; int8 or prune "
                       "reach them")
        convs = sum(p.numel() for m in before.modules() if isinstance(m, nn.modules.conv._ConvNd)
                    for p in m.parameters(recurse=False))
        total = sum(p.numel() for p in before.parameters()) or 1
        if convs / total >= 0.5:
            out.append(f"{result.method} factors linear maps (nn.Linear, Conv1D); this model's convolutions "
                       f"({convs / total:.0%} of its parameters) are left as they are: use -m factorize (low-rank "
                       "convolutions) or -m prune (channels) for them")
    return out
