"""Tiled upscaling (exact vs one pass), `edgeslim upscale --compare/--reference`, and the ESPCN scripts' quick modes."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeslim import images
from edgeslim.cli import main
from edgeslim.core.errors import ConfigError
from edgeslim.core.sr_models import ESPCN, BicubicUpsampler

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def _espcn(scale: int, dtype=torch.float32, kernels=(5, 3, 3)) -> ESPCN:
    with torch.random.fork_rng():
        torch.manual_seed(scale)
        model = ESPCN(scale, (8, 4), kernels).to(dtype).eval()
    with torch.no_grad():  # large weights: any missing context would show, not vanish in tanh's flat part
        for p in model.parameters():
            p.mul_(3)
    return model


def test_halo_is_the_receptive_radius():
    assert _espcn(3).halo == 4 and _espcn(2, kernels=(9, 5, 1)).halo == 6
    model = _espcn(2, torch.float64)
    plane = torch.zeros(1, 1, 31, 31, dtype=torch.float64)
    base = model(x=plane)
    plane[..., 15, 15 + model.halo] = 1.0  # a pixel exactly `halo` away still reaches output column 2*15
    assert not torch.equal(model(x=plane)[..., 30, 30], base[..., 30, 30])
    plane[..., 15, 15 + model.halo] = 0.0
    plane[..., 15, 15 + model.halo + 1] = 1.0  # one further does not
    assert torch.equal(model(x=plane)[..., 30:32, 30:32], base[..., 30:32, 30:32])


@pytest.mark.parametrize("scale,tile,shape", [(2, 16, (70, 53)), (3, 5, (23, 31)), (4, 3, (10, 9)), (3, 64, (40, 130))])
def test_tiled_equals_one_pass_everywhere(scale, tile, shape):
    y = np.random.default_rng(scale).random(shape) * 219 + 16
    model = _espcn(scale, torch.float64)  # float64: the only difference left is summation order
    one, tiled = images.upscale_luma(model, y, None), images.upscale_luma(model, y, tile)
    assert tiled.shape == (scale * shape[0], scale * shape[1])
    assert np.abs(one - tiled).max() < 1e-9  # borders included: the image's own border is padded as in one pass
    model32 = _espcn(scale)  # fp32 kernels differ by ~1e-5 with the tile shape: at most one 8-bit step apart
    one8, tiled8 = (images.to_uint8(images.upscale_luma(model32, y, t)).astype(int) for t in (None, tile))
    assert np.abs(one8 - tiled8).max() <= 1


def test_too_little_overlap_would_show():
    y = np.random.default_rng(0).random((30, 30)) * 219 + 16
    model = _espcn(2, torch.float64)
    one = images.upscale_luma(model, y, None)
    liar = _Halo(model, 1)  # a receptive field claimed too small: tile seams appear
    assert np.abs(images.upscale_luma(liar, y, 8) - one).max() > 1e-3
    assert np.abs(images.upscale_luma(_Halo(model, 4), y, 8) - one).max() < 1e-9


class _Halo(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, halo: int):
        super().__init__()
        self.inner, self.halo = inner, halo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x=x)


def test_models_without_halo_run_in_one_pass_and_bad_tile():
    y = np.random.default_rng(0).random((12, 10)) * 255
    assert np.array_equal(images.upscale_luma(BicubicUpsampler(2), y, 4), images.upscale_luma(BicubicUpsampler(2), y, None))
    with pytest.raises(ConfigError, match="tile"):
        images.upscale_luma(_espcn(2), y, 0)


def test_upscale_compare_with_reference(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    monkeypatch.chdir(tmp_path)
    hr = np.random.default_rng(1).integers(0, 256, (49, 61, 3)).astype(np.uint8)  # not a multiple of 2
    lr = images.resize_bicubic(images.modcrop(hr, 2), 24, 30)
    images.write_image("lr.png", lr)
    images.write_image("hr.png", hr)
    args = ["upscale", "lr.png", "-o", "up.png", "--model", "bicubic-x2", "--runtime", "torch"]
    assert main(args + ["--compare", "side.png", "--reference", "hr.png"]) == 0
    side = images.read_image("side.png")
    assert images.read_image("up.png").shape == (48, 60, 3)
    assert side.shape[1] == 3 * 60 + 2 * 4 and side.shape[0] == 48 + 18  # three panels and a caption strip
    assert main(args + ["--compare"]) == 0 and Path("up-compare.png").is_file()  # default name, two panels
    assert images.read_image("up-compare.png").shape[1] == 2 * 60 + 4
    assert main(args + ["--reference", "hr.png"]) == 2  # a reference needs --compare
    images.write_image("small.png", hr[:40])
    assert main(args + ["--compare", "s2.png", "--reference", "small.png"]) == 2
    assert not Path("s2.png").exists()


def test_upscale_onnxruntime_matches_torch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images.write_image("lr.png", np.random.default_rng(2).integers(0, 256, (20, 22, 3)).astype(np.uint8))
    for runtime in ("torch", "onnxruntime"):
        assert main(["upscale", "lr.png", "-o", f"{runtime}.png", "--model", "espcn-x2", "--runtime", runtime,
                     "--tile", "7"]) == 0
    a, b = images.read_image("torch.png").astype(int), images.read_image("onnxruntime.png").astype(int)
    assert a.shape == (40, 44, 3) and np.abs(a - b).max() <= 1


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_train_espcn_quick(tmp_path, monkeypatch):
    pytest.importorskip("skimage")
    monkeypatch.setattr(sys, "argv", ["train_espcn.py", "--quick", "--scales", "2", "--points", "2",
                                      "--out", str(tmp_path), "--results", str(tmp_path)])
    _bench("train_espcn").main()
    summary = json.loads((tmp_path / "train_espcn.json").read_text())
    sec = summary["scales"]["2"]
    assert sec["steps"] == 6 and sec["seed"] == 0 and sec["machine_info"]["cpu_model"]
    assert set(sec["data"]["held_out_images"]).isdisjoint(sec["data"]["training_images"])
    assert [p["step"] for p in sec["learning_curve"]] == [3, 6]
    assert (tmp_path / "espcn-x2.slim" / "manifest.json").is_file() and (tmp_path / "train_espcn_curve.png").is_file()


def test_sr_models_is_a_leaf():
    import ast
    tree = ast.parse((ROOT / "edgeslim" / "core" / "sr_models.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {n for n in names if n.startswith("edgeslim")} == {"edgeslim.core.errors"}  # compress/ may import it


def test_upscale_a_bundled_sample_and_print_the_psnrs(in_tmp, capsys):
    from PIL import Image

    hr = images.load_bundled("astronaut")[:300, :300]
    Image.fromarray(hr).resize((100, 100), Image.BICUBIC).save("lr.png")
    assert main(["upscale", "sample:astronaut", "-o", "big.png", "--model", "bicubic-x2", "--tile", "0"]) == 0
    assert Image.open("big.png").size == (1024, 1024)  # the 512 x 512 photograph, x2: no file needed
    with pytest.warns(UserWarning, match="the reference is 512x512, the upscaled image 300x300"):
        assert main(["upscale", "lr.png", "-o", "up.png", "--model", "bicubic-x3", "--compare",
                     "--reference", "sample:astronaut"]) == 0
    psnrs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Y-PSNR")]
    assert len(psnrs) == 2 and all(line.endswith(" dB") for line in psnrs)
    assert main(["upscale", "sample:nothing", "-o", "x.png"]) == 2
