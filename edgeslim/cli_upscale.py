"""`edgeslim upscale`: an image (a file or a bundled sample) through a super-resolution model."""
from __future__ import annotations

from pathlib import Path

import click

from edgeslim.cli_options import console as _console, not_empty, trust_of, trust_options
from edgeslim.core.errors import ConfigError
from edgeslim.defaults import TILE as TILE_DEFAULT


@click.command()
@click.argument("image", metavar="IMAGE|sample:NAME")
@click.option("-o", "--out", callback=not_empty, required=True, help="output image file")
@click.option("--model", default="espcn-x3", show_default=True, help="zoo name (edgeslim list models) or a .slim artifact")
@click.option("--compare", "compare", is_flag=False, flag_value="", default=None, metavar="SIDE.png",
              help="also write a side-by-side crop: bicubic | model | reference (default name OUT-compare.png)")
@click.option("--reference", metavar="HR.png|sample:NAME",
              help="the high-resolution original IMAGE was made from: --compare shows it, and each Y-PSNR is printed")
@click.option("--runtime", type=click.Choice(["onnxruntime", "torch"]), default="onnxruntime", show_default=True,
              help="engine for the model (ONNX Runtime is the fast one on CPUs)")
@click.option("--tile", default=TILE_DEFAULT, show_default=True,
              help="LR tile side for models with a known receptive field (bounded memory; 0: one pass)")
@trust_options
def upscale(image: str, out: str, model: str, compare: str | None, reference: str | None, runtime: str, tile: int,
            trusted: str | None, trust_source: bool) -> None:
    """Upscale an image (a file, or sample:NAME for a bundled photograph such as sample:astronaut): the Y
    channel through the model, Cb/Cr bicubic."""
    from edgeslim.core.files import IMAGE, check_not_input, check_output
    from edgeslim.images import read_any_image, upscale_rgb, write_image
    from edgeslim.pipeline import runnable
    from edgeslim.sources import load_model, sr_scale

    trust = trust_of(trusted, trust_source)
    side = None if compare is None else compare or str(Path(out).with_name(f"{Path(out).stem}-compare.png"))
    for dest in (out, side) if side is not None else (out,):
        check_output(dest, IMAGE)
        for given in (image, reference, model):
            if given is not None:
                check_not_input(dest, given)
    if side is not None and Path(side).resolve() == Path(out).resolve():
        raise ConfigError(f"--compare {side} is the output image itself; name another file")
    if reference is not None and side is None:
        raise ConfigError("--reference is shown by --compare: add --compare SIDE.png")
    if tile < 0:
        raise ConfigError(f"--tile must be >= 0 (0: one pass), got {tile}")
    ref = read_any_image(reference) if reference is not None else None
    lr = read_any_image(image)
    loaded = load_model(model, trust=trust)
    from edgeslim.catalog import ZOO
    shipped = ZOO[model].shipped if model in ZOO and not Path(model).is_dir() else None  # as load_model resolves it
    net = runnable(loaded, onnx=runtime == "onnxruntime",  # an INT8 artifact always runs its QDQ graph in ORT
                   folder=shipped or Path(model))  # an artifact's export is made once, kept by its hash
    scale = sr_scale(net)
    sr = upscale_rgb(lr, net, scale, tile or None)
    write_image(out, sr)
    console = _console()
    console.print(f"wrote {out} (x{scale} with {model}, {runtime})")
    if side is not None:
        from edgeslim.sr_compare import panels, side_by_side
        shown = panels(lr, sr, scale, Path(model).name.removesuffix(".slim"), ref)
        side_by_side(shown, side)
        console.print(f"wrote {side} (bicubic | {model}{' | reference, Y-PSNR' if ref is not None else ''})")
        for caption, _ in shown[:2] if ref is not None else ():
            console.print(f"Y-PSNR against the reference: {caption}")
