"""Factorized convolutions (SeparableConv2d/3d, `factorize`): formula, exactness, geometry, training,
ONNX parity, replay."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.compress.base import get_compressor
from edgeslim.compress.replace import count_params
from edgeslim.compress.separable_conv import SeparableConv2d, SeparableConv3d, separable_class
from edgeslim.core.errors import ConfigError

GEOMETRIES = [  # (conv class, kwargs), covering stride, padding forms, dilation, groups, 1x1, 3-D
    (nn.Conv2d, dict(in_channels=6, out_channels=10, kernel_size=3, padding=1)),
    (nn.Conv2d, dict(in_channels=6, out_channels=10, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))),
    (nn.Conv2d, dict(in_channels=6, out_channels=12, kernel_size=3, groups=3, padding="same")),
    (nn.Conv2d, dict(in_channels=8, out_channels=8, kernel_size=5, groups=8, padding=2)),  # depthwise
    (nn.Conv2d, dict(in_channels=8, out_channels=16, kernel_size=1, stride=2)),
    (nn.Conv2d, dict(in_channels=8, out_channels=16, kernel_size=(1, 3), stride=2, padding=1)),
    (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=4, padding="same", bias=False)),  # asymmetric
    (nn.Conv2d, dict(in_channels=5, out_channels=7, kernel_size=3, stride=3, padding="valid", dilation=2)),
    (nn.Conv3d, dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, stride=(1, 2, 1))),
    (nn.Conv3d, dict(in_channels=4, out_channels=4, kernel_size=(3, 1, 3), groups=2, padding=(1, 0, 1))),
]


def make_conv(cls, kwargs, seed=0):
    torch.manual_seed(seed)
    return cls(**kwargs)


def sample(conv, size=11, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, conv.in_channels, *([size] * (conv.weight.dim() - 2)), generator=g)


@pytest.mark.parametrize("rank", [1, 3, 16])
@pytest.mark.parametrize("cin,cout,kernel,groups,bias", [(8, 16, (3, 3), 1, True), (6, 12, (5, 1), 3, False),
                                                         (4, 4, (3, 5), 4, True), (16, 32, (1, 1), 1, True)])
def test_param_count_equals_formula(rank, cin, cout, kernel, groups, bias):
    layer = SeparableConv2d(cin, cout, kernel, rank, groups=groups, bias=bias)
    filtered = sum(k for k in kernel if k > 1)
    assert count_params(layer) == rank * (cin + cout + groups * filtered) + (cout if bias else 0)
    assert count_params(layer) == SeparableConv2d.param_count(cin, cout, kernel, rank, groups, bias)
    layer3 = SeparableConv3d(cin, cout, (3, *kernel), rank, groups=groups, bias=bias)
    assert count_params(layer3) == rank * (cin + cout + groups * (3 + filtered)) + (cout if bias else 0)


@pytest.mark.parametrize("cls,kwargs", GEOMETRIES)
def test_from_conv_is_exact_at_the_stated_rank(cls, kwargs):
    conv = make_conv(cls, kwargs)
    kernel_modes = [k for k in conv.kernel_size if k > 1]
    modes = [conv.out_channels // conv.groups, conv.in_channels // conv.groups, *kernel_modes]
    layer = separable_class(conv).from_conv(conv)
    assert layer.rank == math.prod(modes) // max(modes) == separable_class(conv).exact_rank(conv)
    x = sample(conv)
    y = layer(x)
    assert y.shape == conv(x).shape
    torch.testing.assert_close(y, conv(x), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(layer.dense_kernel(), conv.weight, atol=1e-6, rtol=1e-5)
    if all(b == a for b, a in layer.pads):
        dense = layer.to_dense()
        assert dense.stride == conv.stride and dense.dilation == conv.dilation and dense.groups == conv.groups
        torch.testing.assert_close(dense(x), conv(x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("cls,kwargs", GEOMETRIES)
def test_low_rank_layer_computes_its_own_dense_kernel(cls, kwargs):
    """Any rank, any geometry: the layer equals the dense conv of its CP product (shapes included)."""
    conv = make_conv(cls, kwargs)
    layer = separable_class(conv).empty_like(conv, 2)
    dense = conv.__class__(**kwargs)
    with torch.no_grad():
        dense.weight.copy_(layer.dense_kernel())
        if conv.bias is not None:
            dense.bias.copy_(layer.out_proj.bias)
    x = sample(conv, size=12)
    torch.testing.assert_close(layer(x), dense(x), atol=2e-5, rtol=1e-4)


def test_asymmetric_padding_matches_explicit_pad():
    layer = SeparableConv2d(3, 5, (3, 2), 4, stride=(1, 2), padding=(0, 2, 1, 0))  # (top, bottom, left, right)
    x = torch.randn(2, 3, 9, 10)
    ref = F.conv2d(F.pad(x, (1, 0, 0, 2)), layer.dense_kernel(), layer.out_proj.bias, stride=(1, 2))
    torch.testing.assert_close(layer(x), ref, atol=2e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="asymmetric"):
        layer.to_dense()


def test_truncated_cp_is_svd_optimal_for_matrices_and_recovers_low_rank_kernels():
    conv = make_conv(nn.Conv2d, dict(in_channels=12, out_channels=20, kernel_size=1, bias=False))
    s = torch.linalg.svdvals(conv.weight.detach().double().reshape(20, 12))
    layer = SeparableConv2d.from_conv(conv, rank=5)
    err = (layer.dense_kernel().detach().double() - conv.weight.detach().double()).norm()
    assert abs(float(err) - float(s[5:].square().sum().sqrt())) < 1e-5  # Eckart-Young
    g = torch.Generator().manual_seed(3)  # a kernel of CP rank 3: ALS from the SVD start finds it
    a, b, v, h = (torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (10, 6, 3, 3))
    conv = nn.Conv2d(6, 10, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("or,ir,yr,xr->oiyx", a, b, v, h))
    rel = (SeparableConv2d.from_conv(conv, rank=3).dense_kernel().detach() - conv.weight.detach()).norm() / conv.weight.norm()
    assert float(rel) < 1e-4


def test_fresh_init_preserves_the_dense_layers_variance():
    torch.manual_seed(0)
    layer = SeparableConv2d(64, 64, 3, 32, padding=1)
    fan_in = 64 * 9
    var = float(layer.dense_kernel().var())
    assert 0.8 / (3 * fan_in) < var < 1.25 / (3 * fan_in)  # PyTorch's Conv2d default: 1 / (3 fan_in)
    x = torch.randn(8, 64, 16, 16)
    ratio = float(layer(x).var() / nn.Conv2d(64, 64, 3, padding=1)(x).var())
    assert 0.7 < ratio < 1.4


@pytest.mark.parametrize("bad,match", [
    (lambda: SeparableConv2d(4, 6, 3, 2, stride=2, padding="same"), "stride 1"),
    (lambda: SeparableConv2d(4, 6, 3, 2, groups=4), "groups"),
    (lambda: SeparableConv2d(4, 6, 3, 0), "rank"),
    (lambda: SeparableConv2d(4, 6, 3, 2, padding=(1, 2, 3)), "padding"),
    (lambda: SeparableConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), 2), "padding_mode"),
    (lambda: SeparableConv2d.from_conv(nn.Conv2d(4, 6, 3), 37), "above 36"),
    (lambda: SeparableConv3d.from_conv(nn.Conv2d(4, 6, 3), 2), "Conv3d"),
])
def test_unsupported_settings_are_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        bad()


class TinyCNN(nn.Module):
    def __init__(self, cin: int = 2, width: int = 16, three_d: bool = False) -> None:
        super().__init__()
        conv = nn.Conv3d if three_d else nn.Conv2d
        self.a = conv(cin, width, 3, padding=1)
        self.b = conv(width, width, 5, padding=2)
        self.c = conv(width, width, 3, padding=1, groups=width)
        self.d = conv(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


def smooth_problem(n_batches=6, three_d=False):
    """Targets from a fixed smoothing of the first input channel: a conv net can learn it."""
    g = torch.Generator().manual_seed(0)
    shape = (8, 2, 6, 8, 8) if three_d else (8, 2, 12, 12)
    xs = [torch.randn(*shape, generator=g) for _ in range(n_batches)]
    pool = F.avg_pool3d if three_d else F.avg_pool2d
    ys = [2.0 * pool(x[:, :1], 3, 1, 1) for x in xs]
    return CalibData("smooth", [{"x": x} for x in xs], ys)


@pytest.mark.parametrize("three_d", [False, True])
def test_fresh_factorized_model_trains(three_d):
    from edgeslim.compress.train import heal

    torch.manual_seed(0)
    comp = get_compressor("factorize")
    result = comp.compress(TinyCNN(three_d=three_d), comp.make_config({"init": "fresh", "rank": 8}))
    kinds = {type(m).__name__ for m in result.model.modules()}
    assert ("SeparableConv3d" if three_d else "SeparableConv2d") in kinds
    # the depthwise c is skipped by default; the 16 -> 1 head d keeps fewer parameters dense than at rank 8
    assert set(result.resolved["ranks"]) == {"a", "b"} and result.resolved["dense"] == ["d"]
    assert list(result.resolved["skipped"]) == ["c"]
    replaced = [c for c in result.changes if c.status == "replaced"]
    assert [c.name for c in replaced] == ["a", "b"] and [c.status for c in result.changes[2:]] == ["skipped", "dense"]
    assert all(c.rel_error is None and c.params_after < c.params_before for c in replaced)
    data = smooth_problem(three_d=three_d)
    report = heal(result.model, data, steps=80, lr=1e-2, progress=False)
    assert report.tail_loss() < 0.4 * sum(report.losses[:5]) / 5


def test_cp_budget_forms_and_sensitivity():
    torch.manual_seed(0)
    model = TinyCNN(width=12)
    comp = get_compressor("factorize")
    targeted = (model.a, model.b, model.d)  # the depthwise c is skipped by default
    dense = sum(c.weight.numel() + c.bias.numel() for c in targeted)
    calib = CalibData("rand", [{"x": torch.randn(4, 2, 10, 10, generator=torch.Generator().manual_seed(i))}
                               for i in range(2)])
    for cfg in ({"ratio": 0.4, "allocation": "uniform"}, {"ratio": 0.4, "allocation": "sensitivity"}):
        for data in (None, calib):
            result = comp.compress(model, comp.make_config({**cfg, "n_iter": 20}), data)
            rows = [c for c in result.changes if c.status != "skipped"]
            assert sum(c.params_before for c in rows) == dense
            step = 0  # the shared allocator may exceed the budget by one rank step per layer in uniform
            if cfg["allocation"] == "uniform":
                step = sum(SeparableConv2d.param_count(m.in_channels, m.out_channels, m.kernel_size, 1, m.groups, False)
                           for m in targeted)
            assert sum(c.params_after for c in rows) <= 0.4 * dense + step
            replaced = [c for c in result.changes if c.status == "replaced"]
            assert replaced and all(0.0 <= c.rel_error < 1.0 for c in replaced)
            measured = data is not None and cfg["allocation"] == "sensitivity"
            assert all((c.sensitivity is not None) == measured for c in replaced)
    loose = comp.compress(model, comp.make_config({"energy": 0.999, "n_iter": 20}))
    tight = comp.compress(model, comp.make_config({"energy": 0.3, "n_iter": 20}))
    assert tight.params_after < loose.params_after or len(loose.changes) < len(tight.changes)
    ranked = comp.compress(model, comp.make_config({"rank": 8, "align": 4}))
    assert ranked.resolved["ranks"] == {"a": 8, "b": 8}  # d: rank 8 saves nothing there
    assert [c.status for c in ranked.changes] == ["replaced", "replaced", "skipped", "dense"]
    assert ranked.resolved["dense"] == ["d"]


@pytest.mark.parametrize("cfg,match", [({"init": "tucker"}, "init"), ({"init": "fresh", "energy": 0.9}, "fresh"),
                                       ({"init": "fresh", "allocation": "sensitivity"}, "fresh"),
                                       ({"n_iter": 0}, "n_iter")])
def test_config_errors(cfg, match):
    comp = get_compressor("factorize")
    with pytest.raises(ConfigError, match=match):
        comp.compress(TinyCNN(), comp.make_config(cfg))


def test_a_ratio_below_the_smallest_ranks_keeps_the_smallest_ranks():
    comp = get_compressor("factorize")
    least = comp.compress(TinyCNN(), comp.make_config({"ratio": 0.001, "allocation": "sensitivity"}))
    assert least.params_after > 0.001 * least.params_before  # the pipeline warns with the reached ratio


def test_replay_rebuilds_the_structure_and_artifact_round_trip(tmp_path):
    from edgeslim import artifact
    from edgeslim.sources import load_model

    loaded = load_model("srcnn-x3")
    comp = get_compressor("factorize")
    result = comp.compress(loaded.model, comp.make_config({"ratio": 0.5, "n_iter": 5}))
    replayed = comp.replay(load_model("srcnn-x3").model, result.resolved, loaded.inputs)
    replayed.load_state_dict(result.model.state_dict(), strict=True)
    x = torch.randn(1, 1, 12, 12)
    assert torch.equal(replayed(x=x), result.model(x=x))
    path = artifact.save(tmp_path / "f.slim", result.model, loaded.source, [result.step_record()], loaded.inputs,
                         {}, loaded.task, loaded.dims)
    assert torch.equal(artifact.load(path).model(x=x), result.model(x=x))


def test_onnx_parity(tmp_path):
    import onnx

    from edgeslim.export.onnx import to_onnx
    from edgeslim.core.specs import TensorSpec

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = SeparableConv2d(2, 8, 3, 4, padding=1)
            self.b = SeparableConv2d(8, 8, (4, 3), 3, stride=(1, 2), padding=(1, 2, 1, 1), dilation=(1, 2))
            self.c = SeparableConv2d(8, 4, 1, 2, stride=2, groups=2)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    cases = [(Net(), TensorSpec("x", ("batch", 2, "height", "width"))),
             (SeparableConv3d(2, 4, 3, 2, padding=1, stride=(1, 2, 1)), TensorSpec("x", ("batch", 2, 5, "height", "width")))]
    for i, (model, spec) in enumerate(cases):
        result = to_onnx(model, [spec], tmp_path / f"m{i}.onnx")
        assert result.checks and all(c.ok for c in result.checks)
        ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
        assert "Conv" in ops and ops <= {"Conv", "Pad", "Relu"}  # the asymmetric pad may fold into Conv's pads


@pytest.mark.slow
def test_benchmark_quick_mode_runs_end_to_end(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parents[1] / "bench" / "apriori_wave.py"
    spec = importlib.util.spec_from_file_location("apriori_wave", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if not bench.FASHION.is_dir():
        pytest.skip(f"Fashion-MNIST is not installed at {bench.FASHION}")
    bench.main(["--quick", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "apriori_wave.json").read_text())
    for task in ("wave", "fashion"):
        rows = summary[task]["rows"]
        assert [r["variant"] for r in rows] == ["dense", "rank 4", "rank 2"]
        assert rows[0]["params"] > rows[1]["params"] > rows[2]["params"]
        assert all(r["training_rss_bytes"] >= 0 and r["seconds_per_epoch"] > 0 and r["onnx_max_abs_diff"] < 1e-3
                   for r in rows)
    assert all(len(r["rollout_rel_l2"]) == 3 for r in summary["wave"]["rows"])
    eff = summary["efficientnet"]["rows"][0]
    assert eff["params"] < summary["efficientnet"]["original"]["params"] and 0.0 <= eff["top1_agreement"] <= 1.0
    assert (tmp_path / "apriori_wave_summary.png").stat().st_size > 0


def test_static_same_padding_subclass_is_understood_and_others_refused():
    class StaticSame(nn.Conv2d):  # the shape of EfficientNet's Conv2dStaticSamePadding
        def __init__(self):
            super().__init__(3, 8, 3, stride=2)
            self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

        def forward(self, x):
            return super().forward(self.static_padding(x))

    class Odd(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    conv = StaticSame()
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(SeparableConv2d.from_conv(conv)(x), conv(x), atol=2e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="overrides"):
        SeparableConv2d.from_conv(Odd(3, 8, 3), 2)


def test_a_factorized_conv_keeps_weight_and_bias_so_vit_patch_embedding_runs():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 4, stride=4)
    sep = SeparableConv2d.from_conv(conv, rank=4, n_iter=5)
    assert torch.equal(sep.weight, sep.dense_kernel()) and sep.weight.shape == conv.weight.shape
    assert sep.bias is sep.out_proj.bias
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64, num_labels=3)

    class ViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf = transformers.ViTForImageClassification(config)

        def forward(self, pixel_values):
            return self.hf(pixel_values=pixel_values).logits  # reads patch_embeddings.projection.weight.dtype

    comp = get_compressor("factorize")
    result = comp.compress(ViT().eval(), comp.make_config({"rank": 4, "n_iter": 5}))
    assert isinstance(result.model.hf.vit.embeddings.patch_embeddings.projection, SeparableConv2d)
    assert result.model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
