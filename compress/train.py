"""Short fine-tuning ("healing") after compression, shared by every compressor family.

Loss: the task loss of CalibData.targets (cross-entropy on logits for integer class targets, MSE
for float targets). Distillation from the original model is the same loop with the original's
outputs as float targets (`teacher_targets`), computed before the model is compressed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from edgeslim.compress.base import CalibData, CompressResult, Compressor, ConfigBase, register, working_copy
from edgeslim.errors import ConfigError, SourceError


def check_finite(tensors: Mapping[str, torch.Tensor | None], where: str) -> None:
    """Raise SourceError naming `where` and the tensor when a floating tensor holds NaN or Inf."""
    for key, t in tensors.items():
        if t is not None and torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
            raise SourceError(f"{where}: '{key}' contains NaN or Inf")


def task_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on logits for integer targets, mean squared error for float targets.

    Raises:
        ConfigError: the target's shape does not fit the output.
    """
    if not torch.is_floating_point(target):
        if output.shape[:-1] != target.shape:
            raise ConfigError(f"class targets of shape {tuple(target.shape)} do not fit logits {tuple(output.shape)}")
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
    if output.shape != target.shape:
        raise ConfigError(f"targets of shape {tuple(target.shape)} do not fit outputs {tuple(output.shape)}")
    return F.mse_loss(output, target.to(output.dtype))


@torch.no_grad()
def teacher_targets(model: nn.Module, data: CalibData) -> CalibData:
    """The same batches with the model's current outputs as targets (distillation from the original)."""
    was_training = model.training
    model.eval()
    outputs = [model(**batch).detach() for _, batch, _ in data]
    model.train(was_training)
    return CalibData(f"{data.name} (distilled)", data.batches, outputs)


@dataclass
class HealReport:
    """What a healing run did."""

    steps: int
    losses: list[float] = field(default_factory=list)  # loss at every step

    @property
    def final_loss(self) -> float:
        tail = self.losses[-10:]
        return sum(tail) / len(tail)


def heal(model: nn.Module, data: CalibData, steps: int = 200, lr: float = 5e-5, weight_decay: float = 0.01,
         max_grad_norm: float = 1.0, seed: int = 0, progress: bool = True) -> HealReport:
    """Fine-tune `model` in place for `steps` AdamW steps over `data` (cycled, reshuffled each pass).

    The learning rate decays linearly to zero. The model is left in eval mode.

    Raises:
        ConfigError: data has no targets (use teacher_targets for distillation) or a bad setting.
        SourceError: a batch, the loss or the gradient is NaN/Inf (step and batch named).
    """
    if data.targets is None:
        raise ConfigError(f"healing needs targets: '{data.name}' has none; for distillation pass "
                          "teacher_targets(original_model, data), computed before compression")
    if steps < 1 or lr <= 0:
        raise ConfigError(f"healing needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    report = HealReport(steps)
    model.train()
    try:
        with Progress(disable=not progress) as bar:
            task = bar.add_task(f"healing on {data.name}", total=steps)
            for step in range(steps):
                if not order:
                    order = torch.randperm(len(data.batches), generator=gen).tolist()
                i = order.pop()
                where = f"healing step {step}, batch {i} of '{data.name}'"
                batch, target = data.batches[i], data.targets[i]
                check_finite({**batch, "target": target}, where)
                loss = task_loss(model(**batch), target)
                check_finite({"loss": loss}, where)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                check_finite({"gradient norm": norm}, where)
                opt.step()
                sched.step()
                report.losses.append(float(loss.detach()))
                bar.update(task, advance=1, description=f"healing on {data.name} loss {report.losses[-1]:.4f}")
    finally:
        model.eval()
    return report


@dataclass(frozen=True)
class HealConfig(ConfigBase):
    """Settings of the `heal` step."""

    steps: int = 200  # AdamW steps
    lr: float = 5e-5  # peak learning rate, decayed linearly to 0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # gradient clipping
    seed: int = 0  # order of the batches

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"heal steps must be a positive integer, got {self.steps!r}")
        if not self.lr > 0:
            raise ConfigError(f"heal lr must be > 0, got {self.lr}")


@register
class Heal(Compressor):
    """A recipe step that fine-tunes the current model; it changes no structure, so replay is a no-op."""

    name = "heal"
    Config = HealConfig
    needs_calibration = True
    distils = True

    def compress(self, model: nn.Module, config: HealConfig, calib: CalibData | None = None,
                 inplace: bool = False) -> CompressResult:
        config = self.make_config(config)
        if calib is None:
            raise ConfigError("'heal' needs training data with targets (calib = ...)")
        model = working_copy(model, inplace)
        report = heal(model, calib, config.steps, config.lr, config.weight_decay, config.max_grad_norm, config.seed)
        return CompressResult(model, self.name, config.to_dict(), [],
                              {"steps": report.steps, "final_loss": report.final_loss})

    def replay(self, model: nn.Module, resolved: Mapping[str, Any]) -> nn.Module:
        return model
