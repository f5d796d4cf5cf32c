"""The one statistics collector: Fisher equals summed squared batch gradients, moments equal X^T X and
(J^T e)(J^T e)^T, several statistics come from the fewest passes, errors name the batch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.compress.base import StatsRequest
from edgeslim.compress.statistics import collect_stats
from edgeslim.core.errors import ConfigError, SourceError

torch.set_num_threads(1)


class TokenNet(nn.Module):
    """Token features (B, T, 8) -> q and k read the same tensor -> mean over valid tokens -> 3 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(8, 6), nn.Linear(8, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.q(x)) * torch.sigmoid(self.k(x))
        m = attention_mask.unsqueeze(-1).float()
        return self.out((h * m).sum(1) / m.sum(1))


def make(n_batches: int = 3, targets: bool = True, seed: int = 0) -> tuple[TokenNet, CalibData]:
    torch.manual_seed(seed)
    model = TokenNet().eval()
    batches, labels = [], []
    for _ in range(n_batches):
        mask = torch.ones(4, 5, dtype=torch.long)
        mask[:, 3:] = torch.randint(0, 2, (4, 2))
        batches.append({"x": torch.randn(4, 5, 8), "attention_mask": mask})
        labels.append(torch.randint(0, 3, (4,)))
    return model, CalibData("toy", batches, labels if targets else None)


def test_fisher_is_mean_of_squared_per_sample_gradients():
    model, calib = make()
    stats = collect_stats(model, calib, ["q", "out"], StatsRequest(input_moments=True, fisher=True), progress=False)
    expected = {n: torch.zeros_like(model.get_submodule(n).weight) for n in ("q", "out")}
    batch_grad_sq = {n: torch.zeros_like(v) for n, v in expected.items()}
    samples = 0
    for _, batch, target in calib:
        for j in range(len(target)):  # one sample at a time: dL(d_j)/dW
            model.zero_grad()
            F.cross_entropy(model(**{k: v[j:j + 1] for k, v in batch.items()}), target[j:j + 1]).backward()
            for n in expected:
                expected[n] += model.get_submodule(n).weight.grad.square()
            samples += 1
        model.zero_grad()
        F.cross_entropy(model(**batch), target).backward()
        for n in expected:
            batch_grad_sq[n] += model.get_submodule(n).weight.grad.square()
    for n in expected:
        torch.testing.assert_close(stats.fisher[n], expected[n] / samples, rtol=1e-5, atol=1e-10)
        assert stats.fisher[n].shape == model.get_submodule(n).weight.shape
        # the squared batch-mean gradient is not the Fisher: per-sample gradients cancel in the mean
        assert not torch.allclose(stats.fisher[n], batch_grad_sq[n] / samples, rtol=0.1)
        assert float(stats.fisher[n].sum()) > float(batch_grad_sq[n].sum()) / samples
    assert stats.batches == 3 and stats.samples == 12


def test_distillation_fisher_is_the_gauss_newton_diagonal():
    # y = W x with MSE to y + noise: dL/dW_kj = -(2/D) eps_k x_j, so E[I_kj] = (4/D^2) E[x_j^2]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    scale = torch.tensor([0.5, 1.0, 2.0])
    signs = [torch.randint(0, 2, (500, 3)) * 2.0 - 1.0 for _ in range(8)]  # x_j^2 fixed: only the noise varies
    calib = CalibData("gn", [{"input": s * scale} for s in signs])

    class Call(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, input):
            return self.net(input)

    stats = collect_stats(Call(), calib, ["net.0"], StatsRequest(fisher=True), progress=False)
    x2 = torch.cat([b["input"] for b in calib.batches]).square().mean(0)
    torch.testing.assert_close(stats.fisher["net.0"], (4 / 2 ** 2) * x2.expand(2, 3), rtol=0.1, atol=0)


def test_activation_moments_skip_padding_and_share_inputs():
    model, calib = make()
    stats = collect_stats(model, calib, ["q", "k", "out"], StatsRequest(input_moments=True), progress=False)
    rows = torch.cat([b["x"][b["attention_mask"].bool()] for b in calib.batches]).double()
    torch.testing.assert_close(stats.second_moment("q"), rows.T @ rows / len(rows), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.mean_abs("q"), rows.abs().mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.second_moment("k"), stats.second_moment("q"), rtol=0, atol=0)
    assert stats.rows["q"] == len(rows) and stats.second_moment("out").shape == (6, 6)
    assert stats.fisher == {}


