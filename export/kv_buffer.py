"""The "buffer" cache layout: a key/value-cache graph that never copies its past.

Optimum's merged decoder returns present = Concat(past, new) for every layer, so each token copies the
whole cache once per layer (SmolLM2 after 512 tokens: 30 layers x 2 x 512 x 768 bytes per token), a cost
that grows with the past whatever the rest of the token costs. In this layout the graph takes the same
inputs (`past_key_values.{i}.key/value` [batch, kv_heads, past, head_dim], `attention_mask` over past +
new) but returns only the new positions' keys and values (`new_key_values.{i}.key/value` [batch, kv_heads,
sequence, head_dim]); the runner (runtime/kv_buffer.py) writes them in place into a preallocated buffer
and feeds the whole buffer as the next past, the positions not yet written masked out by
`attention_mask`. Attention reads the past where it lies, without concatenating it:

    scores = [q K_past^T, q K_new^T] * scaling + mask bias   (the small score tensors are concatenated)
    P = softmax(scores);  out = P_past V_past + P_new V_new

with the query heads of a kv head folded into its rows (export/attention.py: no repeated keys or values).
The past positions all precede the new ones, so the past's bias is the padding mask alone; the new
positions' is causal and padding. Positions come from `position_ids` (the runner's cumulative mask) or,
for OPT, from the mask itself, so a gap of unwritten slots changes nothing. A sliding window (a
distance between cache slots) would see the gap, so a model whose window is shorter than its positions
is refused here and keeps Optimum's layout.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from edgeslim.core.errors import ExportValidationError

NAME = "edgeslim_buffer"
# families whose attention is transformers' plain eager one called through its attention interface
# (scaling and an additive mask: no soft-capping, sinks or alibi)
FAMILIES = frozenset({"llama", "mistral", "qwen2", "phi3", "gemma", "gpt2", "gpt_neox", "opt"})
_ACTIVE: list["_Record"] = []  # the record of the forward pass being traced (one at a time)


class _Record:
    """Per layer, what the cache was given: past keys/values and the new ones; the mask biases."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], bias: torch.Tensor) -> None:
        self.past, self.bias = past, bias  # bias: [b, 1, s, past + s], additive
        self._tiled: dict[int, torch.Tensor] = {}
        self.by_key: dict[int, int] = {}  # id(new keys) -> layer
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.attended: set[int] = set()

    def tiled(self, group: int) -> torch.Tensor:
        """The bias for rows (query head in the group, position): [b, 1, group * s, past + s], made once per group size."""
        if group not in self._tiled:
            self._tiled[group] = self.bias.repeat(1, 1, group, 1)
        return self._tiled[group]


def _recording_cache(past: list[tuple[torch.Tensor, torch.Tensor]], record: _Record):
    """A DynamicCache over `past` whose update records the new keys/values and returns them alone."""
    from transformers import DynamicCache

    class RecordingCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            record.by_key[id(key_states)] = layer_idx
            record.new[layer_idx] = (key_states, value_states)
            return key_states, value_states

    return RecordingCache(ddp_cache_data=[(k, v) for k, v in past])


def buffer_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature; `key`/`value` are the new positions' (the recording
    cache returns them alone), the past comes from the active record. HF's own mask is not read."""
    record = _ACTIVE[-1]
    layer = record.by_key[id(key)]
    record.attended.add(layer)
    past_k, past_v = record.past[layer]
    b, heads, s, d = query.shape
    kv = key.shape[1]
    scale = d ** -0.5 if scaling is None else scaling
    group = heads // kv
    # the query heads sharing a kv head folded into its rows (export/attention.py): one MatMul per kv head
    # reads the cache in place; the mask bias, tiled over the group once per forward, is one Add
    q = query.reshape(b, kv, group * s, d)
    w = torch.cat([torch.matmul(q, past_k.transpose(2, 3)) * scale, torch.matmul(q, key.transpose(2, 3)) * scale], dim=-1)
    p = nn.functional.softmax(w + record.tiled(group), dim=-1, dtype=torch.float32).to(query.dtype)
    p_past, p_new = torch.split(p, [past_k.shape[2], s], dim=-1)
    out = torch.matmul(p_past, past_v) + torch.matmul(p_new, value)  # [b, kv, group * s, d]
    return out.reshape(b, heads, s, d).transpose(1, 2).contiguous(), None


class BufferCacheModel(nn.Module):
    """A Hugging Face causal LM called with flat cache tensors, returning (logits, new key_0, new value_0, ...)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]],
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        past_len, s = past[0][0].shape[2], input_ids.shape[1]
        neg = torch.finfo(torch.float32).min
        causal = torch.ones((s, s), dtype=torch.bool, device=input_ids.device).tril()
        allowed = torch.cat([attention_mask[:, None, :past_len].bool().expand(-1, s, -1),
                             causal[None] & attention_mask[:, past_len:].bool()[:, None, :]], dim=-1)
        record = _Record(list(past), torch.where(allowed, 0.0, neg)[:, None])  # [b, 1, s, past + s]
        kwargs = {} if position_ids is None else {"position_ids": position_ids}
        _ACTIVE.append(record)
        try:
            out = self.hf(input_ids=input_ids, attention_mask=attention_mask,
                          past_key_values=_recording_cache(past, record), use_cache=True, **kwargs)
        finally:
            _ACTIVE.pop()
        layers = len(past)
        if sorted(record.attended) != list(range(layers)) or sorted(record.new) != list(range(layers)):
            raise ExportValidationError(f"{type(self.hf).__name__}: {len(record.attended)} of {layers} layers attended "
                                        "through transformers' attention interface; the buffer cache layout needs all")
        flat: list[torch.Tensor] = []
        for i in range(layers):
            flat += list(record.new[i])
        return (out.logits, *flat)


def buffer_refusal(hf: nn.Module, positions: int | None) -> str | None:
    """Why `hf` cannot take the buffer layout (None when it can)."""
    config = hf.config
    family = getattr(config, "model_type", "")
    if family not in FAMILIES:
        return f"{family or type(hf).__name__} is not a family the buffer layout was checked on ({', '.join(sorted(FAMILIES))})"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and (positions is None or window < positions):
        return f"sliding-window attention ({window} of {positions or 'unbounded'} positions) reads slot distances"
    return None


@contextlib.contextmanager
def buffer_attention(hf: nn.Module) -> Iterator[None]:
    """While exporting or checking: `hf` attends with `buffer_attention_forward` (restored on exit)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask
    AttentionInterface.register(NAME, buffer_attention_forward)
    AttentionMaskInterface.register(NAME, eager_mask)
    previous = hf.config._attn_implementation
    hf.set_attn_implementation(NAME)
    try:
        yield
    finally:
        hf.set_attn_implementation(previous)
