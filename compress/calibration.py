"""Calibration statistics of targeted Linear layers: empirical Fisher and input-activation moments.

Batches stream through the model once; memory is O(weights): one Fisher accumulator per targeted
weight and one n x n second-moment matrix per targeted input width, never the samples themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from rich.progress import Progress
from torch import nn

from edgeslim.calib import CalibData
from edgeslim.compress.train import check_finite, task_loss
from edgeslim.errors import ConfigError


@dataclass
class CalibStats:
    """Accumulated statistics, keyed by module name."""

    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # sum over batches of grad(W)^2
    xtx: dict[str, torch.Tensor] = field(default_factory=dict)  # sum of x x^T over input rows, float64
    abs_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # sum of |x| per input feature
    rows: dict[str, int] = field(default_factory=dict)  # number of input rows seen per layer
    batches: int = 0

    def second_moment(self, name: str) -> torch.Tensor:
        """E[x x^T] of the layer's inputs (n x n, float64)."""
        return self.xtx[name] / max(self.rows[name], 1)

    def mean_abs(self, name: str) -> torch.Tensor:
        """E|x| per input feature of the layer."""
        return self.abs_sum[name] / max(self.rows[name], 1)


def _token_rows(x: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The layer input as rows (-1, n), without padded positions when the batch has an attention mask."""
    mask = batch.get("attention_mask")
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def collect_stats(model: nn.Module, calib: CalibData, names: list[str], fisher: bool = True,
                  activations: bool = True, progress: bool = True, seed: int = 0) -> CalibStats:
    """Empirical Fisher of each named Linear's weight and second moments of its input.

    The Fisher is the sum over batches of the squared gradient of the batch loss (Hsu et al., ICLR
    2022, eq. 3). The loss is the task loss when calib.targets is given (cross-entropy on logits for
    integer targets, MSE for float targets). Without targets it is distillation against the model's
    own outputs: as the residual of MSE to the unchanged model is zero, the target is the original
    output plus unit Gaussian noise, whose squared gradient is in expectation the Gauss-Newton
    diagonal diag(J^T J), the Fisher of the Gaussian output model (Kunstner et al., 2019, Sec. 3).

    Args:
        model: the model to calibrate (not modified; called as model(**batch) -> Tensor).
        calib: batches (and optional targets).
        names: dotted names of the nn.Linear modules to collect for.
        fisher, activations: which statistics to collect.
        progress: show a progress bar.
        seed: seed of the distillation noise.

    Raises:
        ConfigError: a name is not an nn.Linear of the model.
        SourceError: a batch, target, output or gradient holds NaN/Inf (the batch index is named).
    """
    modules: dict[str, nn.Linear] = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"calibration: '{name}' is a {type(module).__name__}, expected Linear")
        modules[name] = module
    stats = CalibStats()
    current: dict[str, torch.Tensor] = {}  # the batch being run (its attention mask)
    shared: dict[int, tuple] = {}  # per-batch moments by input tensor id (tensor kept alive)

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if id(x) not in shared:  # q/k/v read one tensor: its moments are computed once
                rows = _token_rows(x.detach(), current).float()
                shared[id(x)] = (x, (rows.T @ rows).double(), rows.abs().sum(0).double(), rows.shape[0])
            _, xtx, abs_sum, count = shared[id(x)]
            if name not in stats.xtx:
                stats.xtx[name] = torch.zeros_like(xtx)
                stats.abs_sum[name] = torch.zeros_like(abs_sum)
                stats.rows[name] = 0
            stats.xtx[name] += xtx
            stats.abs_sum[name] += abs_sum
            stats.rows[name] += count
        return hook

    handles = [mod.register_forward_pre_hook(hook_for(n)) for n, mod in modules.items()] if activations else []
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        if fisher:
            for name, mod in modules.items():
                mod.weight.requires_grad_(True)
                stats.fisher[name] = torch.zeros_like(mod.weight, dtype=torch.float32)
        with Progress(transient=True, disable=not progress) as bar:
            task = bar.add_task(f"calibrating on {calib.name}", total=len(calib.batches))
            for i, batch, target in calib:
                where = f"calibration batch {i} of '{calib.name}'"
                check_finite(batch, where)
                if target is not None:
                    check_finite({"target": target}, where)
                current.clear()
                current.update(batch)
                shared.clear()
                with torch.set_grad_enabled(fisher):
                    out = model(**batch)
                check_finite({"model output": out}, where)
                if fisher:
                    if target is None:
                        target = out.detach() + torch.randn(out.shape, generator=generator).to(out)
                    model.zero_grad(set_to_none=True)
                    task_loss(out, target).backward()
                    for name, mod in modules.items():
                        check_finite({f"gradient of {name}.weight": mod.weight.grad}, where)
                        stats.fisher[name] += mod.weight.grad.detach().float().square()
                stats.batches += 1
                bar.advance(task)
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return stats