def test_memory_does_not_grow_with_samples():
    model, small = make(n_batches=2)
    _, large = make(n_batches=8)
    a = collect_stats(model, small, ["q", "out"], StatsRequest(input_moments=True, fisher=True), progress=False)
    b = collect_stats(model, large, ["q", "out"], StatsRequest(input_moments=True, fisher=True), progress=False)
    for field in ("fisher", "xtx", "abs_sum"):
        assert {k: v.shape for k, v in getattr(a, field).items()} == {k: v.shape for k, v in getattr(b, field).items()}


def test_distillation_fisher_without_targets():
    model, calib = make(targets=False)
    first = collect_stats(model, calib, ["q"], StatsRequest(fisher=True, seed=3), progress=False)
    again = collect_stats(model, calib, ["q"], StatsRequest(fisher=True, seed=3), progress=False)
    assert float(first.fisher["q"].sum()) > 0.0  # the noise target gives the Gauss-Newton diagonal, not 0
    torch.testing.assert_close(first.fisher["q"], again.fisher["q"], rtol=0, atol=0)


def test_model_is_left_as_it_was():
    model, calib = make()
    model.train()
    model.out.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    collect_stats(model, calib, ["q", "out"], StatsRequest(input_moments=True, fisher=True), progress=False)
    assert model.training and not model.out.weight.requires_grad and model.q.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.q._forward_pre_hooks


@pytest.mark.parametrize("where, value, expected", [("x", float("nan"), "batch 2 of 'toy'.*'x'"),
                                                    ("x", float("inf"), "batch 2 of 'toy'.*'x'"),
                                                    ("weight", float("nan"), "batch 0 of 'toy'.*model output")])
def test_non_finite_data_or_model_is_named(where, value, expected):
    model, calib = make()
    if where == "x":
        calib.batches[2]["x"][0, 0, 0] = value
    else:
        with torch.no_grad():
            model.out.weight[0, 0] = value
    with pytest.raises(SourceError, match=expected):
        collect_stats(model, calib, ["q"], StatsRequest(input_moments=True, fisher=True), progress=False)


def test_non_finite_target_or_gradient_is_named():
    model, calib = make()
    bad = CalibData("toy", calib.batches, [torch.full((4, 3), float("inf"))] * 3)
    with pytest.raises(SourceError, match="batch 0 of 'toy'.*target"):
        collect_stats(model, bad, ["q"], StatsRequest(input_moments=True, fisher=True), progress=False)
    model.q.weight.register_hook(lambda grad: grad * float("nan"))  # finite output, NaN gradient
    with pytest.raises(SourceError, match="batch 0 of 'toy'.*gradient of q.weight"):
        collect_stats(model, calib, ["q"], StatsRequest(input_moments=True, fisher=True), progress=False)


def test_only_linears_can_be_calibrated():
    model, calib = make()
    model.q = nn.Sequential(nn.Linear(8, 6))
    with pytest.raises(ConfigError, match="'q' is a Sequential"):
        collect_stats(model, calib, ["q"], StatsRequest(input_moments=True, fisher=True), progress=False)


def test_label_free_fisher_ignores_the_targets():
    model, with_targets = make()
    _, without = make(targets=False)
    free = collect_stats(model, with_targets, ["q", "out"], StatsRequest(fisher=True, fisher_loss="output", seed=2), progress=False)
    none = collect_stats(model, without, ["q", "out"], StatsRequest(fisher=True, seed=2), progress=False)
    task = collect_stats(model, with_targets, ["q", "out"], StatsRequest(fisher=True, seed=2), progress=False)
    for name in ("q", "out"):
        torch.testing.assert_close(free.fisher[name], none.fisher[name], rtol=0, atol=0)
        assert not torch.allclose(free.fisher[name], task.fisher[name])


class PerToken(nn.Module):
    """Per-token output (B, T, 3) of two linear maps: the output's Jacobian at b's output is c.weight."""

    def __init__(self) -> None:
        super().__init__()
        self.b, self.c = nn.Linear(8, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(x))


