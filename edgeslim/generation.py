"""Causal LMs as users run them: the cache graph's metadata, a torch-free tokenizer, `edgeslim generate`.

A key/value-cache ONNX file (export/kv_cache.py) carries what a runner needs in its metadata
(`edgeslim.lm`): the tokenizer (tokenizer.json text), the chat template, the end-of-sequence ids and
the model's positions. So `generate X.onnx` needs numpy, onnxruntime, tokenizers and jinja2, and never
imports torch; a SOURCE or `.slim` is exported first (validated), into a temporary folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from edgeslim.core.errors import ConfigError


def lm_meta(loaded: Any) -> dict[str, Any]:
    """The runner's facts about a loaded causal LM: tokenizer.json, chat template, special tokens, eos ids."""
    tok = getattr(loaded.encode, "tokenizer", None) if loaded.encode else None
    hf = getattr(loaded.model, "hf", loaded.model)
    eos = getattr(getattr(hf, "generation_config", None), "eos_token_id", None)
    if eos is None and tok is not None:
        eos = tok.eos_token_id
    meta: dict[str, Any] = {"eos_token_ids": [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])
                                              if e is not None]}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        meta["tokenizer"] = backend.to_str()
        meta["chat_template"] = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
        meta["bos_token"] = tok.bos_token
        meta["eos_token"] = tok.eos_token
    return meta


@dataclass
class TextCodec:
    """A tokenizer without torch or transformers: tokenizer.json through `tokenizers`, the chat template
    through jinja2 (as transformers renders it)."""

    tokenizer: Any
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None

    @classmethod
    def from_meta(cls, meta: dict[str, Any], where: str) -> "TextCodec":
        """Raises ConfigError when the file carries no tokenizer (exit 2)."""
        if not meta.get("tokenizer"):
            raise ConfigError(f"{where} carries no tokenizer: export it with `edgeslim export SOURCE --kv-cache` "
                              "from a Hugging Face folder that has one (tokenizer.json)")
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_str(meta["tokenizer"]), meta.get("chat_template"), meta.get("bos_token"),
                   meta.get("eos_token"))

    def prompt_ids(self, text: str, chat: bool = True) -> list[int]:
        """Token ids of `text`, wrapped in the chat template as one user turn when the model has one."""
        if chat and self.chat_template:
            import jinja2
            env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
            rendered = env.from_string(self.chat_template).render(
                messages=[{"role": "user", "content": text}], add_generation_prompt=True,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
            return self.tokenizer.encode(rendered, add_special_tokens=False).ids
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


@dataclass
class GenerateResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    stopped: str


def generate_text(path: Path, prompt: str, n: int = 64, temperature: float = 0.0, threads: int | None = None,
                  chat: bool = True, seed: int = 0, echo: Any = None) -> GenerateResult:
    """Generate up to `n` tokens after `prompt` with the cache graph at `path` (ORT), streaming each
    piece of text to `echo(str)` as it is decoded.

    Raises:
        ConfigError: n <= 0, a prompt longer than the model's positions, a file without tokenizer or
            not a cache graph (exit 2). SourceError: ORT cannot read the file (exit 3).
    """
    from edgeslim.runtime.kv_decoder import open_cache_graph
    if n <= 0:
        raise ConfigError(f"-n must be > 0 new tokens, got {n}")
    if temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    graph = open_cache_graph(path, threads)
    codec = TextCodec.from_meta(graph.meta, str(path))
    ids = codec.prompt_ids(prompt, chat)
    if graph.max_positions and len(ids) >= graph.max_positions:
        raise ConfigError(f"the prompt is {len(ids)} tokens; the model takes at most {graph.max_positions} "
                          "positions in all (prompt + new tokens)")
    tokens: list[int] = []
    shown = ""
    times = []
    for token, t in graph.stream(ids, n, temperature, graph.meta.get("eos_token_ids", ()), seed):
        tokens.append(token)
        times.append(t)
        text = codec.decode(tokens)
        if echo is not None and len(text) > len(shown) and not text.endswith("\ufffd"):
            echo(text[len(shown):])
            shown = text
    text = codec.decode(tokens)
    if echo is not None and len(text) > len(shown):
        echo(text[len(shown):])
    later = len(tokens) - 1
    rate = later / (times[-1] - times[0]) if later > 0 and times[-1] > times[0] else float("nan")
    return GenerateResult(text, len(ids), len(tokens), times[0], rate, graph.last_stop)

