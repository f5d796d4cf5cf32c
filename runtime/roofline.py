"""Roofline limits and "why no speedup": FLOPs, bytes moved, and the target's peak figures.

The roofline model (Williams, Waterman and Patterson, 2009, "Roofline: an insightful visual
performance model", CACM 52(4)) bounds a kernel's time by max(FLOPs / peak compute, bytes /
memory bandwidth). Applied to a whole model it gives the fastest a target could run it, so a
measured latency can be read as a fraction of the hardware's best.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgeslim.runtime.targets import Profile, load_profile

_BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "int8": 1}
# A compressed model is "short" of its FLOPs reduction when its speedup is below this fraction of
# the FLOPs speedup (the 15% of DESIGN.md "Speedup or explain").
SHORTFALL = 0.15
# Below this fraction of the roofline a run is dominated by fixed per-call costs (kernel launches,
# framework dispatch, small GEMMs that do not fill the cores), not by FLOPs or bytes.
OVERHEAD_BOUND_FRACTION = 0.10


def _as_tensors(module: nn.Module, feeds: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v).to(device)
            for k, v in feeds.items()}


def count_flops(module: nn.Module, feeds: Mapping[str, np.ndarray | torch.Tensor]) -> int:
    """FLOPs of one `module(**feeds)` call, a multiply-add counting 2 (torch's FlopCounterMode).

    Counts matrix products, convolutions and attention (the ops FlopCounterMode knows);
    element-wise ops, norms and softmax are not counted, so this is the GEMM/conv work.
    """
    tensors = _as_tensors(module, feeds)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(**tensors)
    return int(counter.get_total_flops())


def min_bytes_moved(module: nn.Module, feeds: Mapping[str, np.ndarray | torch.Tensor], precision: str = "fp32") -> int:
    """A lower bound on memory traffic for one call: every weight read once, inputs read, outputs written.

    Weights and float outputs are counted at the profile precision's width; inputs at their dtype.
    Activations that spill out of the caches add to this, so the true traffic is higher.
    """
    width = _BYTES_PER_ELEMENT[precision]
    weights = sum(t.numel() for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point())
    tensors = _as_tensors(module, feeds)
    with torch.no_grad():
        out = module(**tensors)
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    return weights * width + sum(t.numel() * t.element_size() for t in tensors.values()) + \
        sum(o.numel() * width for o in outs)


def roofline_ms(flops: float, bytes_moved: float, profile: Profile) -> float:
    """The fastest a call can run on the target: max(FLOPs / peak, bytes / bandwidth), in ms."""
    return max(flops / (profile.peak_gflops * 1e9), bytes_moved / (profile.mem_gbps * 1e9)) * 1e3


def roofline_fraction(measured_ms: float, flops: float, bytes_moved: float, profile: Profile) -> float:
    """How close a measured latency comes to the roofline: roofline_ms / measured_ms (1.0 = at the limit)."""
    if measured_ms <= 0:
        raise ValueError(f"measured latency must be > 0 ms, got {measured_ms}")
    return roofline_ms(flops, bytes_moved, profile) / measured_ms


def memory_bound(flops: float, bytes_moved: float, profile: Profile) -> bool:
    """True when bytes / bandwidth exceeds FLOPs / peak: arithmetic intensity below the ridge point."""
    return bytes_moved / (profile.mem_gbps * 1e9) > flops / (profile.peak_gflops * 1e9)


def explain_speedup(flops_ratio: float, params_ratio: float, latency_ratio: float, *, profile: Profile | str,
                    batch: int, flops: float | None = None, bytes_moved: float | None = None,
                    latency_ms: float | None = None, changes: Sequence[Mapping[str, Any]] = ()) -> str | None:
    """Why a compressed model is not as much faster as its FLOPs say, or None when it is.

    All ratios are compressed / original (0.5 = half). The model falls short when its measured
    speedup (1 / latency_ratio) is below (1 - SHORTFALL) of the FLOPs speedup (1 / flops_ratio).
    Pure function: every fact comes in as an argument.

    Args:
        flops_ratio, params_ratio, latency_ratio: compressed / original.
        profile: the target the latencies were measured on (Profile or shipped name).
        batch: batch size of the measurement.
        flops, bytes_moved, latency_ms: the compressed model's FLOPs, bytes moved (e.g.
            min_bytes_moved) and measured latency at this batch, to place it on the roofline.
        changes: per-layer change records as dicts (LayerChange.to_dict()) with "name", "status"
            ("dense" and "skipped" layers were left as they were; "adapter", "quantized", ... never
            count as dense) and "decision" (a rank, kept channel count or a list of bond
            dimensions; one not a multiple of profile.align is unaligned).

    Returns:
        One short sentence of "; "-joined causes, or None when the latency follows the FLOPs.
    """
    for name, r in (("flops_ratio", flops_ratio), ("params_ratio", params_ratio), ("latency_ratio", latency_ratio)):
        if not r > 0:
            raise ValueError(f"{name} must be > 0, got {r}")
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    left = {status: [c["name"] for c in changes if c.get("status") == status] for status in ("dense", "skipped")}
    dims = {c["name"]: c["decision"] for c in changes if c.get("decision") is not None}
    achieved = flops_ratio / latency_ratio  # measured speedup / FLOPs speedup
    if achieved >= 1 - SHORTFALL:
        return None
    reasons = []
    located = flops is not None and bytes_moved is not None
    if located and latency_ms is not None and \
            roofline_fraction(latency_ms, flops, bytes_moved, profile) < OVERHEAD_BOUND_FRACTION:
        frac = roofline_fraction(latency_ms, flops, bytes_moved, profile)
        reasons.append(f"batch {batch} is too small to fill the {profile.device} (runs at {frac:.0%} of the "
                       "roofline: fixed per-call costs dominate, not FLOPs)")
    elif profile.device == "cuda" and batch < 8 and not located:
        reasons.append(f"batch {batch} is likely too small to fill the GPU")
    if located and memory_bound(flops, bytes_moved, profile):
        reasons.append(f"memory-bound at this size per the roofline (bytes moved, which follow the params "
                       f"ratio {params_ratio:.2f}, not FLOPs, set the time)")
    for status, names in left.items():
        if names:
            shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
            verb = "stayed dense" if status == "dense" else "were skipped (their parent reads the weight itself)"
            reasons.append(f"{len(names)} targeted layer(s) {verb} ({shown})")
    unaligned = {k: v for k, v in dims.items()
                 if any(int(d) % profile.align for d in (v if isinstance(v, (list, tuple)) else [v]))}
    if unaligned:
        k, v = next(iter(unaligned.items()))
        reasons.append(f"{len(unaligned)} shape(s) not a multiple of align={profile.align} for "
                       f"{profile.name} (e.g. {k}: {v})")
    head = f"latency ratio {latency_ratio:.2f} vs FLOPs ratio {flops_ratio:.2f} ({achieved:.0%} of the expected speedup)"
    if not reasons:
        reasons.append("no single cause found: ops the FLOP count leaves out (norms, softmax, copies) or "
                       "runtime overhead take the time")
    return head + ": " + "; ".join(reasons)
