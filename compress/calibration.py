"""Calibration statistics of targeted linear maps (nn.Linear, GPT-2's Conv1D): empirical Fisher,
input-activation moments and output-gradient moments.

Batches stream through the model once (one sample at a time for the per-sample Fisher); memory is
O(weights): one Fisher accumulator per targeted weight, one n x n second-moment matrix per targeted
input width and one m x m per targeted output, never the samples themselves or their gradients.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from rich.progress import Progress
from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.compress.replace import linear_view
from edgeslim.compress.train import check_finite, task_loss
from edgeslim.core.errors import ConfigError


@dataclass
class CalibStats:
    """Accumulated statistics, keyed by module name."""

    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # mean over samples of per-sample grad(W)^2, m x n
    xtx: dict[str, torch.Tensor] = field(default_factory=dict)  # sum of x x^T over input rows, float64
    abs_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # sum of |x| per input feature
    ggt: dict[str, torch.Tensor] = field(default_factory=dict)  # sum of g g^T over output rows (g: output gradient), float64
    rows: dict[str, int] = field(default_factory=dict)  # number of input rows seen per layer
    batches: int = 0
    samples: int = 0  # samples the Fisher (or the gradient moments) were averaged over
    fisher_loss: str | None = None  # the Fisher's loss: "task" (calibration targets) or "output" (Gauss-Newton)

    def second_moment(self, name: str) -> torch.Tensor:
        """E[x x^T] of the layer's inputs (n x n, float64)."""
        return self.xtx[name] / max(self.rows[name], 1)

    def gradient_moment(self, name: str) -> torch.Tensor:
        """Per-sample sum over the layer's output rows of g g^T (m x m, float64): with the input's E[x x^T],
        the Kronecker factors of the output's Gauss-Newton matrix (K-FAC), so that half the expected
        squared change of the model's output from a change dW of the weight is about
        0.5 tr(dW^T G dW E[x x^T]).

        Raises:
            ConfigError: no gradient reached the layer (its output does not affect the model's).
        """
        if name not in self.ggt:
            raise ConfigError(f"'{name}': no gradient of the model's output reached this layer on the calibration "
                              "data (its output is not used); exclude it from the target")
        return self.ggt[name] / max(self.samples, 1)

    def mean_abs(self, name: str) -> torch.Tensor:
        """E|x| per input feature of the layer."""
        return self.abs_sum[name] / max(self.rows[name], 1)


