"""optimize under a time budget with slack: the per-op precision of an INT8 stage (which ops stay fp32), scored by
the task loss with each op alone fp32, costed by its share of the measured saving, allocated by the shared greedy,
and the chosen mix really compressed with those ops fp32."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.artifact import SourceSpec
from edgeslim.compress.sensitivity import mean_loss
from edgeslim.core.calib import CalibData
from edgeslim.core.specs import TensorSpec
from edgeslim.loaded import LoadedModel
from edgeslim.optimize_precision import PrecisionLayer
from edgeslim.optimize_search import Point, best_single, estimate, search
from edgeslim.optimize_space import Combo, Space, Stage

SPEC = [TensorSpec("x", ("batch", 3, 16, 16))]
INT8 = Stage("int8", "int8", {"method": "int8", "calib": "c"})


def ms_space(layers, int8_ms, dense_ms, loss):
    loaded = LoadedModel(nn.Linear(2, 2), SourceSpec("zoo", "test"), SPEC, "generic", {})
    int8 = Combo((INT8,), loaded, int8_ms, dense_ms, loss, precision=layers)
    return Space([Combo((), loaded, dense_ms, dense_ms), int8], dense_ms, {}, None, 1)


def test_the_slack_of_a_time_budget_keeps_the_most_loss_per_ms_fp32_and_beats_int8_alone():
    # INT8 alone: 4 ms against 10 fp32 (2.5x); its ops save 6 ms between them
    layers = [PrecisionLayer("a", 3.0, 0.0, 0.002), PrecisionLayer("b", 1.0, 0.0, 0.02),
              PrecisionLayer("c", 1.5, 0.0, 0.009), PrecisionLayer("d", 0.5, 0.0, -0.001)]
    sp = ms_space(layers, 4.0, 10.0, 0.03)
    e = estimate(sp.combos[1], sp, 10.0 / 6.5, "ms")  # 2.5 ms of slack: b (0.02/ms) then c (0.006/ms) fit
    assert e.fp32 == ("b", "c") and e.cost == pytest.approx(6.5) and e.loss == pytest.approx(0.03 - 0.029)
    e = estimate(sp.combos[1], sp, 10.0 / 6.4, "ms")  # 2.4 ms: c no longer fits, d loses nothing, a costs 3
    assert e.fp32 == ("b",) and e.cost == pytest.approx(5.0)
    assert sp.combos[1].steps(e.ranks, "c", 1, e.fp32) == [{"method": "int8", "calib": "c", "fp32_ops": ["b"]}]
    assert estimate(sp.combos[1], sp, 2.5, "ms").fp32 == ()  # no slack: INT8 alone

    def verify(estimates, round_):  # measured as estimated; the metric drop is the estimated loss
        return [Point(e.label, e.families, [], e.gain, e.loss, e.gain, 1.0 - e.loss, e.loss, {}, e.combo.label,
                      round_, bool(e.fp32)) for e in estimates]

    outcome = search(sp, "ms", 10.0 / 6.5, max_drop=0.01, verify=verify)
    assert outcome.met and outcome.chosen.mixed and outcome.chosen.label == "int8 (2 ops fp32)"
    alone = outcome.best_single["int8"]
    assert not alone.mixed and alone.label == "int8" and alone.drop > outcome.chosen.drop
    assert best_single(outcome.points, 10.0 / 6.5, 0.01)["int8"] is not outcome.chosen


def test_an_int8_stage_keeps_its_most_sensitive_op_fp32_within_the_slack(tmp_path):
    pytest.importorskip("nncf")
    import onnx
    from test_int8_cnn import Outlier, _setup  # noqa: E402 (tests/ is on sys.path under pytest)

    from edgeslim.compress.int8_sensitivity import op_macs
    from edgeslim.compress.train import teacher_targets
    from edgeslim.optimize_int8 import int8_layers
    from edgeslim.runtime.op_profile import fp32_compute_ops
    from edgeslim.runtime.session import OrtModule

    model = Outlier().eval()  # its second conv reads one channel 300x larger: by far the most sensitive op
    calib, comp, context, fp32 = _setup(model, tmp_path)
    data = teacher_targets(model, calib)

    def int8_file(config, out):
        result = comp.compress(model, config, calib, context=context)
        comp.onnx_stage(result.resolved, fp32, tmp_path / out, context)
        return tmp_path / out, result.resolved

    plain = {"sensitive_fp32": False, "stem_fp32": False}  # every conv INT8: the search's choice is the only one
    q, resolved = int8_file(plain, "q.onnx")
    layers = int8_layers(fp32, q, resolved, data, saving_ms=3.0, progress=False)
    convs = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv"]
    mid = convs[1]
    assert {l.name for l in layers} == set(convs)  # the INT8 kernels (the Gemm head reads a dequantized input)
    assert all(l.quantized_cost == 0 for l in layers)
    # each op's share of the saving by multiply-adds; the middle conv's counts the stem it unfuses (the stem's
    # output quantizer fed it alone), the 1x1 conv's the one before it likewise
    macs = op_macs(onnx.load(str(fp32)), convs, {"x": np.zeros((1, 3, 16, 16), np.float32)})
    taken = {convs[0]: [convs[0]], mid: [convs[0], mid], convs[2]: [mid, convs[2]], convs[3]: [convs[2], convs[3]]}
    assert {l.name: l.dense_params for l in layers} == pytest.approx(
        {op: 3.0 * sum(macs[o] for o in back) / sum(macs.values()) for op, back in taken.items()})
    worst = max(layers, key=lambda l: l.delta)
    assert worst.name == mid and worst.delta > 2 * max(l.delta for l in layers if l.name != mid) > 0

    timed = []

    def timing(files):  # the target: the INT8 graph 5 ms, the middle conv's graph 4 ms more, the others 0.01 more
        assert all(f.is_file() for f in files)
        timed.extend(files)
        ops = sorted(l.name for l in layers)  # the order int8_layers lists them in
        return [5.0] + [5.0 + (4.0 if op == mid else 0.01) for op in ops]

    measured = int8_layers(fp32, q, resolved, data, saving_ms=3.0, timing=timing, progress=False)
    assert timed[0] == q and len(timed) == len(layers) + 1
    share = {l.name: l.dense_params for l in layers}  # the larger of the share and the measured cost is kept
    assert {l.name: l.dense_params for l in measured} == pytest.approx(
        {op: 4.0 if op == mid else max(share[op], 0.01) for op in share})
    assert [l.delta for l in measured] == pytest.approx([l.delta for l in layers])

    # INT8 alone 2x (5 ms of 10), room for the middle conv's share of the saving: the mix keeps it fp32
    share = next(l.dense_params for l in layers if l.name == mid)
    int8_loss = mean_loss(OrtModule(q), data) - mean_loss(model, data)
    sp = ms_space(layers, 5.0, 10.0, int8_loss)
    e = estimate(sp.combos[1], sp, 10.0 / (5.0 + share + 1e-6), "ms")
    assert e.fp32 == (mid,) and e.loss == pytest.approx(int8_loss - worst.delta)
    step = sp.combos[1].steps(e.ranks, "c", 1, e.fp32)[0]
    assert step["fp32_ops"] == [mid]
    mixed, _ = int8_file(plain | {"fp32_ops": step["fp32_ops"]}, "mixed.onnx")
    kept = fp32_compute_ops(mixed)
    assert set(convs) & set(kept) == {convs[0], mid}  # the mix: that conv fp32 (and the stem it unfuses)
    # built as it was scored: the INT8 graph's loss less that op's measured delta
    assert mean_loss(OrtModule(mixed), data) == pytest.approx(mean_loss(OrtModule(q), data) - worst.delta, rel=0.02)


def test_a_dynamic_int8_stage_scores_each_matmul_alone_fp32(tmp_path):
    """Dynamic INT8 (MiniLM's mode on a VNNI CPU): each MatMul alone excluded from ORT's quantize_dynamic."""
    from edgeslim.compress.int8_dynamic import dynamic_record, quantize_dynamic_graph
    from edgeslim.compress.train import teacher_targets
    from edgeslim.export.onnx import to_onnx
    from edgeslim.optimize_int8 import int8_layers
    from edgeslim.runtime.session import OrtModule

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b, self.c = nn.Linear(32, 64, bias=False), nn.Linear(64, 64, bias=False), nn.Linear(64, 8)
            with torch.no_grad():  # b reads one channel 300x larger (the same function): per-tensor int8 of its
                self.a.weight[0] *= 300  # input leaves the small channels few levels
                self.b.weight[:, 0] /= 300

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    spec = [TensorSpec("x", ("batch", 4, 32))]  # 3-d: MatMul nodes, as a transformer's
    model = Mlp().eval()
    g = torch.Generator().manual_seed(0)
    data = teacher_targets(model, CalibData("t", [{"x": torch.randn(8, 4, 32, generator=g)} for _ in range(2)]))
    fp32 = to_onnx(model, spec, tmp_path / "f.onnx").path
    record = dynamic_record("disable", [])
    quantize_dynamic_graph(record, fp32, tmp_path / "q.onnx")
    resolved = {"activations_mode": "dynamic", "dynamic": record}
    def timing(files):
        raise AssertionError("a dynamic MatMul fuses nothing: its share of the saving is its cost, nothing is timed")

    layers = int8_layers(fp32, tmp_path / "q.onnx", resolved, data, saving_ms=1.0, timing=timing, progress=False)
    assert len(layers) == 3 and sum(l.dense_params for l in layers) == pytest.approx(1.0)
    base = mean_loss(OrtModule(tmp_path / "q.onnx"), data)
    for layer in layers:  # each score is the loss of the graph quantized again without that MatMul
        quantize_dynamic_graph(record | {"ignored": [layer.name]}, fp32, tmp_path / "one.onnx")
        assert layer.delta == pytest.approx(base - mean_loss(OrtModule(tmp_path / "one.onnx"), data), rel=1e-6, abs=1e-9)
    worst = max(layers, key=lambda l: l.delta)
    assert worst.name == layers[1].name and worst.delta > 2 * max(layers[0].delta, layers[2].delta)
    # a mix's fp32_ops on the dynamic path: excluded from quantize_dynamic, as each op was scored
    from edgeslim.compress.base import CompressContext, get_compressor
    result = get_compressor("int8").compress(model, {"activations": "dynamic", "fp32_ops": [worst.name]}, data,
                                             context=CompressContext(inputs=tuple(spec)))
    assert result.resolved["dynamic"]["ignored"] == [worst.name]