def test_output_gradient_moments_are_the_gauss_newton_of_the_output():
    # g = J^T e at each layer's output for random signs e; per sample, summed over valid tokens
    _, calib = make()
    torch.manual_seed(0)
    model = PerToken().eval()
    stats = collect_stats(model, calib, ["b", "c"], StatsRequest(input_moments=True, output_gradients=True, draws=3, seed=5), progress=False)
    generator = torch.Generator().manual_seed(5)
    expected = {"b": torch.zeros(5, 5, dtype=torch.float64), "c": torch.zeros(3, 3, dtype=torch.float64)}
    for batch in calib.batches:
        keep = batch["attention_mask"].bool()
        for _ in range(3):
            signs = torch.randint(0, 2, (4, 5, 3), generator=generator).float() * 2 - 1
            for name, g in (("c", signs), ("b", signs @ model.c.weight.detach())):
                rows = g[keep].double()
                expected[name] += rows.T @ rows
    assert stats.probes == 3 * 12 and stats.samples == 0  # no Fisher asked
    tokens = sum(int(b["attention_mask"].sum()) for b in calib.batches)
    for name in ("b", "c"):
        torch.testing.assert_close(stats.gradient_moment(name), expected[name] / 36, rtol=1e-5, atol=1e-6)
    # at the output itself e^2 = 1: the diagonal is the valid tokens per sample, whatever the draws
    torch.testing.assert_close(stats.gradient_moment("c").diagonal(), torch.full((3,), tokens / 12, dtype=torch.float64))
    rows = torch.cat([b["x"][b["attention_mask"].bool()] for b in calib.batches]).double()
    torch.testing.assert_close(stats.second_moment("b"), rows.T @ rows / len(rows), rtol=1e-5, atol=1e-7)  # same pass
    assert stats.fisher == {} and not model.b._forward_hooks and not model.b._forward_pre_hooks


def test_every_statistic_at_once_equals_each_alone():
    # the Fisher and the output gradients take a pass each; the input moments ride along the first
    model, calib = make()
    names = ["q", "out"]
    both = collect_stats(model, calib, names, StatsRequest(input_moments=True, output_gradients=True, fisher=True,
                                                           seed=4), progress=False)
    fisher = collect_stats(model, calib, names, StatsRequest(fisher=True, seed=4), progress=False)
    rest = collect_stats(model, calib, names, StatsRequest(input_moments=True, output_gradients=True, seed=4),
                         progress=False)
    assert both.samples == fisher.samples == 12 and both.probes == rest.probes == 12 and both.batches == 3
    for name in names:
        torch.testing.assert_close(both.fisher[name], fisher.fisher[name])  # "task" loss: no noise drawn
        torch.testing.assert_close(both.gradient_moment(name), rest.gradient_moment(name))
        torch.testing.assert_close(both.second_moment(name), rest.second_moment(name))  # counted once
        assert both.rows[name] == rest.rows[name]


def test_fisher_loss_is_decided_in_one_place():
    from edgeslim.compress.statistics import fisher_loss
    _, labels = make()  # one class label per sample
    per_token = CalibData("tokens", labels.batches, [torch.zeros(4, 5, dtype=torch.long)] * 3)
    free = CalibData("free", labels.batches)
    assert fisher_loss(StatsRequest(fisher=True, fisher_loss="auto"), labels) == "output"
    assert fisher_loss(StatsRequest(fisher=True, fisher_loss="auto"), per_token) == "task"
    assert fisher_loss(StatsRequest(fisher=True), free) == "output"  # "task" without targets: label-free
    assert fisher_loss(StatsRequest(fisher=True, fisher_loss="output"), labels) == "output"


def test_output_gradient_errors():
    model, calib = make()
    with pytest.raises(ConfigError, match="draws"):
        StatsRequest(output_gradients=True, draws=0)
    model.unused = nn.Linear(8, 2)
    stats = collect_stats(model, calib, ["q", "unused"], StatsRequest(input_moments=True, output_gradients=True), progress=False)
    assert stats.gradient_moment("q").shape == (6, 6)
    with pytest.raises(ConfigError, match="'unused'.*no gradient"):
        stats.gradient_moment("unused")


def test_layer_inputs_come_one_layer_at_a_time_from_the_model_as_it_is_then():
    from edgeslim.compress.statistics import layer_inputs
    _, calib = make()
    torch.manual_seed(0)
    model = PerToken().eval()
    seen = []
    model.c.register_forward_pre_hook(lambda _m, _a: seen.append("c"))
    it = layer_inputs(model, calib, ["b", "c"])
    name, xs = next(it)
    assert name == "b" and [x.shape for x in xs] == [(4, 5, 8)] * 3 and seen == []  # the pass stopped at b
    assert all(torch.equal(x, batch["x"]) for x, batch in zip(xs, calib.batches))
    with torch.no_grad():  # the caller changes b (GPTQ: quantizes it) before asking for c's inputs
        model.b.weight.zero_()
    name, xs = next(it)
    assert name == "c" and all(torch.equal(x, model.b.bias.detach().expand(4, 5, 5)) for x in xs)
    assert not model.b._forward_pre_hooks and not model.c.training
    model.unused = nn.Linear(8, 2)
    with pytest.raises(ConfigError, match="never reaches 'unused'"):
        list(layer_inputs(model, calib, ["unused"]))

