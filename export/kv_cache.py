"""A causal LM's key/value-cache ONNX graph: one graph for the prompt and for every next token.

Inputs and outputs follow Optimum's merged-decoder names, so existing runners can feed the file:
`input_ids` [batch, sequence], `attention_mask` [batch, past + sequence], `position_ids` [batch,
sequence] (families that take them; not OPT, which derives positions from the mask),
`past_key_values.{i}.key/value` [batch, kv_heads, past, head_dim] -> `logits` [batch, sequence,
vocab], `present.{i}.key/value` [batch, kv_heads, past + sequence, head_dim]. Batch, sequence and
past are dynamic; a past of length 0 is the prompt. The Hugging Face model runs with transformers'
DynamicCache built from the flat tensors, exported by torch.export (dynamo), so any layer a
compressor put in (low-rank, MPO, pruned heads) exports as it runs. `layout="buffer"` writes the
same inputs with `new_key_values.{i}.key/value` [batch, kv_heads, sequence, head_dim] (the new positions
only) in place of `present.*`, for a runner that keeps the cache in a preallocated buffer
(export/kv_buffer.py, runtime/kv_buffer.py). `layout="shared"` keeps Optimum's names with each layer's attention
as ORT's GroupQueryAttention, which writes present.* into the past's own buffer when a runner binds both to it
(export/gqa.py). The layout is recorded in the metadata (`cache_layout`).

Validation before the file is moved into place: logits and presents agree with PyTorch at past
lengths 0, 1 and 100 (`PARITY_PASTS`), and greedy decoding of `GREEDY_TOKENS` tokens from
`PROMPTS` prompts in ONNX Runtime (runtime/kv_decoder.py) equals torch `generate` token for token.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from edgeslim.core.errors import ActivationDriftError, ConfigError, ExportValidationError
from edgeslim.core.files import ONNX, replace_output
from edgeslim.core.onnx_io import _quiet_torch, export_cause, slim_onnx
from edgeslim.export.attention import grouped_attention
from edgeslim.export.gqa import fuse_group_query_attention, pack_qkv, query_heads, shared_refusal
from edgeslim.export.kv_buffer import BufferCacheModel, buffer_attention, buffer_refusal
from edgeslim.export.last_logits import add_logits_to_keep
from edgeslim.export.nbits import Lowering, QuantizedMatrix, lower_matmul_nbits
from edgeslim.export.rms_norm import fuse_rms_norms
from edgeslim.export.rotary import fuse_rotary, rotary_tables
from edgeslim.export.validate import close
from edgeslim.runtime.kv_decoder import KEEP, LAYOUTS, META_KEY, NEW, PAST, PRESENT, open_cache_graph

NO_POSITION_IDS = frozenset({"opt"})  # families whose forward derives positions from the attention mask
PARITY_PASTS = (0, 1, 100)
GREEDY_TOKENS = 32
PROMPTS = (3, 8, 20)  # prompt lengths (random token ids) for the greedy check
# once MatMulNBits computes with int8 activations (level 4) nothing is element-wise exact: each output of a prefill
# from an empty cache must stay within this relative L2 error (SmolLM2 int4: logits 0.014, values up to 0.064).
# Synthetic random caches are left out there: their attention mixes random values, which int8 activations
# amplify layer by layer (SmolLM2: 0.5-0.9 of the last layers' values) far beyond what real text sees
# (perplexity 25.07 -> 25.13 on BBC News)
ACTIVATION_REL = 0.1
# MatMulNBits at level 0 sums each product block by block, in another order than torch's dense GEMM: on SmolLM2
# (hidden outliers of ~500) one layer's values differed by ~1e-3 of their largest while the logits agreed to 1e-4
NBITS_ATOL = 1e-3


@dataclass
class CacheExport:
    """What `to_onnx_cache` wrote and how it was checked."""

    path: Path
    file_bytes: int
    layers: int
    kv_heads: list[int]
    head_dims: list[int]
    position_ids: bool
    max_abs_diff: dict[int, float] = field(default_factory=dict)  # past length -> max |ORT - torch| of logits
    greedy_equal: int = 0  # prompts whose greedy tokens in ORT equal torch generate's
    notes: list[str] = field(default_factory=list)
    lowering: Lowering | None = None  # the MatMulNBits pass, for a weight-only quantized model
    layout: str = "optimum"  # the cache layout written (one of LAYOUTS)


class CacheModel(nn.Module):
    """A Hugging Face causal LM called with flat cache tensors: (logits, key_0, value_0, key_1, ...)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]],
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache
        cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in past], config=self.hf.config)
        kwargs = {} if position_ids is None else {"position_ids": position_ids}
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                      **kwargs)
        flat: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def causal_hf(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside a loaded model (TextModel.hf), or the model itself.

    Raises:
        ConfigError: not a causal LM with a cache (no `generate`, no `config.use_cache`).
    """
    hf = getattr(model, "hf", model)
    config = getattr(hf, "config", None)
    if config is None or not callable(getattr(hf, "generate", None)) or \
            not type(hf).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        raise ConfigError(f"{type(hf).__name__} is not a Hugging Face causal LM: a key/value cache graph needs one "
                          "(a folder loaded with --task causal-lm)")
    return hf


def cache_layout(hf: nn.Module) -> tuple[list[int], list[int]]:
    """(kv heads, head dim) of every layer, read from the cache of one short forward pass (pruned heads
    and GQA included)."""
    ids = torch.zeros((1, 2), dtype=torch.int64)
    with torch.inference_mode(), _quiet_torch():
        out = hf(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    layers = out.past_key_values.layers
    return [int(x.keys.shape[1]) for x in layers], [int(x.keys.shape[3]) for x in layers]


def uses_position_ids(hf: nn.Module) -> bool:
    return getattr(hf.config, "model_type", "") not in NO_POSITION_IDS


def _feeds(vocab: int, kv_heads: Sequence[int], head_dims: Sequence[int], batch: int, seq: int, past: int,
           position_ids: bool, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, vocab, (batch, seq)).astype(np.int64),
             "attention_mask": np.ones((batch, past + seq), np.int64)}
    if position_ids:
        feeds["position_ids"] = np.broadcast_to(np.arange(past, past + seq), (batch, seq)).astype(np.int64).copy()
    for i, (h, d) in enumerate(zip(kv_heads, head_dims)):
        for kv in ("key", "value"):
            feeds[PAST.format(i, kv)] = rng.standard_normal((batch, h, past, d)).astype(np.float32)
    return feeds


def _torch_call(wrapper: CacheModel, feeds: dict[str, np.ndarray], layers: int, layout: str = "optimum") -> list[np.ndarray]:
    """The outputs PyTorch's own attention gives (presents cut to the new positions in the buffer layout)."""
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    past = [(t[PAST.format(i, "key")], t[PAST.format(i, "value")]) for i in range(layers)]
    with torch.inference_mode():
        out = wrapper(t["input_ids"], t["attention_mask"], past, t.get("position_ids"))
    start = past[0][0].shape[2] if layout == "buffer" else 0
    return [out[0].float().numpy()] + [o[:, :, start:].float().numpy() for o in out[1:]]


def _names(layers: int, position_ids: bool, layout: str = "optimum") -> tuple[list[str], list[str]]:
    past = [PAST.format(i, kv) for i in range(layers) for kv in ("key", "value")]
    inputs = ["input_ids", "attention_mask", *past] + (["position_ids"] if position_ids else [])
    out = NEW if layout == "buffer" else PRESENT
    return inputs, ["logits"] + [out.format(i, kv) for i in range(layers) for kv in ("key", "value")]


def _with_gap(feeds: dict[str, np.ndarray], layers: int, gap: int, seed: int) -> dict[str, np.ndarray]:
    """`feeds` with `gap` random slots after the past, masked out (a buffer not yet full)."""
    rng = np.random.default_rng(seed)
    out = dict(feeds)
    past = feeds[PAST.format(0, "key")].shape[2]
    mask = feeds["attention_mask"]
    out["attention_mask"] = np.concatenate([mask[:, :past], np.zeros((mask.shape[0], gap), np.int64), mask[:, past:]], 1)
    for i in range(layers):
        for kv in ("key", "value"):
            a = feeds[PAST.format(i, kv)]
            noise = rng.standard_normal((*a.shape[:2], gap, a.shape[3])).astype(np.float32)
            out[PAST.format(i, kv)] = np.concatenate([a, noise], 2)
    return out


def _export(wrapper: nn.Module, feeds: dict[str, np.ndarray], layers: int, position_ids: bool, path: Path,
            opset: int, layout: str = "optimum") -> None:
    from torch.export import Dim
    from edgeslim.core.onnx_io import eager_attention
    batch, seq, past, total = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    args: tuple[Any, ...] = (t["input_ids"], t["attention_mask"],
                             [(t[PAST.format(i, "key")], t[PAST.format(i, "value")]) for i in range(layers)])
    shapes: list[Any] = [{0: batch, 1: seq}, {0: batch, 1: total}, [({0: batch, 2: past}, {0: batch, 2: past})] * layers]
    if position_ids:
        args += (t["position_ids"],)
        shapes.append({0: batch, 1: seq})
    inputs, outputs = _names(layers, position_ids, layout)
    attention = buffer_attention(wrapper.hf) if layout == "buffer" else grouped_attention(wrapper.hf)
    with _quiet_torch(), eager_attention(wrapper), attention:
        try:
            torch.onnx.export(wrapper, args, str(path), dynamo=True, dynamic_shapes=tuple(shapes), input_names=inputs,
                              output_names=outputs, opset_version=opset, verbose=False)
        except Exception as exc:  # torch.export raises many unrelated classes; keep the cause chained
            raise ExportValidationError(f"the key/value cache graph of {type(wrapper.hf).__name__} does not export: "
                                        f"{export_cause(exc)}") from exc


def _check_parity(path: Path, wrapper: CacheModel, vocab: int, kv_heads: list[int], head_dims: list[int],
                  position_ids: bool, limit: int | None, atol: float, rtol: float) -> dict[int, float]:
    """Every output against PyTorch at each past length; in the buffer layout also with 3 masked slots
    after the past (a buffer not yet full) against the same call without them."""
    graph = open_cache_graph(path)
    diffs = {}
    for past in PARITY_PASTS:
        past = min(past, (limit or past + 4) - 4)
        feeds = _feeds(vocab, kv_heads, head_dims, 2, 3, past, position_ids, seed=past + 1)
        expected = _torch_call(wrapper, feeds, len(kv_heads), graph.layout)
        actual = graph.session.run(None, feeds)
        names = [o.name for o in graph.session.get_outputs()]
        if graph.layout == "buffer":  # the same graph's outputs without the slots: only the order of sums may differ
            names += [f"{n} (3 masked slots)" for n in names]
            actual += graph.session.run(None, _with_gap(feeds, len(kv_heads), 3, seed=past))
            expected += actual[:len(expected)]
        if graph.keeps_logits:  # the last position alone (logits_to_keep=1), as generation asks for it
            names.append(f"logits ({KEEP}=1)")
            actual.append(graph.session.run(["logits"], {**feeds, KEEP: np.array(1, np.int64)})[0])
            expected.append(expected[0][:, -1:])
        bad = [(n, a.shape, e.shape) for n, a, e in zip(names, actual, expected)
               if a.shape != e.shape or not close(a, e, atol, rtol)]
        diffs[past] = float(np.max(np.abs(actual[0] - expected[0]))) if actual[0].shape == expected[0].shape else float("inf")
        if bad:
            n, a, e = bad[0]
            raise ExportValidationError(f"ONNX Runtime output differs from PyTorch in the cache graph at past length "
                                        f"{past}: {len(bad)} output(s), first {n} (shapes ORT {list(a)}, torch {list(e)}; "
                                        f"max |logits diff| {diffs[past]:.3g})")
    return diffs


def _check_drift(path: Path, wrapper: CacheModel, vocab: int, kv_heads: list[int], head_dims: list[int],
                 position_ids: bool) -> float:
    """Relative L2 error of the logits of a prefill from an empty cache; every output within ACTIVATION_REL."""
    feeds = _feeds(vocab, kv_heads, head_dims, 2, 3, 0, position_ids, seed=1)
    graph = open_cache_graph(path)
    expected = _torch_call(wrapper, feeds, len(kv_heads), graph.layout)
    session = graph.session
    actual = session.run(None, feeds)
    errors = [float(np.linalg.norm(a - e) / max(float(np.linalg.norm(e)), 1e-12)) if a.shape == e.shape
              else float("inf") for a, e in zip(actual, expected)]
    worst = int(np.argmax(errors))
    if not errors[worst] <= ACTIVATION_REL:
        name = session.get_outputs()[worst].name
        raise ActivationDriftError(f"with int8 activations ONNX Runtime's {name} is {errors[worst]:.3g} (relative "
                                   f"L2) from PyTorch's on a prefill, over {ACTIVATION_REL:g}")
    return errors[0]


def _check_greedy(path: Path, hf: nn.Module, vocab: int, limit: int | None, strict: bool = True) -> int:
    """Prompts whose greedy tokens in ORT equal torch generate's (strict: all of them, else raise)."""
    graph = open_cache_graph(path)
    rng = np.random.default_rng(7)
    equal = 0
    for length in PROMPTS:
        n = GREEDY_TOKENS if limit is None else max(1, min(GREEDY_TOKENS, limit - length))
        prompt = rng.integers(0, vocab, length).tolist()
        ids = torch.tensor([prompt])
        with torch.inference_mode(), _quiet_torch():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, eos_token_id=None)[0, length:].tolist()
        got = graph.generate(prompt, n).tokens
        equal += got == ref
        if got != ref and strict:
            first = next(i for i, (a, b) in enumerate(zip(got, ref)) if a != b) if len(got) == len(ref) else min(len(got), len(ref))
            raise ExportValidationError(f"greedy decoding in ONNX Runtime differs from torch generate for a prompt of "
                                        f"{length} tokens at new token {first}: ORT {got[first:first + 3]}, "
                                        f"torch {ref[first:first + 3]}")
    return equal


