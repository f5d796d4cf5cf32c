"""Healing loop and the `heal` step: it learns, distils, names bad batches, and replays as a no-op."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.compress.svd import SVD
from edgeslim.compress.train import Heal, HealConfig, fit, heal, task_loss, teacher_targets
from edgeslim.core.errors import ConfigError, SourceError

torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, 32), nn.Linear(32, 3)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def blobs(n_batches: int = 6, seed: int = 0) -> CalibData:
    """Three separable Gaussian classes."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 10, generator=g) * 3
    labels = [torch.randint(0, 3, (32,), generator=g) for _ in range(n_batches)]
    return CalibData("blobs", [{"x": centres[y] + torch.randn(32, 10, generator=g)} for y in labels], labels)


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def mean_loss(model: nn.Module, data: CalibData) -> float:
    with torch.no_grad():
        return sum(float(task_loss(model(**b), t)) for _, b, t in data) / len(data.batches)


def test_task_loss_forms():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert float(task_loss(logits, torch.tensor([0, 1]))) < float(task_loss(logits, torch.tensor([1, 0])))
    assert float(task_loss(logits, logits.clone())) == 0.0
    with pytest.raises(ConfigError, match="do not fit"):
        task_loss(logits, torch.tensor([0, 1, 1]))
    with pytest.raises(ConfigError, match="do not fit"):
        task_loss(logits, torch.zeros(2, 3))


def test_heal_learns_the_task_and_leaves_eval_mode():
    model, data = net(), blobs()
    before = mean_loss(model, data)
    report = heal(model, data, steps=60, lr=1e-2, progress=False)
    assert len(report.losses) == 60 and report.final_loss < report.losses[0]
    assert mean_loss(model, data) < 0.3 * before
    assert not model.training


def test_heal_by_distillation_recovers_a_compressed_model():
    teacher, data = net(), blobs()
    heal(teacher, data, steps=60, lr=1e-2, progress=False)  # a teacher worth copying
    distil = teacher_targets(teacher, data)
    assert torch.is_floating_point(distil.targets[0]) and distil.targets[0].shape == (32, 3)
    student = SVD().compress(teacher, {"rank": 2, "target": ["fc1"]}).model
    gap = mean_loss(student, distil)
    heal(student, distil, steps=80, lr=5e-3, progress=False)
    assert mean_loss(student, distil) < 0.5 * gap


def test_heal_errors():
    model, data = net(), blobs()
    with pytest.raises(ConfigError, match="teacher="):
        heal(model, CalibData("raw", data.batches), steps=2, progress=False)
    with pytest.raises(ConfigError, match="steps"):
        heal(model, data, steps=0, progress=False)
    data.batches[4]["x"][3, 2] = float("nan")
    with pytest.raises(SourceError, match=r"batch 4 of 'blobs'.*'x'"):
        heal(model, data, steps=12, progress=False)


def test_heal_step_is_a_registered_compressor_that_replays_as_no_op():
    assert Heal.name == "heal" and Heal.needs_calibration
    config = Heal().make_config({"steps": 20, "lr": 1e-2})
    assert isinstance(config, HealConfig) and config.to_dict()["steps"] == 20
    with pytest.raises(ConfigError, match="unknown key"):
        Heal().make_config({"step": 20})
    with pytest.raises(ConfigError, match="steps"):
        HealConfig(steps=0)
    with pytest.raises(ConfigError, match="needs training data"):
        Heal().compress(net(), config)
    model, data = net(), blobs()
    original = copy.deepcopy(model.state_dict())
    result = Heal().compress(model, config, data)
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())  # caller's model untouched
    assert result.changes == [] and result.resolved["steps"] == 20 and result.resolved["schema"] == Heal.schema
    assert mean_loss(result.model, data) < mean_loss(model, data)
    fresh = net(seed=5)
    assert Heal().replay(fresh, result.resolved, []) is fresh
    fresh.load_state_dict(result.model.state_dict())
    x = data.batches[0]["x"]
    torch.testing.assert_close(fresh(x), result.model(x), rtol=0, atol=0)


def test_fit_forks_the_rng_restores_modes_and_distils_toward_a_teacher():
    teacher, data = net(), blobs()
    heal(teacher, data, steps=60, lr=1e-2, progress=False)
    raw = CalibData("raw", data.batches)  # no targets: fit distils toward the teacher
    student = SVD().compress(teacher, {"rank": 2, "target": ["fc1"]}).model
    gap = mean_loss(student, teacher_targets(teacher, raw))
    twin = copy.deepcopy(student).train()
    student.train()
    state = torch.random.get_rng_state()
    report = fit(student, raw, epochs=10, lr=5e-3, teacher=teacher, seed=3, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert student.training and not teacher.training  # modes as they came in
    assert report.steps == len(report.losses) == 60  # 10 passes over 6 batches
    assert mean_loss(student.eval(), teacher_targets(teacher, raw)) < 0.5 * gap
    again = fit(twin, raw, epochs=10, lr=5e-3, teacher=teacher, seed=3, progress=False)
    assert again.losses == report.losses  # the seed alone decides the run (dropout included)
    with pytest.raises(ConfigError, match="steps or epochs"):
        fit(student, data, lr=1e-3)


def test_fit_without_dropout_trains_the_eval_model_and_restores_the_rates():
    # with dropout off each step's loss is the model's deterministic (eval) loss on that batch
    model, data = net(), blobs(n_batches=1)
    model.drop.p = 0.5
    on = fit(copy.deepcopy(model), data, steps=1, lr=1e-9, progress=False)
    before = mean_loss(model.eval(), data)
    off = fit(model, data, steps=1, lr=1e-9, progress=False, dropout=False)
    assert off.losses[0] == pytest.approx(before, rel=1e-6) and on.losses[0] != pytest.approx(before, rel=1e-3)
    assert model.drop.p == 0.5
    assert HealConfig(dropout=False).dropout is False
