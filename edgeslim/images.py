"""Images for super-resolution: file I/O, BT.601 YCbCr, bicubic degradation, PSNR/SSIM, bundled data.

Evaluation follows the super-resolution literature (Dong et al. 2014; Shi et al. 2016): the HR image is
cropped to a multiple of the scale and downscaled bicubically (PIL, antialiased); PSNR and SSIM are
taken on the Y channel of studio-range YCbCr with `scale` border pixels removed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeslim.core.calib import CalibData
from edgeslim.core.errors import ConfigError, EdgeslimError, SourceError, require
from edgeslim.core.files import IMAGE, replace_output
from edgeslim.defaults import TILE

# Images that install offline with the `data` extra: scikit-image's wheel (no download), scikit-learn's
# sample photographs, PyWavelets' (`pywt.data.camera` is scikit-image's camera, so it is not listed twice).
SKIMAGE_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
                  "camera", "brick", "grass", "gravel", "moon", "coins", "text", "page", "clock", "motorcycle")
OTHER_IMAGES = {"china": "sklearn", "flower": "sklearn", "aero": "pywt", "ascent": "pywt"}
BUNDLED_IMAGES = SKIMAGE_IMAGES + tuple(OTHER_IMAGES)
HELD_OUT = ("astronaut", "chelsea", "camera", "coins")  # never used for training (chelsea is also skimage's cat)
# Training: every natural photograph above (textures included; the scanned pages and the micrograph left out).
TRAINING = ("coffee", "rocket", "hubble_deep_field", "retina", "brick", "grass", "gravel", "moon", "clock",
            "motorcycle", "china", "flower", "aero", "ascent")
# Multi-scale training data: each training image is also used bicubically shrunk by these factors.
TRAINING_RESCALES = (1.0, 0.8, 0.6)

# ITU-R BT.601 studio range, R, G, B in 0..255 (the MATLAB rgb2ycbcr convention).
_RGB_TO_YCBCR = np.array([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]]) / 255.0
_YCBCR_OFFSET = np.array([16.0, 128.0, 128.0])


def _pil() -> Any:
    return require("PIL.Image", "data", "reading and writing images")


MAX_PIXELS = 64_000_000  # 8000 x 8000: below Pillow's own bomb limit, far above any photo a model takes


def read_image(path: str | Path) -> np.ndarray:
    """An image file as an RGB uint8 array [H, W, 3] (grey and palette images are converted).

    Raises:
        SourceError: the file is missing, unreadable or not a decodable image.
    """
    image_mod = _pil()
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"image file not found: {path}")
    try:
        with image_mod.open(path) as img:  # reads the header only: the size is known before any pixel is decoded
            if img.width * img.height > MAX_PIXELS:
                raise SourceError(f"image {path} is {img.width}x{img.height} = {img.width * img.height:,} pixels, "
                                  f"over the limit of {MAX_PIXELS:,} (a decompression bomb or an image too large)")
            if img.mode.startswith("I;16") or img.mode in ("I", "F"):
                return _deep_to_rgb8(np.asarray(img), img.mode, path)
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError, image_mod.DecompressionBombError) as exc:  # UnidentifiedImageError
        raise SourceError(f"cannot read image {path}: {exc}") from exc                     # is an OSError


SAMPLE = "sample:"  # `sample:astronaut`: a bundled photograph instead of a file (edgeslim upscale)


def read_any_image(text: str | Path) -> np.ndarray:
    """`sample:NAME` (one of BUNDLED_IMAGES, nothing to download) or an image file, as RGB uint8 [H, W, 3]."""
    if str(text).startswith(SAMPLE):
        return load_bundled(str(text)[len(SAMPLE):])
    return read_image(text)


def _deep_to_rgb8(values: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """A 16-bit (or 32-bit integer) grey image scaled with full precision to 8 bits (v * 255 / 65535, rounded);
    a floating-point one is taken as 0..255 and clipped, with a warning when that changes values."""
    import warnings

    values = values.astype(np.float64)
    if mode == "F":
        if values.min() < 0 or values.max() > 255:
            warnings.warn(f"{path}: floating-point image values outside 0..255 were clipped")
        grey = values
    else:
        if values.min() < 0 or values.max() > 65535:
            warnings.warn(f"{path}: integer image values outside 0..65535 were clipped")
        grey = np.clip(values, 0, 65535) * (255.0 / 65535.0)
    grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def write_image(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an RGB uint8 array atomically (`edgeslim.core.files.replace_output`: an existing image file only).

    Raises:
        ConfigError: the array is not [H, W, 3] uint8 or the file extension is not an image format.
    """
    image_mod = _pil()
    path = Path(path)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ConfigError(f"write_image needs an [H, W, 3] uint8 array, got {rgb.shape} {rgb.dtype}")
    fmt = image_mod.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"cannot tell the image format from '{path.name}'; use e.g. .png or .jpg")
    with replace_output(path, IMAGE) as tmp:
        with open(tmp, "wb") as fh:
            image_mod.fromarray(rgb, "RGB").save(fh, format=fmt)
    return path


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """BT.601 studio-range YCbCr (float64, Y in 16..235) of RGB values in 0..255, [..., 3]."""
    return np.asarray(rgb, dtype=np.float64) @ _RGB_TO_YCBCR.T + _YCBCR_OFFSET


