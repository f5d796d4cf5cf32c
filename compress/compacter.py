"""Adapters on a frozen base: Compacter, Compacter++, bottleneck adapters, LoRA and head-only training.

Compacter (Mahabadi, Henderson, Ruder, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers",
NeurIPS 2021): each adapter is down-projection, non-linearity, up-projection and a residual
(Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"), with both projections
parameterized hypercomplex multiplication (PHM) layers, Eq. (3)-(5):

    W = sum_{i=1..n} A_i (x) B_i,   A_i in R^{n x n} shared by every adapter layer of the model,
                                    B_i = s_i t_i^T of rank r (r = 1 in the paper), per layer.

Compacter places an adapter after the attention output projection and after the feed-forward output
of every block; Compacter++ only after the feed-forward. Baselines in the same framework: bottleneck
adapters with dense projections (Houlsby placement "both", Pfeiffer et al. 2021 placement "ffn"),
LoRA (Hu et al. 2022: W + (alpha / r) B A on chosen Linears, B initialised to zero) and training the
task head only. Every adapter starts at the identity (zero up-projection, zero LoRA B), so the
adapted model at initialisation computes exactly what the base does (the lossless setting).

For export: LoRA merges into its Linear (W' = W + alpha / r * B A, exact); PHM layers become plain
dense Linears (`to_dense`, exact); bottleneck and Compacter adapters cannot merge into the base
weights because of the non-linearity between their projections, so they stay as small extra
MatMuls. Training uses the shared loop `compress.train.fit`.
"""
from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.compress.base import (CompressContext, CompressResult, Compressor, ConfigBase, LayerChange, register,
                                     working_copy)
from edgeslim.compress.adapter_layers import (Adapter, AdaptedModel, AdaptedSite, LoRALinear, PHMLinear, adapted_model,
                                              init_rule)
from edgeslim.compress.adapter_sites import find_sites, no_fast_path
from edgeslim.compress.replace import count_params, select_modules, set_submodule
from edgeslim.compress.train import fit
from edgeslim.core.errors import ConfigError


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def state_sha256(model: nn.Module) -> str:
    """SHA-256 over a model's state dict (names, dtypes, shapes, bytes): the identity of a base."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _at_least(config: ConfigBase, minimum: int, *keys: str) -> None:
    for key in keys:
        if getattr(config, key) < minimum:
            raise ConfigError(f"{key} must be at least {minimum}, got {getattr(config, key)}")


AUTO_STEPS = 120  # optimizer steps a default training aims at: a 20-line set gets ~60 passes, not one
AUTO_MAX_EPOCHS = 60


def auto_epochs(batches: int) -> int:
    """Passes over `batches` batches that make about AUTO_STEPS steps (at least 1, at most AUTO_MAX_EPOCHS)."""
    return max(1, min(AUTO_MAX_EPOCHS, -(-AUTO_STEPS // max(batches, 1))))


@dataclass(frozen=True)
class HeadConfig(ConfigBase):
    """Settings shared by every adapter method (head-only training uses just these)."""

    labels: tuple[str | int, ...] | None = None  # class names: adds a new head Linear(features, len(labels))
    head_target: str = r"(.*\.)?(classifier|score)"  # existing head trained when labels is None
    epochs: int | None = None  # passes over the data; None: enough for AUTO_STEPS steps (1..AUTO_MAX_EPOCHS); 0: untrained
    lr: float = 3e-3  # peak AdamW learning rate, decayed linearly to 0
    seed: int = 0  # initialisation of the new weights and order of the batches
    train_layer_norms: bool = False  # also train the base's LayerNorm/RMSNorm weights

    def validate(self) -> None:
        if self.epochs is not None:
            _at_least(self, 0, "epochs")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.labels is not None and (len(self.labels) < 2 or len(set(self.labels)) != len(self.labels)):
            raise ConfigError(f"labels must be at least 2 distinct class names, got {list(self.labels)}")


@dataclass(frozen=True)
class LoRAConfig(HeadConfig):
    """LoRA on the attention query and value projections (Hu et al. 2022)."""

    lr: float = 1e-3
    rank: int = 8  # rank r of B A
    alpha: float = 16.0  # scale alpha / r
    target: str = r".*\.(query|value|q_proj|v_proj|q_lin|v_lin)"  # regex (fullmatch) on Linear names

    def validate(self) -> None:
        super().validate()
        _at_least(self, 1, "rank")


@dataclass(frozen=True)
class BottleneckConfig(HeadConfig):
    """Bottleneck adapters: "both" = Houlsby (attention and FFN), "ffn" = Pfeiffer (FFN only)."""

    train_layer_norms: bool = True
    placement: Literal["both", "ffn"] = "both"  # adapters after attention and FFN outputs, or the FFN only
    reduction: int = 16  # bottleneck width = hidden width / reduction
    nonlinearity: Literal["gelu", "relu", "swish"] = "gelu"  # between the down and up projections
    attn_target: str | None = None  # regex of attention-output Linears (when the architecture is unknown)
    ffn_target: str | None = None  # regex of FFN-output Linears

    def validate(self) -> None:
        super().validate()
        _at_least(self, 1, "reduction")


@dataclass(frozen=True)
class CompacterConfig(BottleneckConfig):
    """Compacter: PHM projections, A shared by every adapter layer, rank-r fast weights."""

    n: int = 4  # number of Kronecker terms; must divide the hidden and bottleneck widths
    rank: int = 1  # rank of B_i = s_i t_i^T

    def validate(self) -> None:
        super().validate()
        _at_least(self, 1, "n", "rank")


@dataclass(frozen=True)
class CompacterPPConfig(CompacterConfig):
    """Compacter++: adapters after the feed-forward output only."""

    placement: Literal["both", "ffn"] = "ffn"


def _trainable(model: AdaptedModel, config: HeadConfig, head_added: bool) -> list[str]:
    """Freeze the base; return the names of the parameters that train (adapters, head, norms)."""
    for p in model.parameters():
        p.requires_grad_(False)
    chosen: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if isinstance(module, (Adapter, LoRALinear)):
            for pname, p in module.named_parameters(prefix=name):
                if not pname.startswith(f"{name}.inner."):
                    chosen[pname] = p
        elif config.train_layer_norms and _is_norm(module):
            chosen.update(dict(module.named_parameters(prefix=name)))
    if head_added:
        chosen.update(dict(model.head.named_parameters(prefix="head")))
    else:
        for name, module in model.base.named_modules():
            if name and re.fullmatch(config.head_target, name):
                chosen.update(dict(module.named_parameters(prefix=f"base.{name}")))
    if hasattr(model, "phm_rule"):
        chosen["phm_rule"] = model.phm_rule
    for p in chosen.values():
        p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]  # shared ones named once


def build(model: nn.Module, resolved: Mapping[str, Any], seed: int = 0) -> AdaptedModel:
    """Insert the recorded adapters into `model` (in place) and wrap it with its head: compress and replay."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        rule = init_rule(resolved["n"], gen) if "n" in resolved else None
        for site in resolved.get("sites", []):
            adapter = Adapter(site["width"], site["bottleneck"], resolved["nonlinearity"], rule, resolved.get("rank", 1))
            set_submodule(model, site["name"], AdaptedSite.from_module(model.get_submodule(site["name"]), adapter))
        for name in resolved.get("lora", []):
            set_submodule(model, name, LoRALinear.from_linear(model.get_submodule(name), resolved["rank"], resolved["alpha"]))
        head = resolved.get("head")
        head_module = nn.Linear(head["features"], len(head["labels"])) if head else None
    no_fast_path(model)
    adapted = adapted_model(model, head_module, rule)
    adapted.labels = list(head["labels"]) if head else None  # class names of the head's outputs, in order
    return adapted