def set_accuracy(path: Path, level: int) -> None:
    """Set every MatMulNBits' accuracy_level (4: int8 activations) in the file at `path`."""
    import onnx
    graph = onnx.load(str(path))
    for node in graph.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = level
    onnx.save(graph, str(path))


class _Unfused(Exception):
    """Not every layer's attention became GroupQueryAttention: the shared layout does not apply."""


def to_onnx_cache(model: nn.Module, path: str | Path, positions: int | None = None, meta: dict[str, Any] | None = None,
                  opset: int = 20, atol: float = 1e-4, rtol: float = 1e-3, slim: bool = True,
                  quantized: Sequence[QuantizedMatrix] = (), accuracy_level: int = 0, layout: str = "optimum",
                  fallback: str = "optimum", drift_fallback: bool = False) -> CacheExport:
    """Export a causal LM's key/value-cache graph to `path`, validated (see the module docstring).

    Args:
        model: a Hugging Face causal LM or a loaded model wrapping one (`.hf`); compressed layers stay
            as they are (plain torch modules that export).
        positions: the model's length limit (tasks.max_positions), recorded for runners and used to
            keep the checks within it.
        meta: JSON-able facts a runner needs without torch (tokenizer, chat template, end-of-sequence
            ids), stored in the file's metadata under `edgeslim.lm` with the layout and positions.
        quantized: the integer weights of a weight-only quantized model, whose `model` is then the
            fake-quantized fp32 one (compress/weight_quant.py `dequantized`): its MatMuls are lowered
            to MatMulNBits (export/nbits.py) before the checks, which compare with `model` (outputs within
            NBITS_ATOL of their largest value; greedy tokens equal, as always).
        accuracy_level: MatMulNBits' compute type: 0 (fp32) is checked at atol/rtol; 4 (int8 activations,
            faster on CPUs with VNNI/AMX) is checked exact at 0 first, then each output of a prefill within
            ACTIVATION_REL relative L2 error, with the greedy agreement counted, not required.
        drift_fallback: where int8 activations drift past ACTIVATION_REL, keep the file at level 0 (checked
            exact already) with a RuntimeWarning and a note, instead of raising ActivationDriftError.
        layout: "optimum" (present = past + new), "buffer" (the new positions only: export/kv_buffer.py) or
            "shared" (Optimum's names, GroupQueryAttention writing present into the past's buffer: export/gqa.py);
            a model the shared layout refuses gets `fallback`'s, one the buffer layout refuses Optimum's, with the
            reason in the notes.

    Raises:
        ConfigError: not a causal LM, or an unknown layout.
        ExportValidationError: it does not export, or ORT differs from torch (nothing is written then).
    """
    import onnx
    if layout not in LAYOUTS or fallback not in ("optimum", "buffer"):
        raise ConfigError(f"unknown cache layout {layout!r} (one of {', '.join(LAYOUTS)}) or fallback {fallback!r} "
                          "(optimum or buffer)")
    hf = causal_hf(model)
    was_training = hf.training
    hf.eval()
    path = Path(path)
    try:
        kv_heads, head_dims = cache_layout(hf)
        layers, pos = len(kv_heads), uses_position_ids(hf)
        vocab = int(hf.get_output_embeddings().weight.shape[0]) if hf.get_output_embeddings() is not None \
            else int(hf.config.vocab_size)
        wrapper = CacheModel(hf).eval()
        notes: list[str] = []
        refusal = shared_refusal(hf, positions, head_dims) if layout == "shared" else None
        if refusal:
            notes.append(f"shared cache layout refused ({refusal}): {fallback} layout asked instead")
            layout = fallback
        refusal = buffer_refusal(hf, positions) if layout == "buffer" else None
        if refusal:
            notes.append(f"buffer cache layout refused ({refusal}): Optimum's layout written")
            layout = "optimum"
        with replace_output(path, ONNX) as tmp, tempfile.TemporaryDirectory(prefix="edgeslim-kv-", dir=path.parent) as work:
            target = Path(work) / path.name
            _export(BufferCacheModel(hf).eval() if layout == "buffer" else wrapper,
                    _feeds(vocab, kv_heads, head_dims, 2, 3, 5, pos, seed=0), layers, pos, target, opset, layout)
            if slim:
                note = slim_onnx(target)
                notes += [note] if note else []
            graph = onnx.load(str(target))  # one pass over the file: the fusions and the runner's metadata
            norms = fuse_rms_norms(graph)
            notes += [f"{norms} RMSNorm(s) as SimplifiedLayerNormalization"] if norms else []
            tables = rotary_tables(hf, positions) if pos else None
            rotary = fuse_rotary(graph, *tables) if tables else 0
            notes += [f"{rotary} rotary embedding(s) as RotaryEmbedding"] if rotary else []
            if layout == "shared":
                fused = fuse_group_query_attention(graph, query_heads(hf) or [], kv_heads, head_dims)
                if fused != layers:  # exported again in the fallback layout (nothing of this attempt is written)
                    raise _Unfused(f"{fused} of {layers} layers' attention has the form GroupQueryAttention replaces")
                notes.append(f"{fused} attention layer(s) as GroupQueryAttention (present written in the past's buffer)")
            if not add_logits_to_keep(graph):
                notes.append(f"no {KEEP} input: the LM head was not found before logits (a prefill computes every position's)")
            entry = {"layers": layers, "max_positions": positions, "position_ids": pos, "cache_layout": layout,
                     "model_type": getattr(hf.config, "model_type", None), **(meta or {})}
            graph.metadata_props.add(key=META_KEY, value=json.dumps(entry))
            onnx.save(graph, str(target))
            lowered = None
            if quantized:  # rewrites the file, its metadata kept
                lowered = lower_matmul_nbits(target, quantized, 0)
                if layout == "shared":  # q, k and v now one MatMulNBits and a Split: fed to GroupQueryAttention whole
                    packed = onnx.load(str(target))
                    if pack_qkv(packed):
                        onnx.save(packed, str(target))
                notes.append(f"{lowered.matmuls} MatMul(s) as MatMulNBits, {lowered.gathers} embedding(s) gathered "
                             f"from integers: {lowered.bytes_before:,} -> {lowered.bytes_after:,} weight bytes"
                             + (f"; left fp32 (no MatMulNBits block fits): {', '.join(lowered.unmatched[:5])}"
                                if lowered.unmatched else ""))
            diffs = _check_parity(target, wrapper, vocab, kv_heads, head_dims, pos, positions,
                                  max(atol, NBITS_ATOL) if lowered is not None else atol, rtol)
            equal = _check_greedy(target, hf, vocab, positions)
            if lowered is not None and accuracy_level:  # exact at level 0 first, then the faster compute checked
                set_accuracy(target, accuracy_level)  # int8 activations are not exact: a bound on their drift
                try:
                    drift = _check_drift(target, wrapper, vocab, kv_heads, head_dims, pos)
                except ActivationDriftError as exc:
                    if not drift_fallback:
                        raise
                    set_accuracy(target, 0)
                    warnings.warn(f"{exc}: MatMulNBits at accuracy level 0 (fp32 activations, slower) instead",
                                  RuntimeWarning, stacklevel=2)
                    notes.append(f"MatMulNBits accuracy_level {accuracy_level} refused ({exc}): level 0 kept")
                else:
                    equal = _check_greedy(target, hf, vocab, positions, strict=False)
                    notes.append(f"MatMulNBits accuracy_level {accuracy_level}: exact at level 0, then a prefill's "
                                 f"logits within {drift:.2g} relative L2 error and greedy tokens equal for {equal} of "
                                 f"{len(PROMPTS)} prompts")
            shutil.move(str(target), tmp)
    except _Unfused as why:  # exported again in the fallback layout (nothing of this attempt was written)
        res = to_onnx_cache(model, path, positions, meta, opset, atol, rtol, slim, quantized, accuracy_level, fallback,
                            drift_fallback=drift_fallback)
        res.notes.insert(0, f"shared cache layout refused ({why}): {fallback} layout written")
        return res
    finally:
        hf.train(was_training)
    return CacheExport(path, path.stat().st_size, layers, kv_heads, head_dims, pos, diffs, equal, notes, lowered,
                       layout)
