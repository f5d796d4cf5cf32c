"""The `Measure` objects the pipeline hands to compressors for a latency budget (compress/ never measures).

- `LocalMeasure`: a local CPU target: GEMM shapes timed here in ONNX Runtime (runtime/peak.GemmTable,
  cached per machine) and the whole model exported to ONNX and timed in the profile's session (a speedup:
  beside the other model, in alternating rounds).
- `BoardMeasure`: a board over SSH (a profile with an `address`, e.g. saved by `device probe --save`): GEMM
  shapes and models timed ON the board by its runner (runtime/remote.py); GEMM times cached here under the
  board's address, threads and machine fingerprint.
- `TableMeasure`: another target, from a JSON table measured ON that target:
  `{"target": "jetson-orin-nano", "gemm_ms": {"MxKxN": ms, ...}, "model_ms": ms}` where model_ms is the
  source model's latency there at the budget's input sizes. A shape the table lacks is an error that
  names it (nothing is guessed for a machine that is not this one).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import weakref
from pathlib import Path
from typing import Mapping, Sequence

from torch import nn

from edgeslim.core.errors import ConfigError
from edgeslim.core.files import parse_file
from edgeslim.core.specs import TensorSpec, example_feeds


PAIRED_ROUNDS = 4  # alternating rounds of a side-by-side speedup (each: `iters` calls per model)


class LocalMeasure:
    """GEMM table and model latency of a local CPU profile, measured on this machine."""

    times_models = True

    def __init__(self, profile: str, iters: int = 10) -> None:
        from edgeslim.runtime.peak import GemmTable
        from edgeslim.runtime.targets import load_profile

        self.profile = load_profile(profile)
        self.table = GemmTable(self.profile.threads)
        self.iters = iters
        self._exports: dict[int, tuple[weakref.ref, Path]] = {}  # id(model) -> (the model, its ONNX file)

    def gemm_ms(self, m: int, k: int, n: int) -> float:
        return self.table.gemm_ms(m, k, n)

    def model_ms(self, model: nn.Module, inputs: Sequence[TensorSpec], dims: Mapping[str, int]) -> float:
        """p50 latency of `model` exported to ONNX (validated) and run in the profile's session."""
        from edgeslim.runtime.measure import measure
        from edgeslim.runtime.session import open_session

        with open_session(self._export(model, inputs), self.profile) as session:
            return measure(session, example_feeds(inputs, dims), warmup=2, iters=self.iters).p50_ms

    def speedup(self, base: nn.Module, trial: nn.Module, inputs: Sequence[TensorSpec], dims: Mapping[str, int]
                ) -> float:
        """p50 of `base` over p50 of `trial`, their sessions called in PAIRED_ROUNDS alternating rounds of
        `iters` calls each: timed one after the other, a 10-call p50 each, MiniLM's factored model once
        measured 1.24x where it ran 1.01x (the machine's state drifts between the two timings)."""
        return self._pair_ratio(self._export(base, inputs), self._export(trial, inputs), inputs, dims)

    def _pair_ratio(self, base: Path, trial: Path, inputs: Sequence[TensorSpec], dims: Mapping[str, int]) -> float:
        first, second = self.files_ms([base, trial], inputs, dims, PAIRED_ROUNDS)
        return first / second

    def files_ms(self, paths: Sequence[Path], inputs: Sequence[TensorSpec], dims: Mapping[str, int],
                 rounds: int = PAIRED_ROUNDS) -> list[float]:
        """p50 latency of each ONNX file (the same feeds), their sessions called side by side in `rounds`
        alternating rounds of `iters` calls each: ratios between them are what to read."""
        from edgeslim.runtime.measure import interleave
        from edgeslim.runtime.session import open_session

        feeds = example_feeds(inputs, dims)
        with contextlib.ExitStack() as stack:
            sessions = [stack.enter_context(open_session(p, self.profile)) for p in paths]
            timings = interleave(sessions, [feeds] * len(paths), warmup=2, iters=rounds * self.iters, rounds=rounds)
        return [t.p50_ms for t in timings]

    def _export(self, model: nn.Module, inputs: Sequence[TensorSpec]) -> Path:
        """The model's ONNX file (validated), exported once and kept while the model lives: timing the same
        model again, beside another one, costs no second export, and a model that is gone (a speedup
        budget's trial) takes its export with it."""
        from edgeslim.export.onnx import to_onnx

        ref, path = self._exports.get(id(model), (None, None))
        if ref is None or ref() is not model:  # never exported, or another model that had this id
            tmp = tempfile.TemporaryDirectory(prefix="edgeslim-latency-")
            path = Path(tmp.name) / "model.onnx"
            to_onnx(model, list(inputs), path)
            weakref.finalize(model, tmp.cleanup)
            self._exports[id(model)] = (weakref.ref(model), path)
        return path