def _token_rows(x: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The layer input as rows (-1, n), without padded positions when the batch has an attention mask."""
    mask = batch.get("attention_mask")
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def _samples(batch: dict[str, torch.Tensor], target: torch.Tensor | None
             ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
    """The batch one sample at a time (leading dimension kept, size 1), with its target."""
    size = len(next(iter(batch.values())))
    for j in range(size):
        yield {k: v[j:j + 1] for k, v in batch.items()}, None if target is None else target[j:j + 1]


def collect_stats(model: nn.Module, calib: CalibData, names: list[str], fisher: bool = True,
                  activations: bool = True, progress: bool = True, seed: int = 0, labels: bool = True,
                  gradients: bool = False, draws: int = 1) -> CalibStats:
    """Empirical Fisher of each named linear map's weight, second moments of its input and of the
    gradient at its output.

    The Fisher is the mean over samples of the squared PER-SAMPLE gradient of the loss,
    I_w = 1/|D| sum_i (dL(d_i)/dw)^2 (Hsu et al., ICLR 2022, eq. 3): each sample is run and
    differentiated on its own (micro-batches of one), so the gradients of different samples do not
    cancel as they do in a batch-mean gradient, which vanishes when the model fits its data. Memory
    stays O(weights): one accumulator per targeted weight. The loss is the task loss when
    calib.targets is given (cross-entropy on logits for integer targets, MSE for float targets).
    Without targets it is distillation against the model's own outputs: as the residual of MSE to the
    unchanged model is zero, the target is the original output plus unit Gaussian noise drawn per
    sample, whose squared gradient is in expectation the Gauss-Newton diagonal diag(J_i^T J_i), the
    Fisher of the Gaussian output model (Kunstner et al., 2019, Sec. 3). `labels=False` takes that
    label-free estimate also when targets are given: the empirical Fisher weights each sample by its
    squared residual, so on a model that fits its data a few misfit samples carry nearly all of it
    (bench/fwsvd_why.py: 5% of the BBC News articles carry 99.9%), while the Gauss-Newton diagonal
    weighs every sample by its Jacobian alone.

    The output-gradient moments (`gradients`, with `fisher` off) come from whole batches: each batch's
    output is back-propagated `draws` times with random signs e (Rademacher, one per output element:
    E[e e^T] = I with the least variance), so the gradient g = J^T e at a layer's output has
    E[g g^T] = J^T J, the Gauss-Newton matrix of the model's output at that layer (label-free; samples
    do not interact, so a batch gives every sample's own gradient).

    Args:
        model: the model to calibrate (not modified; called as model(**batch) -> Tensor).
        calib: batches (and optional targets); every input and target has the samples on dim 0.
        names: dotted names of the linear maps (nn.Linear, Conv1D) to collect for; the Fisher is kept in
            the m x n layout of linear_view whatever the module's own layout.
        fisher, activations, gradients: which statistics to collect (gradients: not with fisher).
        labels: use calib.targets for the Fisher's loss (False: the distillation loss above).
        progress: show a progress bar.
        seed: seed of the distillation noise and of the gradient probes.
        draws: random probes per sample for the output-gradient moments.

    Raises:
        ConfigError: a name is not a linear map of the model, fisher and gradients both asked, or draws < 1.
        SourceError: a batch, target, output or gradient holds NaN/Inf (the batch index is named).
    """
    if fisher and gradients:
        raise ConfigError("calibration: the per-sample Fisher and the output-gradient moments are collected in "
                          "separate passes; ask for one of them")
    if draws < 1:
        raise ConfigError(f"calibration: draws must be a positive integer, got {draws}")
    modules: dict[str, nn.Module] = {}
    transposed: dict[str, bool] = {}
    for name in names:
        module = model.get_submodule(name)
        try:
            transposed[name] = linear_view(module).kind == "conv1d"
        except ConfigError as exc:
            raise ConfigError(f"calibration: '{name}' is a {type(module).__name__}, expected a linear map "
                              "(nn.Linear or transformers Conv1D)") from exc
        modules[name] = module
    stats = CalibStats()
    current: dict[str, torch.Tensor] = {}  # the inputs being run (their attention mask)
    shared: dict[int, tuple] = {}  # per-call moments by input tensor id (tensor kept alive)
    place = [""]  # the batch being run, for error messages

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

    def output_hook_for(name: str):
        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            if not out.requires_grad:  # the first targeted layers: the gradients start at their outputs
                out = out.detach().requires_grad_(True)
            feeds, where = dict(current), place[0]  # the batch this output belongs to

            def grad_hook(grad: torch.Tensor) -> None:
                rows = _token_rows(grad.detach(), feeds).float()
                check_finite({f"output gradient of {name}": rows}, where)
                stats.ggt[name] = stats.ggt.get(name, 0) + (rows.T @ rows).double()
            out.register_hook(grad_hook)
            return out
        return hook

    def run(feeds: dict[str, torch.Tensor], where: str) -> torch.Tensor:
        current.clear()
        current.update(feeds)
        place[0] = where
        shared.clear()
        out = model(**feeds)
        check_finite({"model output": out}, where)
        return out

    handles = [mod.register_forward_pre_hook(hook_for(n)) for n, mod in modules.items()] if activations else []
    handles += [mod.register_forward_hook(output_hook_for(n)) for n, mod in modules.items()] if gradients else []
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    generator = torch.Generator().manual_seed(seed)
    weights = [mod.weight for mod in modules.values()]
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        if fisher:
            for name, mod in modules.items():
                mod.weight.requires_grad_(True)
                stats.fisher[name] = torch.zeros_like(linear_view(mod).weight, dtype=torch.float32)
        with Progress(transient=True, disable=not progress) as bar:
            task = bar.add_task(f"calibrating on {calib.name}", total=len(calib.batches))
            for i, batch, target in calib:
                where = f"calibration batch {i} of '{calib.name}'"
                check_finite(batch, where)
                if target is not None:
                    check_finite({"target": target}, where)
                if gradients:
                    with torch.enable_grad():
                        out = run(batch, where)
                        for draw in range(draws if out.requires_grad else 0):  # else no targeted layer reaches it
                            signs = torch.randint(0, 2, out.shape, generator=generator).to(out) * 2 - 1
                            out.backward(signs, retain_graph=draw < draws - 1)
                    stats.samples += draws * len(next(iter(batch.values())))
                elif not fisher:
                    with torch.no_grad():
                        run(batch, where)
                samples = _samples(batch, target if labels else None) if fisher else ()
                for j, (feeds, sample_target) in enumerate(samples):
                    out = run(feeds, where)
                    if sample_target is None:
                        sample_target = out.detach() + torch.randn(out.shape, generator=generator).to(out)
                    grads = torch.autograd.grad(task_loss(out, sample_target), weights)
                    for (name, mod), grad in zip(modules.items(), grads):
                        check_finite({f"gradient of {name}.weight (sample {j})": grad}, where)
                        grad = grad.detach().float()
                        stats.fisher[name] += (grad.T if transposed[name] else grad).square()
                    stats.samples += 1
                stats.batches += 1
                bar.advance(task)
        for name in stats.fisher:
            stats.fisher[name] /= max(stats.samples, 1)
        if fisher:
            stats.fisher_loss = "task" if labels and calib.targets is not None else "output"
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return stats
