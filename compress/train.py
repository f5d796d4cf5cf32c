"""The one training loop (`fit`), shared by every family, and the `heal` step built on it.

Loss: the task loss of CalibData.targets (cross-entropy on logits for integer class targets, MSE
for float targets). Without targets, `fit` distils toward a teacher (the original model): the
teacher's outputs on each batch are the targets.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.compress.base import CompressContext, CompressResult, Compressor, ConfigBase, register, working_copy
from edgeslim.core.errors import ConfigError, SourceError
from edgeslim.core.specs import TensorSpec
from edgeslim.core.progress import bar

Batch = dict[str, torch.Tensor]
Augment = Callable[[Batch, torch.Tensor | None, torch.Generator], tuple[Batch, torch.Tensor | None]]


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


def logit_kl(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the softmax over the last dim, per position (distilling logits,
    e.g. a causal LM toward its original: Hinton et al. 2015 at temperature 1)."""
    student, teacher = output.float().log_softmax(-1), target.float().log_softmax(-1)
    return F.kl_div(student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1]),
                    log_target=True, reduction="batchmean")


@torch.no_grad()
def teacher_targets(model: nn.Module, data: CalibData) -> CalibData:
    """The same batches with the model's current outputs as targets (distillation from the original)."""
    was_training = model.training
    model.eval()
    try:
        outputs = [model(**batch).detach() for _, batch, _ in data]
    finally:
        model.train(was_training)
    return CalibData(f"{data.name} (distilled)", data.batches, outputs)


@dataclass
class FitReport:
    """What a training run did."""

    steps: int
    losses: list[float] = field(default_factory=list)  # loss at every step

    def tail_loss(self, last: int = 10) -> float:
        """Mean loss of the last `last` steps."""
        tail = self.losses[-last:]
        return sum(tail) / len(tail)

    @property
    def final_loss(self) -> float:
        return self.tail_loss(10)


def fit(model: nn.Module, data: CalibData, *, steps: int | None = None, epochs: int | None = None, lr: float,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, teacher: nn.Module | None = None,
        params: Iterable[nn.Parameter] | None = None, seed: int = 0, progress: bool = True,
        weight_decay: float = 0.0, max_grad_norm: float | None = None,
        schedule: Literal["linear", "cosine", "constant"] = "linear", lr_end: float = 0.0,
        augment: Augment | None = None, label: str = "training",
        monitor: Callable[[int, nn.Module], None] | None = None, dropout: bool = True) -> FitReport:
    """Train `model` in place with AdamW over `data` (batches cycled, reshuffled every pass).

    Every family that trains calls this: healing after low-rank/MPO/pruning, adapter training,
    training a new model (ESPCN, factorized convs from scratch).

    Args:
        model: trained in place; its train/eval mode is restored at the end.
        data: keyword batches for `model(**batch)`, with targets, or without them and a teacher.
        steps, epochs: length of the run; exactly one (epochs = passes over data.batches).
        lr: peak learning rate.
        loss: loss(output, target) -> scalar; default `task_loss` (cross-entropy for integer
            targets, MSE for float targets).
        teacher: used when data has no targets: its outputs (eval mode, no grad) on each batch,
            after augmentation, are the targets (distillation toward the original model).
        params: the parameters to train (default: every parameter of model that requires grad).
        seed: batch order, augmentation and the model's own randomness (dropout) come from a forked
            RNG seeded with it; the caller's global RNG state is left as it was.
        progress: show progress with the current loss (edgeslim.core.progress).
        weight_decay, max_grad_norm: AdamW decoupled weight decay, gradient clipping (None: off).
        schedule, lr_end: learning-rate decay from lr to lr_end over the run ("constant": none).
        augment: augment(batch, target, generator) -> (batch, target), applied to every batch.
        label: what the progress bar and error messages call this run.
        monitor: monitor(steps_done, model) after every step (e.g. a learning curve on held-out
            data); it must leave the model as it found it.
        dropout: False trains with every dropout layer's p at 0 (restored after): distilling toward
            an original that runs without dropout (measured on the demo's MiniLM, 40 healing steps:
            cosine 0.900 with dropout, 0.903 without; bench/demo_ceiling.py).

    Returns:
        FitReport with the loss of every step.

    Raises:
        ConfigError: no targets and no teacher, bad steps/epochs/lr, or targets that do not fit.
        SourceError: a batch, the loss or the gradient is NaN/Inf (step and batch named).
    """
    if (steps is None) == (epochs is None):
        raise ConfigError(f"{label}: give steps or epochs (one of them), got steps={steps}, epochs={epochs}")
    total = steps if steps is not None else epochs * len(data.batches)
    if total < 1 or not lr > 0:
        raise ConfigError(f"{label} needs steps (or epochs) >= 1 and lr > 0, got steps={steps}, epochs={epochs}, lr={lr}")
    if data.targets is None and teacher is None:
        raise ConfigError(f"{label} needs targets: '{data.name}' has none; pass teacher=<the original model> "
                          "to distil toward it")
    loss = loss or task_loss
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total, eta_min=lr_end)
    else:
        end = 1.0 if schedule == "constant" else lr_end / lr
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - (1.0 - end) * s / total)
    report, order = FitReport(total), []
    modes = [(m, m.training) for m in (model, teacher) if m is not None]
    # p read by the layers and by attention kernels that take the rate from them (transformers' SDPA path)
    rates = {} if dropout else {m: m.p for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)}
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        if teacher is not None:
            teacher.eval()
        try:
            for m in rates:
                m.p = 0.0
            with bar(f"{label} on {data.name}", total, progress) as shown:
                for step in range(total):
                    if not order:
                        order = torch.randperm(len(data.batches), generator=gen).tolist()
                    i = order.pop()
                    where = f"{label} step {step}, batch {i} of '{data.name}'"
                    batch, target = data.batches[i], None if data.targets is None else data.targets[i]
                    if augment is not None:
                        batch, target = augment(batch, target, gen)
                    if target is None:
                        with torch.no_grad():
                            target = teacher(**batch).detach()
                    check_finite({**batch, "target": target}, where)
                    value = loss(model(**batch), target)
                    check_finite({"loss": value}, where)
                    opt.zero_grad(set_to_none=True)
                    value.backward()
                    if max_grad_norm is not None:
                        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                        check_finite({"gradient norm": norm}, where)
                    opt.step()
                    sched.step()
                    report.losses.append(float(value.detach()))
                    shown.note(f"loss {report.losses[-1]:.4g}")
                    shown.advance()
                    if monitor is not None:
                        monitor(step + 1, model)
        finally:
            for m, was_training in modes:
                m.train(was_training)
            for m, p in rates.items():
                m.p = p
    return report