class BoardMeasure(LocalMeasure):
    """GEMM table and model latency of a board, measured on it over SSH."""

    def __init__(self, profile: str, iters: int = 10, address: str | None = None) -> None:
        """`address`: the board (ssh://...) when the profile names none (or another one)."""
        from edgeslim.runtime.address import parse_device
        from edgeslim.runtime.remote import Board
        from edgeslim.runtime.targets import load_profile

        self.profile = load_profile(profile)
        if address is not None:
            self.profile = dataclasses.replace(self.profile, address=address)
        self.board = Board(parse_device(self.profile.address, self.profile.python))
        self.iters = iters
        self._exports = {}
        self._table: dict[str, float] | None = None

    def _key(self) -> str:
        return f"{self.profile.address}|threads={self.profile.threads}"

    def gemm_ms(self, m: int, k: int, n: int) -> float:
        """Latency (ms) of an (m x k) @ (k x n) fp32 product on the board. A shape not yet timed there is timed
        with the rest of its rank ladder ((m, k, r) and (m, r, n) for every aligned r), in one visit."""
        from edgeslim.runtime.peak import cached_gemm, store_gemm

        shape = f"{int(m)}x{int(k)}x{int(n)}"
        if self._table is None:
            self._table = cached_gemm(self._key())
        if shape not in self._table:
            align = max(1, self.profile.align)
            ladder = {(m, k, n)} | {(m, k, r) for r in range(align, n, align)} | {(m, r, n) for r in range(align, k, align)}
            self._table.update(self.board.gemm(sorted(ladder), self.profile.threads)["gemm_ms"])
            store_gemm(self._key(), self._table)
        return float(self._table[shape])

    def model_ms(self, model: nn.Module, inputs: Sequence[TensorSpec], dims: Mapping[str, int]) -> float:
        """p50 latency of `model` exported to ONNX (validated) and run on the board."""
        answer = self.board.measure([self._export(model, inputs)], [example_feeds(inputs, dims)], self.profile.threads,
                                    self.profile.provider, 2, self.iters, 1, memory=False)
        return answer["timings"][0]["p50_ms"]

    def speedup(self, base: nn.Module, trial: nn.Module, inputs: Sequence[TensorSpec], dims: Mapping[str, int]
                ) -> float:
        """p50 of `base` over p50 of `trial`, timed side by side on the board in PAIRED_ROUNDS rounds."""
        return self._pair_ratio(self._export(base, inputs), self._export(trial, inputs), inputs, dims)

    def files_ms(self, paths: Sequence[Path], inputs: Sequence[TensorSpec], dims: Mapping[str, int],
                 rounds: int = PAIRED_ROUNDS) -> list[float]:
        """p50 latency of each ONNX file, timed side by side ON the board in `rounds` rounds."""
        feeds = example_feeds(inputs, dims)
        answer = self.board.measure(list(paths), [feeds] * len(paths), self.profile.threads, self.profile.provider, 2,
                                    rounds * self.iters, rounds, memory=False)
        return [t["p50_ms"] for t in answer["timings"]]


class TableMeasure:
    """GEMM and model latencies of another target, read from a table measured on it."""

    times_models = False  # model_ms is the source model's recorded latency, whatever model is asked about

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        data = parse_file(path, "GEMM table", "JSON", json.loads)
        if not isinstance(data, dict) or not isinstance(data.get("gemm_ms"), dict) or "model_ms" not in data:
            raise ConfigError(f"GEMM table {path} needs 'gemm_ms' ({{\"MxKxN\": ms}}) and 'model_ms' (the source "
                              "model's latency on that target)")
        self.path, self.gemm, self.model = path, data["gemm_ms"], float(data["model_ms"])
        self.target = data.get("target")

    def gemm_ms(self, m: int, k: int, n: int) -> float:
        shape = f"{int(m)}x{int(k)}x{int(n)}"
        if shape not in self.gemm:
            raise ConfigError(f"GEMM table {self.path} has no timing for shape {shape} (M x K x N): measure it on "
                              "the target")
        return float(self.gemm[shape])

    def model_ms(self, model: nn.Module, inputs: Sequence[TensorSpec], dims: Mapping[str, int]) -> float:
        return self.model
