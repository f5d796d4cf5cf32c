"""Run a causal LM's key/value-cache ONNX graph in ONNX Runtime: prefill, then one token at a time.

The graph follows Optimum's merged-decoder convention (export/kv_cache.py writes it): inputs
`input_ids`, `attention_mask`, `position_ids` (when the family uses them) and
`past_key_values.{i}.key/value` [batch, kv_heads, past, head_dim]; outputs `logits` and
`present.{i}.key/value` (the past with the new tokens appended). One graph serves the prompt (past of
length 0) and each new token (a sequence of 1), so a token costs the same whatever came before it.
A graph in the "buffer" layout (export/kv_buffer.py, metadata `cache_layout`) returns `new_key_values.{i}.*`,
the new positions only: its past is a `KVBuffer` (runtime/kv_buffer.py) written in place, never copied. A graph in
the "shared" layout (export/gqa.py) keeps Optimum's names, and its GroupQueryAttention writes the new positions into
the past it was given when `present.*` is bound to that same buffer (IO binding): a `KVBuffer` again, never copied.
numpy and onnxruntime only: no torch import (an edge device runs this file's code alone).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgeslim.core.errors import ConfigError, SourceError
from edgeslim.runtime.kv_buffer import KVBuffer

PAST = "past_key_values.{}.{}"
PRESENT = "present.{}.{}"
NEW = "new_key_values.{}.{}"  # the buffer layout's outputs: the new positions' keys/values only
# present = past + new (Optimum's merged decoder), new only (export/kv_buffer.py), or Optimum's names with present
# written into the past's own buffer when both are bound to it (export/gqa.py: GroupQueryAttention)
LAYOUTS = ("optimum", "buffer", "shared")
META_KEY = "edgeslim.lm"  # the ONNX metadata entry export/kv_cache.py writes: JSON (layers, positions, tokenizer)
KEEP = "logits_to_keep"  # optional input (export/last_logits.py): logits of the last n positions only, 0 for all


@dataclass
class Generation:
    """What one `generate` call produced and how fast."""

    tokens: list[int]  # the new token ids (prompt excluded)
    prompt_tokens: int
    ttft_s: float  # prefill of the prompt and the first token chosen
    decode_s: float  # every later token
    stopped: str  # "length" (n tokens), "eos", or "positions" (the model's length limit)

    @property
    def decode_tokens_per_s(self) -> float:
        later = len(self.tokens) - 1
        return later / self.decode_s if later > 0 and self.decode_s > 0 else float("nan")


@dataclass
class CacheGraph:
    """An open key/value-cache graph: its layers' cache shapes, whether it takes position ids, its metadata."""

    session: object
    layers: int
    kv_heads: list[int]
    head_dims: list[int]
    position_ids: bool
    meta: dict = field(default_factory=dict)
    keeps_logits: bool = False  # the graph takes `logits_to_keep` (an optional input)
    layout: str = "optimum"  # one of LAYOUTS

    @property
    def buffered(self) -> bool:
        """The past is a `KVBuffer` (buffer and shared layouts)."""
        return self.layout in ("buffer", "shared")

    @property
    def max_positions(self) -> int | None:
        return self.meta.get("max_positions")

    def empty_past(self, batch: int) -> dict[str, np.ndarray] | KVBuffer:
        """Zero-length past of every layer for `batch` sequences (a KVBuffer in the buffer and shared layouts)."""
        if self.buffered:
            return KVBuffer(batch, self.kv_heads, self.head_dims, PAST)
        out = {}
        for i in range(self.layers):
            for kv in ("key", "value"):
                out[PAST.format(i, kv)] = np.zeros((batch, self.kv_heads[i], 0, self.head_dims[i]), np.float32)
        return out

    def check_past(self, past: dict[str, np.ndarray] | KVBuffer, batch: int) -> int:
        """The past length of `past`, after checking every layer's shape against the graph's.

        Raises:
            ConfigError: a missing layer or a shape that is not [batch, kv_heads, past, head_dim].
        """
        if isinstance(past, KVBuffer):
            if not self.buffered:
                raise ConfigError("a cache buffer is for a graph in the buffer or shared layout; this one copies its "
                                  "past into present.*")
            return past.check(batch, self.kv_heads, self.head_dims)
        length = None
        for i in range(self.layers):
            for kv in ("key", "value"):
                name = PAST.format(i, kv)
                if name not in past:
                    raise ConfigError(f"the cache graph needs {name}; it was not fed")
                shape = _shape(past[name])
                want = (batch, self.kv_heads[i], shape[2] if len(shape) == 4 else "past", self.head_dims[i])
                if len(shape) != 4 or shape[0] != batch or shape[1] != want[1] or shape[3] != want[3] \
                        or (length is not None and shape[2] != length):
                    raise ConfigError(f"{name} has shape {list(shape)}; the cache graph takes [batch={batch}, "
                                      f"kv_heads={want[1]}, past (same for every layer), head_dim={want[3]}]")
                length = shape[2]
        return int(length or 0)

    def step(self, input_ids: np.ndarray, past: dict[str, np.ndarray] | KVBuffer, attention_mask: np.ndarray | None = None,
             last: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray] | KVBuffer]:
        """One call of the graph: logits [batch, sequence, vocab] and the grown past.

        `last`: only the last position's logits are wanted (generation): a graph that takes `logits_to_keep`
        computes [batch, 1, vocab] only; an older one returns every position (its last row is the same).
        `attention_mask` covers past + new tokens (default all ones); position ids follow it. The past
        goes in and comes out as ONNX Runtime values (`present.*` is fed back as the next
        `past_key_values.*` where ORT wrote it, never copied through numpy); numpy
        arrays are accepted too (`past_arrays` reads one back). In the buffer and shared layouts the past is a
        `KVBuffer`, grown in place and returned (the same object; past arrays are copied into a new one).
        """
        batch, seq = input_ids.shape
        past_len = self.check_past(past, batch)
        if self.buffered and not isinstance(past, KVBuffer):
            past = KVBuffer.of(past, self.kv_heads, self.head_dims, PAST, past_len)
        if self.max_positions and past_len + seq > self.max_positions:
            raise ConfigError(f"{past_len + seq} tokens exceed the model's {self.max_positions} positions")
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + seq), np.int64)
            if self.buffered:
                attention_mask[:, :past_len] = past.valid
        if attention_mask.shape != (batch, past_len + seq):
            raise ConfigError(f"attention_mask has shape {list(attention_mask.shape)}; the call takes [batch={batch}, "
                              f"past + new = {past_len + seq}]")
        attention_mask = attention_mask.astype(np.int64)
        if self.layout == "shared" and not _counts(attention_mask, past_len):
            raise ConfigError("a graph in the shared cache layout takes padding only after a prompt's tokens, with an "
                              "empty past (its attention counts each row's ones as its length): export it with "
                              "--kv-layout buffer for other masks")
        feeds = {"input_ids": input_ids.astype(np.int64)}
        if self.layout == "shared":  # the graph writes the new positions after the written ones itself
            past.reserve(seq)
            feeds |= past.ort_values() | {"attention_mask": attention_mask}
        elif self.buffered:  # past is a KVBuffer here: its slots as the graph's past, unwritten ones masked
            feeds |= past.ort_values() | {"attention_mask": past.full_mask(attention_mask)}
        else:
            feeds |= past | {"attention_mask": attention_mask}
        if self.position_ids:
            pos = np.cumsum(attention_mask, axis=1) - 1
            feeds["position_ids"] = np.maximum(pos[:, past_len:], 0).astype(np.int64)
        if last and self.keeps_logits:
            feeds[KEEP] = np.array(1, np.int64)
        import onnxruntime as ort
        values = {name: value if not isinstance(value, np.ndarray) else ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(value)) for name, value in feeds.items()}
        if self.layout == "shared":
            return self._run_shared(values, past, attention_mask[:, past_len:]), past
        names = [o.name for o in self.session.get_outputs()]
        values = dict(zip(names, self.session.run_with_ort_values(names, values)))
        if self.buffered:
            past.append({PAST.format(i, kv): values[NEW.format(i, kv)].numpy() for i in range(self.layers)
                         for kv in ("key", "value")}, attention_mask[:, past_len:])
            return values["logits"].numpy(), past
        grown = {PAST.format(i, kv): values[PRESENT.format(i, kv)] for i in range(self.layers) for kv in ("key", "value")}
        return values["logits"].numpy(), grown

    def _run_shared(self, values: dict, past: KVBuffer, new_mask: np.ndarray) -> np.ndarray:
        """One call with every `present.*` bound to its past's buffer (written in place): the logits."""
        binding = self.session.io_binding()
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
        buffers = past.ort_values()
        for i in range(self.layers):
            for kv in ("key", "value"):
                binding.bind_ortvalue_output(PRESENT.format(i, kv), buffers[PAST.format(i, kv)])
        binding.bind_output("logits")  # bound last: the last output
        self.session.run_with_iobinding(binding)
        past.advance(new_mask)
        return binding.get_outputs()[-1].numpy()

    def stream(self, prompt: Sequence[int], n: int, temperature: float = 0.0, eos: Sequence[int] = (),
               seed: int = 0) -> Iterator[tuple[int, float]]:
        """Yield (token id, seconds since the call) for up to `n` new tokens: greedy at temperature 0,
        else sampled from softmax(logits / temperature). Stops at an `eos` id (yielded) or at the
        model's positions; `self.last_stop` says which ("length", "eos", "positions")."""
        if n <= 0:
            raise ConfigError(f"the number of new tokens must be > 0, got {n}")
        if not prompt:
            raise ConfigError("the prompt has no tokens")
        if self.max_positions and len(prompt) > self.max_positions:
            raise ConfigError(f"the prompt has {len(prompt)} tokens; the model takes at most {self.max_positions}")
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        ids = np.asarray([prompt], np.int64)
        past = self.empty_past(1)
        self.last_stop = "length"
        for i in range(n):
            logits, past = self.step(ids, past, last=True)
            token = _choose(logits[0, -1], temperature, rng)
            yield token, time.perf_counter() - start
            if token in eos:
                self.last_stop = "eos"
                return
            if self.max_positions and len(prompt) + i + 1 > self.max_positions and i + 1 < n:
                self.last_stop = "positions"
                return
            ids = np.asarray([[token]], np.int64)

    def generate(self, prompt: Sequence[int], n: int, temperature: float = 0.0, eos: Sequence[int] = (),
                 seed: int = 0) -> Generation:
        """`stream` collected, with the time to first token and the decode time."""
        tokens, times = [], []
        for token, t in self.stream(prompt, n, temperature, eos, seed):
            tokens.append(token)
            times.append(t)
        return Generation(tokens, len(prompt), times[0], times[-1] - times[0], self.last_stop)


