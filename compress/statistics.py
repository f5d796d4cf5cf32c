"""The one collector of calibration statistics of targeted linear maps (nn.Linear, GPT-2's Conv1D):
empirical Fisher, input-activation moments and output-gradient moments, as a family declares them
(`StatsRequest`, from `Compressor.statistics(config)`); and each layer's inputs one layer at a time.

Batches stream through the model once per kind of gradient asked (one sample at a time for the
per-sample Fisher, whole batches for the output gradients, a plain forward when none is); the input
moments ride along the first of those passes. Memory is
O(weights): one Fisher accumulator per targeted weight, one n x n second-moment matrix per targeted
input width and one m x m per targeted output, never the samples themselves or their gradients.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import torch
from torch import nn

from edgeslim.compress.base import StatsRequest
from edgeslim.compress.replace import linear_view
from edgeslim.core.calib import CalibData
from edgeslim.compress.train import check_finite, task_loss
from edgeslim.core.errors import ConfigError
from edgeslim.core.progress import bar


@dataclass
class CalibStats:
    """Accumulated statistics, keyed by module name."""

    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # mean over samples of per-sample grad(W)^2, m x n
    xtx: dict[str, torch.Tensor] = field(default_factory=dict)  # sum of x x^T over input rows, float64
    abs_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # sum of |x| per input feature
    ggt: dict[str, torch.Tensor] = field(default_factory=dict)  # sum of g g^T over output rows (g: output gradient), float64
    rows: dict[str, int] = field(default_factory=dict)  # number of input rows seen per layer
    batches: int = 0
    samples: int = 0  # samples the Fisher was averaged over
    probes: int = 0  # samples times draws the gradient moments were averaged over
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
        return self.ggt[name] / max(self.probes, 1)

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


def fisher_loss(request: StatsRequest, calib: CalibData) -> Literal["task", "output"]:
    """The loss the Fisher is taken of, decided here once: "auto" is "task" when every target holds many
    losses per sample (next tokens, pixels), else "output" (measured: MiniLM classifier with one label
    per article "output"; SmolLM2 "task"); "task" without targets is the label-free "output"."""
    if request.fisher_loss == "auto":
        many = calib.targets is not None and all(t.dim() > 1 and t[0].numel() > 1 for t in calib.targets)
        return "task" if many else "output"
    return "task" if request.fisher_loss == "task" and calib.targets is not None else "output"


def collect_stats(model: nn.Module, calib: CalibData, names: list[str], request: StatsRequest,
                  progress: bool = True) -> CalibStats:
    """The statistics `request` asks for, of each named linear map: empirical Fisher of its weight,
    second moments of its input and of the gradient at its output.

    The Fisher is the mean over samples of the squared PER-SAMPLE gradient of the loss,
    I_w = 1/|D| sum_i (dL(d_i)/dw)^2 (Hsu et al., ICLR 2022, eq. 3): each sample is run and
    differentiated on its own (micro-batches of one), so the gradients of different samples do not
    cancel as they do in a batch-mean gradient, which vanishes when the model fits its data. Memory
    stays O(weights): one accumulator per targeted weight. Its loss (`fisher_loss`) is the task loss
    of calib.targets ("task": cross-entropy on logits for integer targets, MSE for float targets), or
    ("output") distillation against the model's own outputs: as the residual of MSE to the unchanged
    model is zero, the target is the original output plus unit Gaussian noise drawn per sample, whose
    squared gradient is in expectation the Gauss-Newton diagonal diag(J_i^T J_i), the Fisher of the
    Gaussian output model (Kunstner et al., 2019, Sec. 3). The empirical Fisher weights each sample by
    its squared residual, so on a model that fits its data a few misfit samples carry nearly all of it
    (bench/fwsvd_why.py: 5% of the BBC News articles carry 99.9%), while the Gauss-Newton diagonal
    weighs every sample by its Jacobian alone.

    The output-gradient moments come from whole batches: each batch's output is back-propagated
    `draws` times with random signs e (Rademacher, one per output element: E[e e^T] = I with the
    least variance), so the gradient g = J^T e at a layer's output has E[g g^T] = J^T J, the
    Gauss-Newton matrix of the model's output at that layer (label-free; samples do not interact, so
    a batch gives every sample's own gradient). Asked with the Fisher, they take a pass of their own.

    Args:
        model: the model to calibrate (not modified; called as model(**batch) -> Tensor).
        calib: batches (and optional targets); every input and target has the samples on dim 0.
        names: dotted names of the linear maps (nn.Linear, Conv1D) to collect for; the Fisher is kept in
            the m x n layout of linear_view whatever the module's own layout.
        request: which statistics (a family's `statistics(config)`).
        progress: show a progress bar.

    Raises:
        ConfigError: a name is not a linear map of the model.
        SourceError: a batch, target, output or gradient holds NaN/Inf (the batch index is named).
    """
    fisher, gradients, draws = request.fisher, request.output_gradients, request.draws
    loss = fisher_loss(request, calib) if fisher else None
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
    passing = {"moments": False, "gradients": False}  # what the pass being run collects

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            if not passing["moments"]:
                return
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
        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if not passing["gradients"]:
                return None
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

    def run(feeds: dict[str, torch.Tensor], where: str, moments: bool, gradients: bool = False) -> torch.Tensor:
        passing.update(moments=moments and request.input_moments, gradients=gradients)
        current.clear()
        current.update(feeds)
        place[0] = where
        shared.clear()
        out = model(**feeds)
        check_finite({"model output": out}, where)
        return out

    handles = [mod.register_forward_pre_hook(hook_for(n)) for n, mod in modules.items()] if request.input_moments else []
    handles += [mod.register_forward_hook(output_hook_for(n)) for n, mod in modules.items()] if gradients else []
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    generator = torch.Generator().manual_seed(request.seed)
    weights = [mod.weight for mod in modules.values()]
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        if fisher:
            for name, mod in modules.items():
                mod.weight.requires_grad_(True)
                stats.fisher[name] = torch.zeros_like(linear_view(mod).weight, dtype=torch.float32)
        with bar(f"calibrating on {calib.name}", len(calib.batches), progress) as shown:
            for i, batch, target in calib:
                where = f"calibration batch {i} of '{calib.name}'"
                check_finite(batch, where)
                if target is not None:
                    check_finite({"target": target}, where)
                if gradients:  # the input moments ride along the first pass
                    with torch.enable_grad():
                        out = run(batch, where, moments=True, gradients=True)
                        for draw in range(draws if out.requires_grad else 0):  # else no targeted layer reaches it
                            signs = torch.randint(0, 2, out.shape, generator=generator).to(out) * 2 - 1
                            out.backward(signs, retain_graph=draw < draws - 1)
                    stats.probes += draws * len(next(iter(batch.values())))
                elif not fisher:
                    with torch.no_grad():
                        run(batch, where, moments=True)
                samples = _samples(batch, target if loss == "task" else None) if fisher else ()
                for j, (feeds, sample_target) in enumerate(samples):
                    out = run(feeds, where, moments=not gradients)
                    if sample_target is None:
                        sample_target = out.detach() + torch.randn(out.shape, generator=generator).to(out)
                    grads = torch.autograd.grad(task_loss(out, sample_target), weights)
                    for (name, mod), grad in zip(modules.items(), grads):
                        check_finite({f"gradient of {name}.weight (sample {j})": grad}, where)
                        grad = grad.detach().float()
                        stats.fisher[name] += (grad.T if transposed[name] else grad).square()
                    stats.samples += 1
                stats.batches += 1
                shown.advance()
        for name in stats.fisher:
            stats.fisher[name] /= max(stats.samples, 1)
        stats.fisher_loss = loss
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return stats


class _Reached(Exception):
    """Raised by the capture hook of `layer_inputs`: the rest of the forward pass is not needed."""


def layer_inputs(model: nn.Module, calib: CalibData, names: Sequence[str]
                 ) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """Each named layer's inputs on the calibration batches (one tensor per batch), one layer at a time.

    A layer's inputs are taken from the model as it is when that layer's turn comes, so a caller that
    replaces (quantizes) each layer before asking for the next gets what GPTQ's error feedback needs
    (Frantar et al., "GPTQ", ICLR 2023, Sec. 4: each layer is fitted to the inputs the already
    quantized layers before it produce). Each forward pass stops at the layer; a layer called twice
    in one pass gives its first call's input. Memory: one layer's inputs at a time.

    Raises:
        ConfigError: a layer the forward pass never reaches.
        SourceError: a batch holds NaN/Inf (the batch index is named).
    """
    was_training = model.training
    model.eval()
    try:
        for name in names:
            captured: list[torch.Tensor] = []

            def capture(_module: nn.Module, args: tuple) -> None:
                captured.append(args[0].detach())
                raise _Reached

            handle = model.get_submodule(name).register_forward_pre_hook(capture)
            try:
                with torch.no_grad():
                    for i, batch, _ in calib:
                        check_finite(batch, f"calibration batch {i} of '{calib.name}'")
                        try:
                            model(**batch)
                        except _Reached:
                            continue
                        raise ConfigError(f"calibration: the forward pass never reaches '{name}'")
            finally:
                handle.remove()
            yield name, captured
    finally:
        model.train(was_training)