def ycbcr_to_rgb(ycbcr: np.ndarray) -> np.ndarray:
    """Inverse of rgb_to_ycbcr (float64 RGB in 0..255, not clipped)."""
    return (np.asarray(ycbcr, dtype=np.float64) - _YCBCR_OFFSET) @ np.linalg.inv(_RGB_TO_YCBCR).T


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Round and clip to 0..255 uint8, as an image written to disk would be."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def modcrop(image: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so height and width are multiples of `scale`."""
    h, w = image.shape[0] - image.shape[0] % scale, image.shape[1] - image.shape[1] % scale
    return image[:h, :w]


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL bicubic resize (antialiased when shrinking): uint8 [H, W, 3] stays uint8, a float plane stays float."""
    image_mod = _pil()
    if image.dtype == np.uint8:
        return np.asarray(image_mod.fromarray(image).resize((width, height), image_mod.BICUBIC))
    plane = image_mod.fromarray(np.asarray(image, dtype=np.float32), "F")
    return np.asarray(plane.resize((width, height), image_mod.BICUBIC), dtype=np.float64)


def degrade(image: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(HR, LR): the image cropped to a multiple of `scale`, and its bicubic downscale by `scale`."""
    hr = modcrop(image, scale)
    return hr, resize_bicubic(hr, hr.shape[0] // scale, hr.shape[1] // scale)


def _shave(a: np.ndarray, b: np.ndarray, border: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ConfigError(f"compare two Y planes of the same [H, W] shape, got {a.shape} and {b.shape}")
    if border:
        a, b = a[border:-border, border:-border], b[border:-border, border:-border]
    return a, b


def psnr(a: np.ndarray, b: np.ndarray, border: int = 0, peak: float = 255.0) -> float:
    """PSNR in dB, 10 log10(peak^2 / MSE), of two Y planes with `border` pixels cropped (inf if equal)."""
    a, b = _shave(a, b, border)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak ** 2 / mse)


def _gaussian_valid(x: np.ndarray, size: int = 11, sigma: float = 1.5) -> np.ndarray:
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    rows = sum(g[i] * x[i:x.shape[0] - size + 1 + i] for i in range(size))
    return sum(g[i] * rows[:, i:x.shape[1] - size + 1 + i] for i in range(size))


def ssim(a: np.ndarray, b: np.ndarray, border: int = 0, peak: float = 255.0) -> float:
    """Mean SSIM (Wang et al. 2004, eq. 13) with an 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03.

    Computed over the window positions fully inside the image (`border` pixels cropped first).
    """
    a, b = _shave(a, b, border)
    if min(a.shape) < 11:
        raise ConfigError(f"SSIM needs at least 11x11 pixels after the border crop, got {a.shape}")
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mu_a, mu_b = _gaussian_valid(a), _gaussian_valid(b)
    var_a = _gaussian_valid(a * a) - mu_a ** 2
    var_b = _gaussian_valid(b * b) - mu_b ** 2
    cov = _gaussian_valid(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def load_bundled(name: str) -> np.ndarray:
    """A packaged image (BUNDLED_IMAGES) as RGB uint8 [H, W, 3] (grey images replicated to 3 channels).

    Raises:
        ConfigError: the name is not one of BUNDLED_IMAGES.
        SourceError: the package holding it cannot load it offline.
    """
    if name not in BUNDLED_IMAGES:
        raise ConfigError(f"unknown bundled image '{name}'; available: {list(BUNDLED_IMAGES)}")
    try:
        if name in OTHER_IMAGES and OTHER_IMAGES[name] == "sklearn":
            datasets = require("sklearn.datasets", "data", "scikit-learn's sample photographs")
            image = np.asarray(datasets.load_sample_image(f"{name}.jpg"))
        elif name in OTHER_IMAGES:
            image = np.asarray(getattr(require("pywt.data", "data", "PyWavelets' sample images"), name)())
        else:
            data = require("skimage.data", "data", "the bundled test images")
            image = np.asarray(data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)())
    except Exception as exc:  # skimage may try a download for images missing from its wheel
        if isinstance(exc, EdgeslimError):
            raise
        raise SourceError(f"could not load the bundled image '{name}' offline: {exc}") from exc
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return image[:, :, :3].astype(np.uint8)


def luma(rgb: np.ndarray) -> np.ndarray:
    """The Y plane (float64, 16..235) of an RGB image."""
    return rgb_to_ycbcr(rgb)[..., 0]


def training_pairs(scale: int, patch: int = 17) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, HR Y, LR Y) planes (values / 255) of every training image at every TRAINING_RESCALES factor.

    Each rescaled image is a new HR image (PIL bicubic, antialiased), degraded whole as in evaluation;
    those whose LR side is below `patch` are skipped.
    """
    pairs = []
    for name in TRAINING:
        rgb = load_bundled(name)
        for factor in TRAINING_RESCALES:
            size = (round(rgb.shape[0] * factor), round(rgb.shape[1] * factor))
            hr, lr = degrade(rgb if factor == 1.0 else resize_bicubic(rgb, *size), scale)
            if min(lr.shape[:2]) >= patch:
                pairs.append((f"{name}@{factor:g}", luma(hr) / 255.0, luma(lr) / 255.0))
    return pairs


def patch_calibration(scale: int, count: int, patch: int = 17, seed: int = 0, batch_size: int = 64) -> CalibData:
    """LR/HR Y patch pairs (values / 255) from the training images only (`training_pairs`).

    `count` aligned patches are drawn: a (training image, rescale factor) pair chosen uniformly (an
    area weighting would spend a third of the patches on the mostly black retina and Hubble field), a
    position uniformly inside it. Batches are
    [{"x": [B, 1, patch, patch]}] with targets [B, 1, scale*patch, scale*patch].
    """
    if count < 1 or patch < 1 or batch_size < 1:
        raise ConfigError(f"count, patch and batch_size must be >= 1, got {count}, {patch}, {batch_size}")
    pairs = training_pairs(scale, patch)
    rng = np.random.default_rng(seed)
    x = np.empty((count, 1, patch, patch), dtype=np.float32)
    y = np.empty((count, 1, scale * patch, scale * patch), dtype=np.float32)
    for j, i in enumerate(rng.integers(len(pairs), size=count)):
        _, hr, lr = pairs[i]
        top, left = rng.integers(lr.shape[0] - patch + 1), rng.integers(lr.shape[1] - patch + 1)
        x[j, 0] = lr[top:top + patch, left:left + patch]
        y[j, 0] = hr[scale * top:scale * (top + patch), scale * left:scale * (left + patch)]
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    starts = range(0, count, batch_size)
    return CalibData(f"bundled-train-x{scale}:{count}", [{"x": x[s:s + batch_size]} for s in starts],
                     [y[s:s + batch_size] for s in starts])


def compare_sr(model: torch.nn.Module, rgb: np.ndarray, scale: int, with_ssim: bool = True) -> dict[str, Any]:
    """The evaluation protocol on one HR image: its Y planes (HR, PIL bicubic, model; 8-bit) and the
    PSNR (and SSIM unless `with_ssim` is False) of bicubic and the model against HR, `scale` border
    pixels cropped."""
    hr, lr = degrade(rgb, scale)
    y_hr, y_lr = luma(hr), luma(lr)
    bicubic = to_uint8(resize_bicubic(y_lr, *y_hr.shape))
    sr = to_uint8(upscale_luma(model, y_lr))
    row = {"hr": y_hr, "bicubic": bicubic, "sr": sr,
           "bicubic_psnr": psnr(bicubic, y_hr, scale), "sr_psnr": psnr(sr, y_hr, scale)}
    if with_ssim:
        row.update(bicubic_ssim=ssim(bicubic, y_hr, scale), sr_ssim=ssim(sr, y_hr, scale))
    return row


def held_out_gain(model: torch.nn.Module, scale: int) -> float:
    """Mean Y-PSNR gain in dB of `model` over bicubic on the HELD_OUT images (a learning-curve point)."""
    rows = [compare_sr(model, load_bundled(name), scale, with_ssim=False) for name in HELD_OUT]
    return float(np.mean([r["sr_psnr"] - r["bicubic_psnr"] for r in rows]))




def upscale_luma(model: torch.nn.Module, y_lr: np.ndarray, tile: int | None = TILE) -> np.ndarray:
    """Run a Y-channel model on an LR Y plane (0..255): returns the HR Y plane (float64, unclipped).

    A model with a `halo` attribute (LR pixels on each side that reach an output pixel, e.g. ESPCN)
    runs tile by tile: each `tile` x `tile` LR block with `halo` more pixels of context on every side
    that has any (the image's own border is zero-padded exactly as in one pass), so the result is the
    one-pass result (equal up to float summation order) in bounded memory. tile=None: one pass.
    """
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    plane = torch.from_numpy(np.asarray(y_lr, dtype=np.float32) / 255.0).to(dtype)
    h, w = plane.shape
    halo = getattr(model, "halo", None)
    model.eval()
    if tile is None or halo is None or (h <= tile and w <= tile):
        with torch.no_grad():
            return model(x=plane[None, None])[0, 0].double().numpy() * 255.0
    if tile < 1:
        raise ConfigError(f"tile must be a positive number of LR pixels, got {tile}")
    out: np.ndarray | None = None
    scale = 0
    with torch.no_grad():
        for top in range(0, h, tile):
            for left in range(0, w, tile):
                t0, l0 = max(top - halo, 0), max(left - halo, 0)
                t1, l1 = min(top + tile + halo, h), min(left + tile + halo, w)
                y = model(x=plane[t0:t1, l0:l1].contiguous()[None, None])[0, 0]
                if out is None:
                    scale = y.shape[0] // (t1 - t0)
                    if y.shape != (scale * (t1 - t0), scale * (l1 - l0)):
                        raise ConfigError(f"the model turned a {t1 - t0}x{l1 - l0} tile into "
                                          f"{y.shape[0]}x{y.shape[1]}, not an integer upscale")
                    out = np.empty((scale * h, scale * w))
                bh, bw = min(tile, h - top), min(tile, w - left)
                out[scale * top:scale * (top + bh), scale * left:scale * (left + bw)] = y[
                    scale * (top - t0):scale * (top - t0 + bh), scale * (left - l0):scale * (left - l0 + bw)].double().numpy()
    return out * 255.0


def upscale_rgb(rgb: np.ndarray, model: torch.nn.Module, scale: int, tile: int | None = TILE) -> np.ndarray:
    """Upscale an RGB uint8 image: Y through the model (`upscale_luma`), Cb/Cr bicubic (PIL); uint8.

    Raises:
        ConfigError: the model's output is not `scale` times the input size.
    """
    ycbcr = rgb_to_ycbcr(rgb)
    h, w = ycbcr.shape[:2]
    y = upscale_luma(model, ycbcr[..., 0], tile)
    if y.shape != (scale * h, scale * w):
        raise ConfigError(f"the model turned a {h}x{w} Y plane into {y.shape[0]}x{y.shape[1]}, "
                          f"not the x{scale} size {scale * h}x{scale * w}")
    chroma = [resize_bicubic(ycbcr[..., c], scale * h, scale * w) for c in (1, 2)]
    return to_uint8(ycbcr_to_rgb(np.stack([y] + chroma, axis=-1)))


def upscale_file(in_path: str | Path, out_path: str | Path, model: torch.nn.Module, scale: int,
                 tile: int | None = TILE) -> Path:
    """Upscale an image file (`upscale_rgb`), written atomically.

    Raises:
        SourceError: the input image is missing or corrupt.
        ConfigError: the model's output is not `scale` times the input size.
    """
    return write_image(out_path, upscale_rgb(read_image(in_path), model, scale, tile))