def _counts(mask: np.ndarray, past_len: int) -> bool:
    """Whether each row's ones count its positions: no padding, or (from an empty past) ones then zeros."""
    if mask.all():
        return True
    ones = mask.sum(1, keepdims=True)
    return past_len == 0 and bool(ones.min() >= 1 and np.array_equal(mask, np.arange(mask.shape[1]) < ones))


def _shape(value) -> tuple:
    """The shape of a numpy array or of an ONNX Runtime value."""
    return tuple(value.shape) if isinstance(value, np.ndarray) else tuple(value.shape())


def past_arrays(past: dict | KVBuffer) -> dict[str, np.ndarray]:
    """A past (as `CacheGraph.step` returns it) as numpy arrays (a copy; a buffer's written slots)."""
    if isinstance(past, KVBuffer):
        return past.prefix()
    return {name: value if isinstance(value, np.ndarray) else value.numpy() for name, value in past.items()}


def _choose(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def session_options(threads: int | None = None):
    """ORT options for decoding: full graph optimization, `threads` intra-op threads when given."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def open_cache_graph(path: str | Path, threads: int | None = None) -> CacheGraph:
    """Open a key/value-cache ONNX graph in ONNX Runtime (CPU) and read its cache layout.

    Raises:
        SourceError: ORT cannot load the file.
        ConfigError: the graph is not a cache graph (no `past_key_values.*` inputs: export it with
            `edgeslim export SOURCE --kv-cache`).
    """
    import onnxruntime as ort
    try:
        session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001  (ORT raises its own classes for unreadable files)
        raise SourceError(f"ONNX Runtime cannot load {path}: {' '.join(str(exc).split())[:300]}") from exc
    inputs = {i.name: i.shape for i in session.get_inputs()}
    layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
    if not layers or "input_ids" not in inputs or "logits" not in {o.name for o in session.get_outputs()}:
        raise ConfigError(f"{path} is not a causal LM's key/value-cache graph (inputs {sorted(inputs)[:4]}...): "
                          "export a causal LM with `edgeslim export SOURCE --kv-cache`")
    shapes = [inputs[PAST.format(i, "key")] for i in range(layers)]
    bad = [i for i, s in enumerate(shapes) if len(s) != 4 or not isinstance(s[1], int) or not isinstance(s[3], int)]
    if bad:
        raise ConfigError(f"{path}: past_key_values.{bad[0]}.key has shape {shapes[bad[0]]}, not "
                          "[batch, kv_heads, past, head_dim] with fixed heads and head size")
    raw = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    meta = json.loads(raw) if raw else {}
    keeps = KEEP in {i.name for i in session.get_overridable_initializers()} | set(inputs)
    outputs = {o.name for o in session.get_outputs()}
    layout = "buffer" if NEW.format(0, "key") in outputs else "optimum"
    if layout == "optimum" and meta.get("cache_layout") == "shared":  # Optimum's names; present may share the past
        layout = "shared"
    if meta.get("cache_layout", layout) != layout:
        raise ConfigError(f"{path}: its metadata says cache layout {meta['cache_layout']!r}, its outputs are {layout!r}")
    return CacheGraph(session, layers, [s[1] for s in shapes], [s[3] for s in shapes], "position_ids" in inputs, meta,
                      keeps, layout)