def heal(model: nn.Module, data: CalibData, steps: int = 200, lr: float = 5e-5, weight_decay: float = 0.01,
         max_grad_norm: float = 1.0, seed: int = 0, progress: bool = True,
         teacher: nn.Module | None = None,
         loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, dropout: bool = True) -> FitReport:
    """Fine-tune a compressed `model` in place: `fit` with AdamW, linear decay to 0, gradient clipping.

    Without targets in `data`, pass the original model as `teacher` to distil toward it (`loss`:
    e.g. `logit_kl` for logits; default `task_loss`).
    """
    return fit(model, data, steps=steps, lr=lr, teacher=teacher, seed=seed, progress=progress, loss=loss,
               weight_decay=weight_decay, max_grad_norm=max_grad_norm, label="healing", dropout=dropout)


@dataclass(frozen=True)
class HealingConfig(ConfigBase):
    """Healing inside a compression step (mpo, prune), declared once: the `heal` loop above, run for
    `heal_steps` after the structure changed, on the step's calibration data (distilled toward the
    original model's outputs when the data has no targets). A recipe may as well add a `heal` step."""

    heal_steps: int = 0  # AdamW steps of healing after compression (0: none)
    heal_lr: float = 1e-4  # peak learning rate of the healing

    def validate(self) -> None:
        super().validate()
        if self.heal_steps < 0:
            raise ConfigError(f"heal_steps must be an integer >= 0, got {self.heal_steps!r}")
        if not self.heal_lr > 0:
            raise ConfigError(f"heal_lr must be > 0, got {self.heal_lr}")

    def healing_data(self, model: nn.Module, calib: CalibData | None) -> CalibData | None:
        """What healing will train on, taken from the ORIGINAL `model` (call it before compressing):
        `calib`, or its batches with the model's outputs as targets when it has none; None without healing.

        Raises:
            ConfigError: heal_steps without calibration data.
        """
        if not self.heal_steps:
            return None
        if calib is None:
            raise ConfigError("heal_steps needs calibration data (calib = ...) to heal on")
        return calib if calib.targets is not None else teacher_targets(model, calib)

    def heal(self, model: nn.Module, data: CalibData | None) -> FitReport | None:
        """Heal `model` in place on `healing_data`'s result (nothing when that is None)."""
        return None if data is None else heal(model, data, self.heal_steps, self.heal_lr)


@dataclass(frozen=True)
class HealConfig(ConfigBase):
    """Settings of the `heal` step."""

    steps: int = 200  # AdamW steps
    lr: float = 5e-5  # peak learning rate, decayed linearly to 0
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    seed: int = 0  # order of the batches
    dropout: bool = True  # False: every dropout rate at 0 while healing (fit's `dropout`)

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"heal steps must be a positive integer, got {self.steps!r}")
        if not self.lr > 0:
            raise ConfigError(f"heal lr must be > 0, got {self.lr}")


@register
class Heal(Compressor):
    """A recipe step that fine-tunes the current model; it changes no structure, so replay is a no-op."""

    name = "heal"
    Config = HealConfig
    kind = "training"
    needs_calibration = True
    distils = True

    def compress(self, model: nn.Module, config: HealConfig, calib: CalibData | None = None,
                 inplace: bool = False, context: CompressContext | None = None) -> CompressResult:
        config = self.make_config(config)
        if calib is None:
            raise ConfigError("'heal' needs training data (calib = ...): with targets, or distilled from the "
                              "original model (the pipeline does that; in Python use teacher_targets)")
        model = working_copy(model, inplace)
        report = heal(model, calib, config.steps, config.lr, config.weight_decay, config.max_grad_norm, config.seed,
                      dropout=config.dropout)
        return self.result(model, config, [], {"steps": report.steps, "final_loss": report.final_loss})

    def replay(self, model: nn.Module, resolved: Mapping[str, Any], inputs: Sequence[TensorSpec]) -> nn.Module:
        return model
