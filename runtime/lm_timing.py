"""What an LLM user measures, through a key/value-cache graph in ONNX Runtime (numpy and ORT only).

- time to first token (TTFT) at each prompt length: one prefill call on the prompt (past of length 0)
  and the choice of the first token, the median of `repeats` calls (the LM head on the last position only
  where the graph takes `logits_to_keep`, as generation runs it);
- decode tokens/s after that prompt: `new_tokens` single-token calls, each feeding the grown cache back,
  at each batch size (tokens/s per sequence; x batch for the aggregate);
- decode tokens/s at a short past (`SHORT_PAST`) beside the long one: a cache graph's cost per token
  should stay flat in the past length (the ratio is reported).
Random token ids are fed: the time does not depend on the text.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import numpy as np

from edgeslim.runtime.kv_decoder import CacheGraph

SHORT_PAST = 16


def _prefill(graph: CacheGraph, batch: int, length: int, rng: np.random.Generator) -> tuple[float, dict]:
    ids = rng.integers(1, 64, (batch, length)).astype(np.int64)
    start = time.perf_counter()
    logits, past = graph.step(ids, graph.empty_past(batch), last=True)
    np.argmax(logits[:, -1], axis=-1)
    return time.perf_counter() - start, past


def _decode(graph: CacheGraph, past: dict, batch: int, tokens: int) -> float:
    """Seconds for `tokens` single-token calls from `past` (greedy, the tokens fed back)."""
    token = np.ones((batch, 1), np.int64)
    start = time.perf_counter()
    for _ in range(tokens):
        logits, past = graph.step(token, past, last=True)
        token = np.argmax(logits[:, -1], axis=-1).astype(np.int64)[:, None]
    return time.perf_counter() - start


def lm_timings(graph: CacheGraph, prompts: Sequence[int], new_tokens: int, batches: Sequence[int] = (1,),
               repeats: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """One row per (batch, prompt length): ttft_ms, decode_tokens_per_s (per sequence), and for batch 1
    the decode rate at SHORT_PAST with the flatness ratio (long past / short past).

    Raises:
        ConfigError: a prompt + new tokens beyond the model's positions (from the graph's step).
    """
    from edgeslim.core.errors import ConfigError
    if new_tokens < 1 or repeats < 1 or not prompts or min(prompts) < 1:
        raise ConfigError(f"LLM profiling needs prompt lengths >= 1 and --new-tokens >= 1, got {list(prompts)} and "
                          f"{new_tokens}")
    limit = graph.max_positions
    if limit and max(prompts) + new_tokens > limit:
        raise ConfigError(f"a {max(prompts)}-token prompt + {new_tokens} new tokens exceed the model's {limit} positions")
    rng = np.random.default_rng(seed)
    _prefill(graph, 1, 8, rng)  # warm-up: ORT allocates and optimizes on the first calls
    rows = []
    short = None
    for batch in batches:
        for length in prompts:
            ttft, past = [], None
            for _ in range(repeats):
                seconds, past = _prefill(graph, batch, length, rng)
                ttft.append(seconds)
            decode_s = _decode(graph, past, batch, new_tokens)
            row = {"batch": batch, "prompt": length, "new_tokens": new_tokens,
                   "ttft_ms": statistics.median(ttft) * 1000, "ttft_all_ms": [t * 1000 for t in ttft],
                   "decode_tokens_per_s": new_tokens / decode_s, "decode_ms_per_token": decode_s / new_tokens * 1000,
                   "aggregate_tokens_per_s": batch * new_tokens / decode_s}
            if batch == 1:
                if short is None:
                    _, start = _prefill(graph, 1, SHORT_PAST, rng)
                    short = new_tokens / _decode(graph, start, 1, new_tokens)
                row["decode_tokens_per_s_past16"] = short
                row["decode_flatness"] = row["decode_tokens_per_s"] / short
            rows.append(row)
    return rows
