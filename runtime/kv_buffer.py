"""The runner's side of the "buffer" cache layout (export/kv_buffer.py): a preallocated cache written in place.

A graph in this layout returns only the new positions' keys and values (`new_key_values.{i}.key/value`).
`KVBuffer` keeps, per layer, a numpy array [batch, kv_heads, capacity, head_dim] shared with the ONNX
Runtime value fed as `past_key_values.{i}.*` (no copy), writes each call's new keys/values into it after
the valid prefix, and grows it when full by an eighth of its length, at least `CHUNK` slots (one copy per growth:
amortised; the masked slots the graph still reads stay within an eighth of the past).
The graph sees the whole buffer as its past; `full_mask` marks the slots not yet written as padding, and
position ids follow the caller's mask, so the unwritten slots change nothing but the work. In the "shared"
layout (export/gqa.py) the graph writes the new positions itself: its `present.*` outputs are bound to the same
values (`reserve` before the call, `advance` after), and the mask covers the written slots alone.
numpy and onnxruntime only: no torch import.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from edgeslim.core.errors import ConfigError

CHUNK = 16  # the fewest slots added at a time (and kept free after a prefill)


class KVBuffer:
    """Every layer's keys and values for `batch` sequences, `length` of them written."""

    def __init__(self, batch: int, kv_heads: Sequence[int], head_dims: Sequence[int], past_name: str,
                 chunk: int | None = None) -> None:
        self.batch, self.kv_heads, self.head_dims = batch, list(kv_heads), list(head_dims)
        self.chunk = chunk or CHUNK
        self.past_name = past_name  # format string of the graph's past inputs (layer, "key"/"value")
        self.length = 0
        self.valid = np.zeros((batch, 0), np.int64)  # the caller's mask over the written slots
        self.arrays: dict[str, np.ndarray] = {}
        self._values: dict[str, object] = {}
        self._allocate(0)

    def _allocate(self, capacity: int) -> None:
        old = self.arrays
        self.arrays = {}
        for i, (h, d) in enumerate(zip(self.kv_heads, self.head_dims)):
            for kv in ("key", "value"):
                name = self.past_name.format(i, kv)
                self.arrays[name] = np.zeros((self.batch, h, capacity, d), np.float32)
                if name in old:
                    self.arrays[name][:, :, :self.length] = old[name][:, :, :self.length]
        self.capacity = capacity
        self._values = {}

    def ort_values(self) -> dict[str, object]:
        """The buffers as ONNX Runtime values over the same memory (made once per allocation)."""
        if not self._values:
            import onnxruntime as ort
            self._values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in self.arrays.items()}
        return self._values

    def full_mask(self, mask: np.ndarray) -> np.ndarray:
        """The graph's attention mask [batch, capacity + new] from the caller's [batch, length + new]."""
        gap = np.zeros((self.batch, self.capacity - self.length), np.int64)
        return np.concatenate([mask[:, :self.length], gap, mask[:, self.length:]], axis=1)

    def reserve(self, n: int) -> None:
        """Room for `n` more positions after the written ones (grown by an eighth of the length, at least `chunk`)."""
        if self.length + n > self.capacity:
            need = self.length + n
            self._allocate(need + max(self.chunk, need // 8))

    def advance(self, mask: np.ndarray) -> None:
        """Count the next mask.shape[1] slots as written (by the graph itself, in the shared layout); `mask` is the
        caller's mask of those positions."""
        self.valid = np.concatenate([self.valid, mask.astype(np.int64)], axis=1)
        self.length += mask.shape[1]

    def append(self, new: dict[str, np.ndarray], mask: np.ndarray) -> None:
        """Write the new positions (`new`: past input name -> [batch, kv_heads, n, head_dim]) after the
        written ones; `mask` is the caller's mask of those n positions."""
        n = mask.shape[1]
        self.reserve(n)
        for name, array in self.arrays.items():
            array[:, :, self.length:self.length + n] = new[name]
        self.advance(mask)

    def prefix(self) -> dict[str, np.ndarray]:
        """The written slots as Optimum-style past arrays (a copy)."""
        return {name: a[:, :, :self.length].copy() for name, a in self.arrays.items()}

    def check(self, batch: int, kv_heads: Sequence[int], head_dims: Sequence[int]) -> int:
        """The written length, after checking the buffer against the graph's layout.

        Raises:
            ConfigError: another batch or another layer layout.
        """
        if batch != self.batch or list(kv_heads) != self.kv_heads or list(head_dims) != self.head_dims:
            raise ConfigError(f"the cache buffer holds batch {self.batch}, kv heads {self.kv_heads}, head dims "
                              f"{self.head_dims}; the call has batch {batch} and the graph kv heads {list(kv_heads)}, "
                              f"head dims {list(head_dims)}")
        return self.length

    @classmethod
    def of(cls, past: dict[str, np.ndarray], kv_heads: Sequence[int], head_dims: Sequence[int], past_name: str,
           length: int) -> "KVBuffer":
        """A buffer holding Optimum-style past arrays (checked by the caller: `length` slots each)."""
        first = past[past_name.format(0, "key")]
        batch = int(first.shape[0] if isinstance(first, np.ndarray) else first.shape()[0])
        out = cls(batch, kv_heads, head_dims, past_name)
        if length:
            arrays = {name: np.asarray(v if isinstance(v, np.ndarray) else v.numpy(), np.float32)
                      for name, v in past.items() if name in out.arrays}
            out.append(arrays, np.ones((batch, length), np.int64))
        return out
