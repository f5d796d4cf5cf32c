"""Grouped-query attention without copying the cache: the attention a key/value-cache graph is exported with.

transformers' eager attention (`repeat_kv`) expands every layer's keys and values from the kv heads to
the query heads before the two matmuls: in the exported graph that is an Expand + Reshape of the whole
past at every token (3x its bytes for SmolLM2's 9 query / 3 kv heads), so a decode step's cost grows
with the past length. Here the query heads that share a kv head are folded into its rows instead
(Ainslie et al., "GQA", EMNLP 2023, Sec. 2: each kv head serves a group of query heads):
q [b, kv, group * s, d] @ k^T [b, kv, d, T] -> softmax -> @ v [b, kv, T, d], the same products and sums as
eager attention, with the cache read in place. Models without groups (kv heads = heads) keep eager.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

NAME = "edgeslim_grouped"


def grouped_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                              **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' attention-interface signature: query [b, heads, s, d], key/value [b, kv, T, d] ->
    (output [b, s, heads, d], weights [b, heads, s, T])."""
    b, heads, s, d = query.shape
    kv = key.shape[1]
    group = heads // kv
    q = query.reshape(b, kv, group * s, d)
    w = torch.matmul(q, key.transpose(2, 3)) * scaling
    if attention_mask is not None:  # [b, 1, s, T] additive, the same for every head of a group
        w = (w.reshape(b, kv, group, s, -1) + attention_mask[:, :, None, :, : key.shape[-2]]).reshape(b, kv, group * s, -1)
    w = nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = nn.functional.dropout(w, p=dropout, training=module.training)
    out = torch.matmul(w, value).reshape(b, heads, s, d).transpose(1, 2).contiguous()
    return out, w.reshape(b, heads, s, -1)


def _grouped(config) -> bool:
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    return isinstance(heads, int) and isinstance(kv, int) and kv < heads and heads % kv == 0 \
        and getattr(config, "model_type", "") in GROUPED_FAMILIES


# families whose attention is the plain eager one (scaling and an additive mask, no soft-capping or sinks)
GROUPED_FAMILIES = frozenset({"llama", "mistral", "qwen2", "phi3", "gemma"})


@contextlib.contextmanager
def grouped_attention(hf: nn.Module) -> Iterator[bool]:
    """While exporting: `hf` (a Hugging Face causal LM) computes grouped-query attention with
    `grouped_attention_forward` when its family has kv groups; yields whether it does. The previous
    implementation is restored on exit."""
    config = getattr(hf, "config", None)
    if config is None or not _grouped(config) or not callable(getattr(hf, "set_attn_implementation", None)):
        yield False
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask
    AttentionInterface.register(NAME, grouped_attention_forward)
    AttentionMaskInterface.register(NAME, eager_mask)
    previous = config._attn_implementation
    hf.set_attn_implementation(NAME)
    try:
        yield True
    finally:
        hf.set_attn_implementation(previous)