def _plan(model: nn.Module, method: str, config: HeadConfig) -> dict[str, Any]:
    """Every structural decision, as data: the sites with their widths, LoRA targets, widths of the head."""
    plan: dict[str, Any] = {"method": method}
    if isinstance(config, BottleneckConfig):
        plan["nonlinearity"] = config.nonlinearity
        plan["sites"] = find_sites(model, config.placement, config.attn_target, config.ffn_target)
        for site in plan["sites"]:
            site["bottleneck"] = max(1, site["width"] // config.reduction)
    if isinstance(config, CompacterConfig):
        plan["n"], plan["rank"] = config.n, config.rank
        for site in plan["sites"]:
            if site["width"] % config.n or site["bottleneck"] % config.n:
                raise ConfigError(f"Compacter n={config.n} must divide the hidden width {site['width']} and the "
                                  f"bottleneck width {site['bottleneck']} (= {site['width']} // reduction "
                                  f"{config.reduction}) at {site['name']}; change n or reduction")
    if isinstance(config, LoRAConfig):
        plan["lora"] = [n for n, _ in select_modules(model, config.target)]
        plan["rank"], plan["alpha"] = config.rank, config.alpha
    return plan


def _features(model: nn.Module, calib: CalibData | None) -> int:
    if calib is None:
        raise ConfigError("a new head (labels=...) needs training data to size it: pass calib with targets")
    with torch.inference_mode():
        out = model(**calib.batches[0])
    if out.dim() != 2:
        raise ConfigError(f"a classification head needs [batch, features] outputs; the model gives "
                          f"{tuple(out.shape)} (pool its output first)")
    return int(out.shape[-1])


class _AdapterCompressor(Compressor):
    """Shared compress/replay: plan, build, train with the shared loop, one LayerChange per adapter."""

    kind = "adapter"

    def compress(self, model: nn.Module, config: HeadConfig, calib: CalibData | None = None,
                 inplace: bool = False, context: CompressContext | None = None) -> CompressResult:
        config = self.make_config(config)
        base = working_copy(model, inplace)
        resolved = _plan(base, self.name, config) | {"base_sha256": state_sha256(base)}
        if config.labels is not None:
            resolved["head"] = {"features": _features(base, calib), "labels": list(config.labels)}
        adapted = build(base, resolved, config.seed)
        resolved["trainable"] = _trainable(adapted, config, "head" in resolved)
        if not resolved["trainable"]:
            raise ConfigError(f"{self.name}: nothing to train (no head matches head_target={config.head_target!r}; "
                              "give labels=[...] to add one)")
        epochs = config.epochs if config.epochs is not None or calib is None else auto_epochs(len(calib.batches))
        if calib is not None and epochs:
            if calib.targets is None:
                raise ConfigError(f"{self.name} trains on labelled data: '{calib.name}' has no targets")
            report = fit(adapted, calib, epochs=epochs, lr=config.lr, seed=config.seed, max_grad_norm=1.0,
                         weight_decay=0.01, label=self.name)
            resolved["train"] = {"steps": report.steps, "epochs": epochs, "final_loss": report.final_loss,
                                 "data": calib.name}
        return self.result(adapted.eval(), config, changes(adapted), resolved)

    def replay(self, model: nn.Module, resolved: Mapping[str, Any], inputs: Sequence[Any] = ()) -> nn.Module:
        adapted = build(model, resolved)
        trainable = set(resolved.get("trainable", []))
        for name, p in adapted.named_parameters():
            p.requires_grad_(name in trainable)
        return adapted.eval()


def changes(model: AdaptedModel) -> list[LayerChange]:
    """One row per adapted module (params of the module before, module + adapter after), new head and A."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, AdaptedSite):
            added = sum(p.numel() for n, p in m.adapter.named_parameters() if not n.endswith("rule"))
            kind = "PHM adapter" if isinstance(m.adapter.down, PHMLinear) else "bottleneck adapter"
            rows.append(LayerChange(name, f"{type(m.inner).__name__} -> + {kind}", count_params(m.inner),
                                    count_params(m.inner) + added, m.adapter.down.out_features, "adapter"))
        elif isinstance(m, LoRALinear):
            rows.append(LayerChange(name, "Linear -> + LoRA", count_params(m.inner),
                                    count_params(m.inner) + m.lora_a.numel() + m.lora_b.numel(), m.rank, "adapter",
                                    note="merges into the Linear for export"))
    if not isinstance(model.head, nn.Identity):
        rows.append(LayerChange("head", "new head Linear", 0, count_params(model.head), status="adapter"))
    if hasattr(model, "phm_rule"):
        rows.append(LayerChange("phm_rule", "shared PHM rule A", 0, model.phm_rule.numel(), status="adapter",
                                note="shared by all adapters"))
    return rows


def merge_for_export(model: nn.Module) -> nn.Module:
    """A copy for inference: LoRA merged into its Linear, PHM layers as dense Linears (both exact).

    Bottleneck and Compacter adapters stay separate (the non-linearity prevents a merge).
    """
    merged = copy.deepcopy(model)
    for name, m in list(merged.named_modules()):
        if isinstance(m, LoRALinear):
            set_submodule(merged, name, m.merge())
        elif isinstance(m, PHMLinear):
            set_submodule(merged, name, m.to_dense())
    return merged.eval()


def paper_param_count(method: str, blocks: int, width: int, bottleneck: int = 0, n: int = 4, rank: int = 1,
                      lora_layers: int = 0, lora_in: int = 0, lora_out: int = 0) -> int:
    """Added parameters by the papers' formulas (biases included, head and norms excluded).

    Compacter (Mahabadi et al. 2021, "parameter efficiency": O(n^3 + 4 L (k + d)) for L blocks at r = 1):
    n^3 for the shared A plus r (k + d) per PHM layer (n fast factors of k/n x r and r x d/n), two PHM
    layers per adapter, two adapters per block (one in Compacter++); a bottleneck adapter 2 d k (Houlsby
    2 per block, Pfeiffer "bottleneck_ffn" 1); LoRA r (d_in + d_out) per targeted Linear (Hu et al.
    2022). Each adapter's biases (k + d) are added.
    """
    per_block = 2 if method in ("compacter", "bottleneck") else 1
    adapters = blocks * per_block
    biases = adapters * (width + bottleneck)
    if method in ("compacter", "compacter_pp"):
        return n ** 3 + adapters * 2 * rank * (width + bottleneck) + biases
    if method in ("bottleneck", "bottleneck_ffn"):
        return adapters * 2 * width * bottleneck + biases
    if method == "lora":
        return lora_layers * rank * (lora_in + lora_out)
    return 0


METHODS = {  # registry name -> (config, what it does)
    "compacter": (CompacterConfig, "Compacter adapters (PHM, shared A) after attention and FFN; base frozen"),
    "compacter_pp": (CompacterPPConfig, "Compacter++ adapters after the FFN only; base frozen"),
    "bottleneck": (BottleneckConfig, "Houlsby ('both') or Pfeiffer ('ffn') bottleneck adapters; base frozen"),
    "lora": (LoRAConfig, "LoRA on the query/value projections (merges into the weights for export); base frozen"),
    "head": (HeadConfig, "train the task head only; base frozen"),
}
for _name, (_config, _doc) in METHODS.items():
    register(type(f"Adapter_{_name}", (_AdapterCompressor,),
                  {"name": _name, "Config": _config, "__doc__": _doc, "__module__": __name__}))
