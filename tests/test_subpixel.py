"""Sub-pixel layers and models: exact deconvolution conversion, PixelShuffle order, ESPCN, compressors, ONNX."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeslim.compress import get_compressor
from edgeslim.core.calib import CalibData
from edgeslim.compress.replace import count_params
from edgeslim.compress.subpixel import ESPCNConfig, SubPixelConv2d
from edgeslim.core.sr_models import ESPCN, SRCNN, BicubicUpsampler, DeconvSR
from edgeslim.sr_train import train_espcn
from edgeslim.core.errors import ConfigError
from edgeslim.core.specs import TensorSpec

torch.set_num_threads(1)

# (kernel, stride, padding, output_padding): FSRCNN x2/x3/x4 heads, k < s, k % s == 0, p > k/2, op > p.
DECONV_CASES = [(9, 3, 3, 0), (9, 2, 4, 1), (9, 4, 3, 1), (4, 2, 1, 0), (3, 2, 1, 1), (2, 3, 0, 2),
                (6, 3, 0, 0), (5, 2, 3, 1), ((7, 4), 2, (2, 0), (1, 0)), (1, 2, 0, 1)]


@pytest.mark.parametrize("kernel,stride,padding,output_padding", DECONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_deconv_conversion_is_exact(kernel, stride, padding, output_padding, bias):
    torch.manual_seed(0)
    deconv = nn.ConvTranspose2d(3, 2, kernel, stride=stride, padding=padding, output_padding=output_padding, bias=bias)
    layer = SubPixelConv2d.from_conv_transpose(deconv)
    for h, w in ((5, 7), (8, 3)):
        x = torch.randn(2, 3, h, w, dtype=torch.float64)
        ref = deconv.double()(x)
        out = layer.double()(x)
        assert out.shape == ref.shape
        assert torch.allclose(out, ref, atol=1e-12, rtol=0)
        back = layer.to_conv_transpose().double()
        assert torch.allclose(back(x), ref, atol=1e-12, rtol=0)
    assert (back.kernel_size, back.padding, back.output_padding) == \
           (deconv.kernel_size, deconv.padding, deconv.output_padding)


def test_pixel_shuffle_channel_order_by_hand():
    # A 1x1 conv whose sub-pixel channel c*4 + 2*i + j copies input channel (2*i + j): output pixel
    # (2h + i, 2w + j) must then hold input channel 2*i + j at (h, w).
    layer = SubPixelConv2d(4, 1, 2, 1, bias=False)
    with torch.no_grad():
        layer.conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
    x = torch.arange(4 * 2 * 3, dtype=torch.float32).view(1, 4, 2, 3)
    y = layer(x)
    assert y.shape == (1, 1, 4, 6)
    for i in range(2):
        for j in range(2):
            assert torch.equal(y[0, 0, i::2, j::2], x[0, 2 * i + j])
    assert y[0, 0, 1, 0] == x[0, 2, 0, 0] and y[0, 0, 0, 1] == x[0, 1, 0, 0]


@pytest.mark.parametrize("bad", [dict(groups=2), dict(dilation=2), dict(stride=(2, 3))])
def test_unsupported_deconv_is_a_config_error(bad):
    deconv = nn.ConvTranspose2d(2, 2, 3, **{"stride": 2, **bad})
    with pytest.raises(ConfigError, match="not supported"):
        SubPixelConv2d.from_conv_transpose(deconv)


def test_per_phase_bias_has_no_deconv_form():
    layer = SubPixelConv2d(2, 1, 2, 3)
    with torch.no_grad():
        layer.conv.bias.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ConfigError, match="bias per sub-pixel"):
        layer.to_conv_transpose()


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("channels,kernels,cin", [((64, 32), (5, 3, 3), 1), ((16, 8, 8), (3, 3, 3, 5), 3)])
def test_espcn_parameter_count_and_shape(scale, channels, kernels, cin):
    model = ESPCN(scale, channels, kernels, in_channels=cin)
    widths = (cin,) + channels + (cin * scale ** 2,)
    expected = sum(widths[i] * widths[i + 1] * kernels[i] ** 2 + widths[i + 1] for i in range(len(kernels)))
    assert count_params(model) == expected
    if (channels, scale) == ((64, 32), 3):
        assert expected == 22729  # 1664 + 18464 + 2601
    assert model(x=torch.rand(2, cin, 7, 9)).shape == (2, cin, 7 * scale, 9 * scale)


def test_espcn_rejects_bad_architecture():
    with pytest.raises(ConfigError, match="kernels"):
        ESPCN(3, (64, 32), (5, 3))
    with pytest.raises(ConfigError, match="activation"):
        ESPCN(3, activation="gelu")
    with pytest.raises(ConfigError, match="odd"):
        ESPCN(3, (8,), (4, 3))
    with pytest.raises(ConfigError, match="scale"):
        ESPCN(0)


@pytest.mark.parametrize("model", [BicubicUpsampler(3), DeconvSR(2), DeconvSR(3), DeconvSR(4), SRCNN(3)])
def test_sr_models_upscale_exactly(model):
    scale = 3 if not isinstance(model, DeconvSR) else model.upsample.stride[0]
    assert model(x=torch.rand(1, 1, 6, 5)).shape == (1, 1, 6 * scale, 5 * scale)


def test_deconv_to_subpixel_compressor_and_replay():
    torch.manual_seed(0)
    model = DeconvSR(3).eval()
    comp = get_compressor("deconv_to_subpixel")
    result = comp.compress(model, comp.make_config({}))
    assert isinstance(model.upsample, nn.ConvTranspose2d)  # caller's model untouched
    assert isinstance(result.model.upsample, SubPixelConv2d)
    (change,) = result.changes
    assert change.name == "upsample" and change.rel_error < 1e-6
    x = torch.rand(2, 1, 11, 8)
    with torch.no_grad():
        assert torch.allclose(result.model(x=x), model(x=x), atol=1e-5)
    rebuilt = comp.replay(DeconvSR(3), result.resolved, [])
    rebuilt.load_state_dict(result.model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(x=x), result.model(x=x))
    with pytest.raises(ConfigError, match="no ConvTranspose2d module matches"):
        comp.compress(model, comp.make_config({"target": "nothing.*"}))
    with pytest.raises(ConfigError, match="unknown key"):
        comp.make_config({"ratio": 0.5})


def _tiny_calib(scale: int, targets: bool) -> CalibData:
    gen = torch.Generator().manual_seed(0)
    hr = torch.rand(32, 1, 8 * scale, 8 * scale, generator=gen)
    lr = nn.functional.avg_pool2d(hr, scale)
    return CalibData("tiny", [{"x": lr[i:i + 16]} for i in (0, 16)], [hr[i:i + 16] for i in (0, 16)] if targets else None)


@pytest.mark.parametrize("targets", [True, False])
def test_espcn_compressor_trains_and_replays(targets):
    comp = get_compressor("espcn")
    assert comp.needs_calibration
    config = comp.make_config({"scale": 2, "channels": [8, 4], "steps": 60, "batch_size": 8, "lr": 3e-3})
    result = comp.compress(SRCNN(2).eval() if not targets else BicubicUpsampler(2), config, _tiny_calib(2, targets))
    training = result.resolved["training"]
    assert training["loss_last50"] < 0.5 * training["loss_first"]
    assert result.changes[0].params_after == count_params(result.model)
    rebuilt = comp.replay(BicubicUpsampler(2), result.resolved, [])
    assert [(n, p.shape) for n, p in rebuilt.named_parameters()] == \
           [(n, p.shape) for n, p in result.model.named_parameters()]
    rebuilt.load_state_dict(result.model.state_dict(), strict=True)
    x = torch.rand(1, 1, 5, 6)
    with torch.no_grad():
        assert torch.equal(rebuilt(x=x), result.model(x=x))


def test_espcn_config_errors():
    comp = get_compressor("espcn")
    with pytest.raises(ConfigError, match="unknown key"):
        comp.make_config({"epochs": 3})
    with pytest.raises(ConfigError, match="positive integers"):
        ESPCNConfig(steps=0)
    with pytest.raises(ConfigError, match="do not fit"):
        comp.compress(BicubicUpsampler(3), ESPCNConfig(scale=3, steps=1), _tiny_calib(2, True))
    with pytest.raises(ConfigError, match="calibration"):
        comp.compress(BicubicUpsampler(3), ESPCNConfig(scale=3, steps=1))


def test_train_espcn_on_bundled_patches():
    pytest.importorskip("skimage")
    result = train_espcn(2, steps=3, count=16, batch_size=4, lr=1e-3)
    assert result.resolved["training"]["data"] == "bundled-train-x2:16"
    assert result.model(x=torch.rand(1, 1, 4, 4)).shape == (1, 1, 8, 8)


# The converted deconvolution crops its LR input (height) and its HR output (width): Slice + Conv + DepthToSpace.
@pytest.mark.parametrize("model", [ESPCN(3), SubPixelConv2d.from_conv_transpose(
    nn.ConvTranspose2d(2, 1, (3, 4), stride=2, padding=(4, 1), output_padding=(1, 0)))])
def test_onnx_parity(model, tmp_path):
    to_onnx = pytest.importorskip("edgeslim.export.onnx").to_onnx
    import onnx

    cin = model.conv.in_channels if isinstance(model, SubPixelConv2d) else 1  # (ESPCN: Y only)
    wrapped = _Keyword(model).eval()
    result = to_onnx(wrapped, [TensorSpec("x", ("batch", cin, "height", "width"))], tmp_path / "m.onnx",
                     dims={"batch": 1, "height": 12, "width": 10}, atol=1e-5)
    assert max(result.max_abs_diff.values()) < 1e-5
    ops = {node.op_type for node in onnx.load(str(result.path)).graph.node}
    assert "DepthToSpace" in ops and "ConvTranspose" not in ops


class _Keyword(nn.Module):
    """Calls a positional module as model(x=...) like every edgeslim model."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.slow
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_shipped_espcn_beats_bicubic_on_held_out_images(scale):
    pytest.importorskip("skimage")
    from edgeslim import images
    from edgeslim.sources import load_model

    model = load_model(f"espcn-x{scale}").model
    assert isinstance(model, ESPCN) and model.architecture["scale"] == scale
    for name in images.HELD_OUT:
        hr, lr = images.degrade(images.load_bundled(name)[:240, :240], scale)
        y_hr, y_lr = images.luma(hr), images.luma(lr)
        bicubic = images.to_uint8(images.resize_bicubic(y_lr, *y_hr.shape))
        sr = images.to_uint8(images.upscale_luma(model, y_lr))
        assert images.psnr(sr, y_hr, scale) > images.psnr(bicubic, y_hr, scale), name
