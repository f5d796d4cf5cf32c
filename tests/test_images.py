"""Image I/O, BT.601 YCbCr, PSNR/SSIM, bundled images, SR patches and file upscaling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeslim import images
from edgeslim.core.sr_models import BicubicUpsampler
from edgeslim.core.errors import ConfigError, SourceError

pytest.importorskip("PIL")
torch.set_num_threads(1)


def test_psnr_of_a_constant_offset_matches_the_formula():
    a = np.full((20, 30), 100.0)
    for offset in (1.0, 5.0, 17.0):
        assert images.psnr(a + offset, a) == pytest.approx(20 * np.log10(255 / offset), abs=1e-9)
    assert images.psnr(a, a) == float("inf")
    b = a.copy()
    b[:2] += 50  # only inside the 2-pixel border: cropped away
    assert images.psnr(b, a, border=2) == float("inf")


def test_ssim_identity_and_skimage_agreement():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 255, (40, 50))
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255)
    assert images.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    ref = metrics.structural_similarity(a, b, data_range=255, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False)
    assert images.ssim(b, a) == pytest.approx(ref, abs=1e-6)
    assert images.ssim(b, a) < 0.99
    with pytest.raises(ConfigError, match="11x11"):
        images.ssim(a[:12, :12], b[:12, :12], border=1)


def test_ycbcr_bt601_values_and_round_trip():
    ycbcr = images.rgb_to_ycbcr(np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0]], dtype=np.uint8))
    assert np.allclose(ycbcr[0], [16, 128, 128]) and np.allclose(ycbcr[1], [235, 128, 128])
    assert ycbcr[2, 0] == pytest.approx(16 + 65.481)
    rgb = np.random.default_rng(1).integers(0, 256, (8, 9, 3)).astype(np.uint8)
    assert np.allclose(images.ycbcr_to_rgb(images.rgb_to_ycbcr(rgb)), rgb, atol=1e-9)


def test_degrade_crops_to_a_multiple_then_downscales():
    rgb = np.random.default_rng(2).integers(0, 256, (31, 23, 3)).astype(np.uint8)
    hr, lr = images.degrade(rgb, 3)
    assert hr.shape == (30, 21, 3) and lr.shape == (10, 7, 3) and lr.dtype == np.uint8
    flat = np.full((30, 21, 3), 77, np.uint8)
    assert np.all(images.degrade(flat, 3)[1] == 77)


def test_corrupt_and_missing_images_are_source_errors(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(SourceError, match="broken.png"):
        images.read_image(bad)
    with pytest.raises(SourceError, match="not found"):
        images.read_image(tmp_path / "absent.png")
    with pytest.raises(ConfigError, match="format"):
        images.write_image(tmp_path / "out.unknownext", np.zeros((2, 2, 3), np.uint8))
    assert list(tmp_path.iterdir()) == [bad]  # no temporary file left behind


def test_write_read_round_trip(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (6, 5, 3)).astype(np.uint8)
    path = images.write_image(tmp_path / "a.png", rgb)
    assert np.array_equal(images.read_image(path), rgb)


def test_bundled_split_and_patches():
    pytest.importorskip("skimage")
    assert set(images.HELD_OUT).isdisjoint(images.TRAINING)
    assert set(images.TRAINING) < set(images.BUNDLED_IMAGES) and set(images.HELD_OUT) < set(images.BUNDLED_IMAGES)
    assert {"china", "flower", "aero", "ascent", "coffee"} <= set(images.TRAINING)
    assert "cat" not in images.TRAINING  # skimage's cat is the held-out chelsea
    with pytest.raises(ConfigError, match="unknown bundled image"):
        images.load_bundled("lena")
    calib = images.patch_calibration(3, 10, patch=8, seed=0, batch_size=4)
    assert [b["x"].shape[0] for b in calib.batches] == [4, 4, 2]
    assert calib.batches[0]["x"].shape == (4, 1, 8, 8) and calib.targets[0].shape == (4, 1, 24, 24)
    x, y = calib.batches[0]["x"], calib.targets[0]
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    # LR patches are the bicubic downscale of their HR patches, so their means agree closely.
    assert torch.allclose(x.mean(dim=(2, 3)), y.mean(dim=(2, 3)), atol=0.03)
    again = images.patch_calibration(3, 10, patch=8, seed=0, batch_size=4)
    assert torch.equal(again.batches[1]["x"], calib.batches[1]["x"])


def test_upscale_file_writes_the_scaled_image(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 256, (10, 12, 3)).astype(np.uint8)
    src = images.write_image(tmp_path / "in.png", rgb)
    out = images.upscale_file(src, tmp_path / "out.png", BicubicUpsampler(2), 2)
    up = images.read_image(out)
    assert up.shape == (20, 24, 3)
    back = images.resize_bicubic(up, 10, 12).astype(float)
    assert np.abs(back - rgb).mean() < 40  # the same picture, not noise
    with pytest.raises(ConfigError, match="x3"):
        images.upscale_file(src, tmp_path / "bad.png", BicubicUpsampler(2), 3)
    assert not (tmp_path / "bad.png").exists()
