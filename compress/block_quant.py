"""Block-wise integer weights without NNCF: GGUF's grids (Q4_1 and Q8_0), for `wq` mode `int4_min`.

Each block of `group` consecutive input weights of a row is stored as integers with fp32 constants:
- `int4_min` (llama.cpp's Q4_1, Gerganov et al., ggml `quantize_row_q4_1`): w = d * q + m, q in 0..15,
  d = (max - min) / 15, m = min. The minimum is a float, which NNCF's asymmetric INT4 (an integer zero
  point, w = s * (q - z)) cannot hold: a model shipped on a Q4_1 grid (SmolLM2's GGUF) re-quantized
  with it lands off its own grid, while this grid finds it again (q, d and m back to fp32 rounding);
- `int8_sym` (Q8_0): w = d * q, q in -127..127, d = max|w| / 127; the embeddings and the LM head (the
  layers NNCF keeps at 8 bits in int4), found on Q8_0 in the same GGUF.
The model keeps fp32 weights snapped onto the grid (the artifact stores them, the record names each
weight's grid, so a replay needs no data: the integers are read back from the weights on export);
`IntegerWeight` is the integer form export/nbits.py writes into a cache graph (MatMulNBits, with the
float minimum added as a block-sum correction).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

GRIDS = ("int4_min", "int8_sym")


@dataclass(frozen=True)
class IntegerWeight:
    """One quantized weight [N, K] as unsigned integers: w[n, k] = scale[n, g] * (q[n, k] - zero[n, g])
    (+ offset[n, g] when given), g = k // (K / G). Symmetric modes are shifted to unsigned (zero = 8 or
    128), so every mode reads alike; a float minimum m (int4_min) is an integer zero point z plus the
    offset m + d * z, itself kept on a symmetric int8 grid (`offset_grid`: what the ONNX file stores)."""

    q: torch.Tensor  # uint8 [N, K], values < 2**bits
    scale: torch.Tensor  # float32 [N, G]
    zero: torch.Tensor  # uint8 [N, G]
    bits: int  # 4 or 8
    offset: torch.Tensor | None = None  # float32 [N, G]: what a block's float minimum adds (int4_min), else None
    offset_q: torch.Tensor | None = None  # uint8 [N, G]: offset = offset_scale * (offset_q - 128), per OFFSET_BLOCK
    offset_scale: torch.Tensor | None = None  # float32 [N, ceil(G / OFFSET_BLOCK)]

    def dense(self) -> torch.Tensor:
        """The fp32 weight these integers define (computed in fp32: what MatMulNBits computes)."""
        n, k = self.q.shape
        groups = self.scale.shape[1]
        q = self.q.reshape(n, groups, k // groups).float()
        w = (q - self.zero.float()[..., None]) * self.scale[..., None]
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.reshape(n, k)


def offset_grid(offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offset on the grid, q uint8 [N, G], scale [N, ceil(G / OFFSET_BLOCK)]): symmetric int8 per
    OFFSET_BLOCK consecutive blocks, offset = scale * (q - 128). int4_min's offsets (|offset| <= d / 2) then
    take 1 byte per block in the file, not 4, added by an 8-bit MatMulNBits over the block sums
    (export/nbits.py); what this moves a weight is at most 1/254 of the largest offset in its OFFSET_BLOCK
    blocks (under 1/508 of their largest step d)."""
    from edgeslim.core.onnx_io import OFFSET_BLOCK
    n, g = offset.shape
    o = nn.functional.pad(offset.float(), (0, -g % OFFSET_BLOCK)).reshape(n, -1, OFFSET_BLOCK)
    scale = o.abs().amax(-1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(o / scale[..., None])
    value = (q * scale[..., None]).reshape(n, -1)[:, :g]
    return value, (q + 128).reshape(n, -1)[:, :g].to(torch.uint8), scale


def _blocks(weight: torch.Tensor, group: int | None) -> torch.Tensor:
    w = weight.detach().float()
    n, k = w.shape
    return w.reshape(n, 1 if group is None else k // group, k if group is None else group)


def grid_weight(weight: torch.Tensor, grid: str, group: int | None) -> IntegerWeight:
    """`weight` [N, K] on `grid` ("int4_min" or "int8_sym") in blocks of `group` inputs (None: per row)."""
    b = _blocks(weight, group)
    n, groups, size = b.shape
    if grid == "int4_min":
        lo, hi = b.amin(-1), b.amax(-1)
        d = (hi - lo) / 15
        d = torch.where(d > 0, d, torch.ones_like(d))  # a constant block: q = 0, w = m
        q = torch.clamp(torch.round((b - lo[..., None]) / d[..., None]), 0, 15)
        # w = d * (q - z) + (m + d * z): the integer zero point nearest -m / d takes the bulk of the minimum, the
        # offset only the rest (|offset| <= d / 2 inside the grid), so the two terms a runtime sums stay small
        z = torch.clamp(torch.round(-lo / d), 0, 15)
        offset, offset_q, offset_scale = offset_grid(lo + d * z)
        return IntegerWeight(q.reshape(n, -1).to(torch.uint8), d, z.to(torch.uint8), 4, offset, offset_q, offset_scale)
    if grid == "int8_sym":
        d = b.abs().amax(-1) / 127
        d = torch.where(d > 0, d, torch.ones_like(d))
        q = torch.clamp(torch.round(b / d[..., None]), -127, 127) + 128
        return IntegerWeight(q.reshape(n, -1).to(torch.uint8), d, torch.full((n, groups), 128, dtype=torch.uint8), 8)
    raise ValueError(f"unknown grid {grid!r}; known: {GRIDS}")


def grid_layers(model: nn.Module, kept: Mapping[str, str]) -> dict[str, str]:
    """{parameter: grid} for `int4_min`: every nn.Linear weight at int4_min, the embeddings and the
    output projection (the LM head, tied or not) at int8_sym; the modules in `kept` stay fp32."""
    head = None
    get_head = getattr(getattr(model, "hf", model), "get_output_embeddings", None)
    out_emb = get_head() if callable(get_head) else None
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in kept]
    if out_emb is not None:
        head = next((n for n, m in linears if m is out_emb), None)
    elif linears:
        head = linears[-1][0]
    layers: dict[str, str] = {}
    params = {id(p): name for name, p in model.named_parameters()}  # the first name of a tied tensor
    for name, m in model.named_modules():
        if name in kept:
            continue
        if isinstance(m, nn.Embedding):
            layers[params[id(m.weight)]] = "int8_sym"
        elif isinstance(m, nn.Linear):
            layers.setdefault(params[id(m.weight)], "int8_sym" if name == head else "int4_min")
    return layers


def _group_for(weight: torch.Tensor, grid: str, group: int | None) -> int | None:
    """int4_min: `group` (the plan checked it divides every row); int8_sym: `group` where it divides the
    row, else per row."""
    return group if group is not None and (grid == "int4_min" or weight.shape[1] % group == 0) else None


def integers(model: nn.Module, layers: Mapping[str, str], group: int | None) -> dict[str, IntegerWeight]:
    """The integers of each weight in `layers` on its grid; on a snapped model (a replayed artifact) the
    grid is found again from the weights."""
    return {name: grid_weight(model.get_parameter(name), grid, _group_for(model.get_parameter(name), grid, group))
            for name, grid in layers.items()}


def snap(model: nn.Module, layers: Mapping[str, str], group: int | None) -> dict[str, IntegerWeight]:
    """Replace each weight in `layers` (in place) by the fp32 values of its grid; returns the integers."""
    out = integers(model, layers, group)
    with torch.no_grad():
        for name, iw in out.items():
            p = model.get_parameter(name)
            p.copy_(iw.dense().reshape(p.shape).to(p.dtype))
    return out
