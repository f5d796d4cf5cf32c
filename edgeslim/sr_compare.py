"""Side-by-side crops a person can look at: bicubic | super-resolved | the reference, with Y-PSNR.

`edgeslim upscale IN -o OUT --compare SIDE.png [--reference HR.png]` writes one; bench/espcn.py
writes the same for the held-out images. PSNR follows the evaluation protocol of edgeslim.images
(Y of BT.601, `scale` border pixels cropped), on the whole image, not only the crop shown.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeslim.core.errors import ConfigError, require
from edgeslim.images import luma, psnr, resize_bicubic, write_image

CROP = 192  # side of the crop shown per panel (output pixels)
LABEL = 18  # height of the caption strip above each panel


def centre_crop(image: np.ndarray, size: int = CROP) -> np.ndarray:
    """The centre `size` x `size` block (the whole image where it is smaller)."""
    h, w = image.shape[:2]
    top, left = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return image[top:top + size, left:left + size]


def fit_reference(reference: np.ndarray, height: int, width: int) -> np.ndarray:
    """The reference cropped to the output size, as the protocol crops HR to a multiple of the scale.

    Raises:
        ConfigError: the reference is smaller than the output, or larger by more than it can be.
    """
    rh, rw = reference.shape[:2]
    if not (height <= rh < 2 * height and width <= rw < 2 * width):
        raise ConfigError(f"the reference is {rh}x{rw} but the upscaled image is {height}x{width}: give the "
                          f"high-resolution original the input was made from")
    if (rh, rw) != (height, width):
        import warnings

        warnings.warn(f"the reference is {rh}x{rw}, the upscaled image {height}x{width}: the PSNR is taken on the "
                      f"reference's top-left {height}x{width} (the protocol crops HR to a multiple of the scale)",
                      stacklevel=2)
    return reference[:height, :width]


def panels(lr: np.ndarray, sr: np.ndarray, scale: int, model_name: str,
           reference: np.ndarray | None = None) -> list[tuple[str, np.ndarray]]:
    """(caption, RGB crop) of bicubic, the model and the reference (with PSNR when there is one)."""
    h, w = sr.shape[:2]
    bicubic = resize_bicubic(lr, h, w)
    images = [("bicubic", bicubic), (model_name, sr)]
    if reference is None:
        return [(title, centre_crop(img)) for title, img in images]
    ref = fit_reference(reference, h, w)
    y_ref = luma(ref)
    out = [(f"{title} {psnr(luma(img), y_ref, scale):.2f} dB", centre_crop(img)) for title, img in images]
    return out + [("reference", centre_crop(ref))]


def side_by_side(items: list[tuple[str, np.ndarray]], path: str | Path, gap: int = 4) -> Path:
    """Write the captioned crops in one row (an image file, atomically)."""
    pil = require("PIL.Image", "data", "drawing the comparison image")
    draw_mod = require("PIL.ImageDraw", "data", "drawing the comparison image")

    if not items:
        raise ConfigError("side_by_side needs at least one panel")
    height = max(img.shape[0] for _, img in items) + LABEL
    width = sum(img.shape[1] for _, img in items) + gap * (len(items) - 1)
    canvas = pil.new("RGB", (width, height), (255, 255, 255))
    draw = draw_mod.Draw(canvas)
    left = 0
    for title, img in items:
        canvas.paste(pil.fromarray(np.ascontiguousarray(img), "RGB"), (left, LABEL))
        draw.text((left + 2, 3), title, fill=(0, 0, 0))
        left += img.shape[1] + gap
    return write_image(path, np.asarray(canvas))
