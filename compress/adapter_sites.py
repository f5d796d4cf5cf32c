"""Where adapters go in a transformer block: after the attention output and after the feed-forward output.

Known blocks are found by their children's names (BLOCKS); other architectures name their output
Linears with regexes. Used by the adapter family (compress/compacter.py).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from edgeslim.compress.replace import select_modules
from edgeslim.core.errors import ConfigError

# Where the attention output and the feed-forward output of a block come out, per architecture:
# (name of the architecture family, path of the attention-output module, path of the FFN-output module).
BLOCKS = (
    ("bert", "attention.output.dense", "output.dense"),  # BERT, RoBERTa, ELECTRA, MiniLM, ...
    ("distilbert", "attention.out_lin", "ffn.lin2"),
    ("llama", "self_attn.o_proj", "mlp.down_proj"),  # LLaMA, Mistral, Qwen2, SmolLM2
    ("torch", "dropout1", "dropout2"),  # nn.TransformerEncoderLayer: after the attention / FFN dropouts
)


def _width(module: nn.Module, block: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(block, nn.TransformerEncoderLayer):
        return block.linear2.out_features
    raise ConfigError(f"cannot tell the output width of {type(module).__name__}; target Linear modules")


def find_sites(model: nn.Module, placement: str, attn_target: str | None = None, ffn_target: str | None = None
               ) -> list[dict[str, Any]]:
    """Where adapters go: [{"name", "kind" ("attn" | "ffn"), "width"}] in module order.

    Known blocks (BLOCKS) are found by their children's names; `attn_target` / `ffn_target` (regex,
    fullmatch on Linear names) override the search for other architectures.

    Raises:
        ConfigError: no known block and no target given, or a target that matches nothing.
    """
    kinds = ("attn", "ffn") if placement == "both" else ("ffn",)
    if attn_target or ffn_target:
        sites = []
        for kind, pattern in (("attn", attn_target), ("ffn", ffn_target)):
            if kind in kinds and pattern:
                sites += [{"name": n, "kind": kind, "width": m.out_features} for n, m in select_modules(model, pattern)]
        return sorted(sites, key=lambda s: list(dict(model.named_modules())).index(s["name"]))
    sites = []
    for name, block in model.named_modules():
        for _, attn, ffn in BLOCKS:
            try:
                found = {"attn": block.get_submodule(attn), "ffn": block.get_submodule(ffn)}
            except AttributeError:
                continue
            for kind in kinds:
                path = attn if kind == "attn" else ffn
                sites.append({"name": f"{name}.{path}" if name else path, "kind": kind,
                              "width": _width(found[kind], block)})
            break
    if not sites:
        raise ConfigError(f"no transformer block found (known: {', '.join(b[0] for b in BLOCKS)}); give "
                          "attn_target / ffn_target regexes naming the output Linears of your blocks")
    return sites


def no_fast_path(model: nn.Module) -> None:
    """nn.TransformerEncoder(Layer)'s fused inference path skips submodules: turn it off where adapted."""
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer):
            m.activation_relu_or_gelu = 0  # the flag the fast path requires; the slow path ignores it
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False
