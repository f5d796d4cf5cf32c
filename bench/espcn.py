"""Benchmark ESPCN (Shi et al. 2016) against bicubic, and the exact deconvolution-to-sub-pixel conversion.

- Quality: PSNR / SSIM on the Y channel (BT.601), `scale` border pixels cropped, on the held-out
  bundled images, bicubic (PIL) vs the shipped ESPCN x2/x3/x4 (edgeslim/models/espcn-x*.slim).
- Speed: ONNX Runtime CPU latency to produce one 1920x1080 output frame (LR 960x540, 640x360, 480x270);
  for x3 the frame's GFLOP/s as a fraction of this machine's fp32 GEMM peak (ORT MatMul, as
  edgeslim.runtime.peak measures it), both timed round by round in this run; tiled vs one pass
  (`edgeslim.images.upscale_luma`): the 8-bit outputs compared pixel by pixel, and peak memory.
- A side-by-side figure (bicubic | ESPCN | original, with PSNR) of the held-out images at x3.
- Conversion: an FSRCNN-style model's ConvTranspose2d replaced by SubPixelConv2d: max output difference
  and ORT latency ratio, both models measured side by side in this run.

Writes bench/results/espcn.json and bench/results/espcn_*.png. `--quick` runs in seconds on tiny
inputs (untrained models when the shipped ones are absent) and writes to a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgeslim import images
from edgeslim.compress import get_compressor
from edgeslim.compress.replace import count_params
from edgeslim.core.sr_models import ESPCN, DeconvSR
from edgeslim.export.onnx import to_onnx
from edgeslim.runtime.machine import machine_info
from edgeslim.runtime.measure import measure
from edgeslim.runtime.peak import time_gemm_ms
from edgeslim.runtime.session import OrtModule, open_session
from edgeslim.core.specs import TensorSpec
from edgeslim.sr_compare import panels

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "edgeslim" / "models"
SCALES = (2, 3, 4)
FRAME = (1080, 1920)  # output height, width
SPEC = [TensorSpec("x", ("batch", 1, "height", "width"))]
PAPER = {"x3_set5_gain_db": 2.6, "source": "Shi et al. 2016, Table 1 (ImageNet training): bicubic 30.39, ESPCN 33.00 dB"}


def load_espcn(scale: int, quick: bool) -> tuple[torch.nn.Module, str]:
    """The shipped ESPCN for `scale` (an untrained one only in --quick mode when it is absent)."""
    from edgeslim import artifact

    path = MODELS / f"espcn-x{scale}.slim"
    if path.is_dir():
        return artifact.load(path).model.eval(), str(path.relative_to(ROOT))
    if not quick:
        raise SystemExit(f"{path} is missing: run python bench/train_espcn.py first")
    torch.manual_seed(0)
    return ESPCN(scale).eval(), "untrained (quick mode)"


def quality(model: torch.nn.Module, scale: int, crop: int | None) -> tuple[list[dict], dict]:
    """Per held-out image PSNR/SSIM of bicubic and the model, plus the RGB images for the figure."""
    rows, example = [], {}
    for name in images.HELD_OUT:
        rgb = images.load_bundled(name)
        if crop:
            rgb = rgb[:crop, :crop]
        r = images.compare_sr(model, rgb, scale)
        rows.append({"image": name, "size": list(r["hr"].shape), "bicubic_psnr": r["bicubic_psnr"],
                     "espcn_psnr": r["sr_psnr"], "bicubic_ssim": r["bicubic_ssim"], "espcn_ssim": r["sr_ssim"]})
        hr, lr = images.degrade(rgb, scale)
        example[name] = panels(lr, images.upscale_rgb(lr, model, scale), scale, "ESPCN", hr)
    return rows, example


def frame_flops(model: torch.nn.Module, lr: tuple[int, int]) -> float:
    """Multiply-adds x 2 of one ESPCN pass on an LR frame (every conv, 'same' padding)."""
    macs = sum(m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
               for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return 2.0 * macs * lr[0] * lr[1]


def peak_fraction(model: torch.nn.Module, scale: int, folder: Path, frame: tuple[int, int], rounds: int,
                  threads: int, gemm: int) -> dict:
    """ESPCN frame GFLOP/s over the fp32 GEMM peak, interleaved round by round; tiled vs one pass."""
    lr = (frame[0] // scale, frame[1] // scale)
    export = to_onnx(model, SPEC, folder / "peak.onnx", dims={"batch": 1, "height": 24, "width": 20})
    net = OrtModule(export.path)
    net.halo = model.halo
    y_lr = np.random.default_rng(0).random(lr) * 219 + 16
    tile = max(lr[0] // 2, 8)  # several tiles per frame
    runs = {"gemm_ms": [], "ort_one_pass_ms": [], "ort_tiled_ms": [], "torch_one_pass_ms": []}
    calls = {"ort_one_pass_ms": lambda: images.upscale_luma(net, y_lr, None),
             "ort_tiled_ms": lambda: images.upscale_luma(net, y_lr, tile),
             "torch_one_pass_ms": lambda: images.upscale_luma(model, y_lr, None)}
    for call in calls.values():
        call()  # warm-up
    for _ in range(rounds):
        runs["gemm_ms"].append(time_gemm_ms(gemm, gemm, gemm, threads, repeats=2))
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            runs[key].append(1e3 * (time.perf_counter() - start))
    peak = max(2 * gemm ** 3 / ms / 1e6 for ms in runs["gemm_ms"])
    flops = frame_flops(model, lr)
    out = {"lr_frame": list(lr), "gflop_per_frame": flops / 1e9, "gemm_size": gemm, "rounds": rounds,
           "fp32_gemm_peak_gflops": peak, "timings_ms": runs}
    for key in calls:
        best = min(runs[key])
        out[key.replace("_ms", "")] = {"best_ms": best, "gflops": flops / best / 1e6,
                                       "fraction_of_peak": flops / best / 1e6 / peak}
    one, tiled = images.to_uint8(calls["ort_one_pass_ms"]()), images.to_uint8(calls["ort_tiled_ms"]())
    out["tiling"] = {"tile_lr": tile, "halo_lr": model.halo, "pixels_differing_8bit": int((one != tiled).sum()),
                     "max_abs_diff_8bit": int(np.abs(one.astype(int) - tiled.astype(int)).max())}
    out["goal_80pct_of_peak_met"] = out["ort_one_pass"]["fraction_of_peak"] >= 0.8
    return out


MEMORY_SNIPPET = """
import sys, numpy as np, torch
from edgeslim import images
from edgeslim.sources import load_model
torch.set_num_threads(int(sys.argv[3]))
model = load_model(sys.argv[1]).model
side = int(sys.argv[2])
images.upscale_luma(model, np.full((side, side), 128.0), None if sys.argv[4] == "0" else int(sys.argv[4]))
# VmHWM: this process' own peak (ru_maxrss keeps the parent's peak across fork and exec on Linux)
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def peak_memory(name: str, side: int, tile: int, threads: int) -> float:
    """Peak resident MB of a fresh process upscaling a side x side LR plane (tile 0: one pass)."""
    out = subprocess.run([sys.executable, "-c", MEMORY_SNIPPET, name, str(side), str(threads), str(tile)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def ort_latency(model: torch.nn.Module, scale: int, folder: Path, tag: str, frame: tuple[int, int],
                iters: int) -> dict:
    """Export to ONNX (validated against PyTorch) and time one output frame in ONNX Runtime on the CPU."""
    h, w = frame[0] // scale, frame[1] // scale
    export = to_onnx(model, SPEC, folder / f"{tag}.onnx", dims={"batch": 1, "height": 24, "width": 20})
    feeds = {"x": np.random.default_rng(0).random((1, 1, h, w), dtype=np.float32)}
    session = open_session(export.path, "cpu-ort-fp32")
    try:
        timing = measure(session, feeds, warmup=2, iters=iters)
        output = next(iter(session.run(feeds).values()))
    finally:
        session.close()
    return {"lr_input": [h, w], "p50_ms": timing.p50_ms, "p90_ms": timing.p90_ms, "cv": timing.cv,
            "unstable": timing.unstable, "onnx_bytes": export.file_bytes,
            "export_max_abs_diff": max(export.max_abs_diff.values()), "output": output}


def conversion(scale: int, folder: Path, frame: tuple[int, int], iters: int) -> dict:
    """DeconvSR before/after `deconv_to_subpixel`: output difference and ORT latency, side by side."""
    torch.manual_seed(0)
    before = DeconvSR(scale).eval()
    result = get_compressor("deconv_to_subpixel").compress(before, {})
    after = result.model.eval()
    x = torch.rand(1, 1, frame[0] // scale, frame[1] // scale, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch_diff = (before(x=x) - after(x=x)).abs().max().item()
    ort_before = ort_latency(before, scale, folder, f"deconv-x{scale}", frame, iters)
    ort_after = ort_latency(after, scale, folder, f"subpixel-x{scale}", frame, iters)
    ort_diff = float(np.abs(ort_before.pop("output") - ort_after.pop("output")).max())
    return {"scale": scale, "params_before": count_params(before), "params_after": count_params(after),
            "layer": result.changes[0].to_dict(), "torch_max_abs_diff": torch_diff, "ort_max_abs_diff": ort_diff,
            "deconv": ort_before, "subpixel": ort_after,
            "latency_ratio_subpixel_over_deconv": ort_after["p50_ms"] / ort_before["p50_ms"]}


def plot(results: dict, examples: dict, out: Path) -> list[str]:
    """Bar chart of mean PSNR per scale, and a visual crop at x3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    means = results["summary"]
    xs = np.arange(len(means))
    ax.bar(xs - 0.2, [m["bicubic_psnr"] for m in means], 0.4, label="bicubic")
    ax.bar(xs + 0.2, [m["espcn_psnr"] for m in means], 0.4, label="ESPCN (ours)")
    ax.set_xticks(xs, [f"x{m['scale']}" for m in means])
    ax.set_ylabel("mean Y PSNR (dB), held-out images")
    ax.set_ylim(min(m["bicubic_psnr"] for m in means) - 2, max(m["espcn_psnr"] for m in means) + 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "espcn_psnr.png", dpi=120)
    plt.close(fig)
    ex = examples[3 if 3 in examples else min(examples)]
    fig, axes = plt.subplots(len(ex), 3, figsize=(8, 2.8 * len(ex)), squeeze=False)
    for row, (name, items) in zip(axes, ex.items()):
        for axis, (title, img) in zip(row, items):
            axis.imshow(img)
            axis.set_title(f"{name}: {title}", fontsize=8)
            axis.axis("off")
    fig.suptitle("held-out images, x3 (centre crops; PSNR on the whole image, Y channel)")
    fig.tight_layout()
    fig.savefig(out / "espcn_crops.png", dpi=110)
    plt.close(fig)
    return ["espcn_psnr.png", "espcn_crops.png"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny inputs, few timings, temporary output folder")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results; a temp folder with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or (Path(tempfile.mkdtemp(prefix="espcn-bench-")) if args.quick else ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    frame, iters, crop = ((108, 192), 2, 96) if args.quick else (FRAME, 10, None)
    start = time.time()
    results: dict = {"held_out_images": list(images.HELD_OUT), "training_images": list(images.TRAINING),
                     "protocol": "HR cropped to a multiple of the scale, PIL bicubic downscale (antialiased) of "
                                 "the RGB image; Y of BT.601 studio-range YCbCr, outputs rounded to 8 bits; "
                                 "PSNR/SSIM (11x11 Gaussian, sigma 1.5) with `scale` border pixels cropped; "
                                 "bicubic baseline = PIL bicubic upscale of the LR Y plane",
                     "paper": PAPER, "quick": args.quick, "output_frame": list(frame), "per_image": [], "summary": [],
                     "latency": [], "conversion": [],
                     "gpu": "CUDA device present" if torch.cuda.is_available() else
                            "no CUDA device in this run: GPU timing not measured",
                     "machine": {"torch_threads": args.threads, "ort_profile": "cpu-ort-fp32",
                                 "load_avg_1min_at_start": os.getloadavg()[0]},
                     "machine_info": machine_info(),
                     "goals_gain_db": {"2": 1.6, "3": 1.2, "4": 0.9}}
    examples = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scale in SCALES:
            model, origin = load_espcn(scale, args.quick)
            rows, examples[scale] = quality(model, scale, crop)
            results["per_image"] += [{"scale": scale, **r} for r in rows]
            results["summary"].append({"scale": scale, "model": origin, "params": count_params(model),
                                       **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]
                                          if k.endswith(("psnr", "ssim"))}})
            latency = ort_latency(model, scale, Path(tmp), f"espcn-x{scale}", frame, iters)
            latency.pop("output")
            results["latency"].append({"scale": scale, "model": "espcn", **latency})
            results["conversion"].append(conversion(scale, Path(tmp), frame, iters))
            if scale == 3:
                results["peak_1080p"] = peak_fraction(model, scale, Path(tmp), frame, 3 if args.quick else 7,
                                                      args.threads, 256 if args.quick else 2048)
    # x3 in torch: tiled at a 12-megapixel output; one pass only at 3 megapixels (12 took 10 GB before tiling)
    big, small = (64, 32) if args.quick else (1155, 577)
    results["memory_mb"] = {"scale": 3, "tile_lr": images.TILE,
                            "tiled": {"output_megapixels": (3 * big) ** 2 / 1e6,
                                      "peak_rss_mb": peak_memory("espcn-x3", big, images.TILE, args.threads)},
                            "one_pass": {"output_megapixels": (3 * small) ** 2 / 1e6,
                                         "peak_rss_mb": peak_memory("espcn-x3", small, 0, args.threads)},
                            "baseline": {"output_megapixels": (3 * 8) ** 2 / 1e6, "what": "imports and model load",
                                         "peak_rss_mb": peak_memory("espcn-x3", 8, 0, args.threads)}}
    for run in ("tiled", "one_pass"):
        run_mb = results["memory_mb"][run]
        run_mb["above_baseline_mb"] = run_mb["peak_rss_mb"] - results["memory_mb"]["baseline"]["peak_rss_mb"]
    for row in results["summary"]:
        gain = row["espcn_psnr"] - row["bicubic_psnr"]
        row["gain_db"] = gain
        row["goal_met"] = gain >= results["goals_gain_db"][str(row["scale"])]
    results["figures"] = plot(results, examples, out)
    results["seconds"] = time.time() - start
    (out / "espcn.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    p = results["peak_1080p"]
    print(f"1080p x3: {p['gflop_per_frame']:.1f} GFLOP/frame; GEMM peak {p['fp32_gemm_peak_gflops']:.1f} GFLOP/s; "
          + "; ".join(f"{k} {p[k]['best_ms']:.0f} ms = {p[k]['fraction_of_peak']:.0%}"
                      for k in ("ort_one_pass", "ort_tiled", "torch_one_pass"))
          + f"; tiled vs one pass: {p['tiling']['pixels_differing_8bit']} pixels differ; memory {results['memory_mb']}")
    print(f"results: {out / 'espcn.json'}")


def table(results: dict) -> str:
    """Markdown tables of quality, latency and conversion."""
    lines = ["| scale | params | bicubic PSNR / SSIM | ESPCN PSNR / SSIM | gain dB | ORT 1080p p50 ms |",
             "|---|---|---|---|---|---|"]
    for s, lat in zip(results["summary"], results["latency"]):
        lines.append(f"| x{s['scale']} | {s['params']:,} | {s['bicubic_psnr']:.2f} / {s['bicubic_ssim']:.4f} | "
                     f"{s['espcn_psnr']:.2f} / {s['espcn_ssim']:.4f} | {s['espcn_psnr'] - s['bicubic_psnr']:+.2f} | "
                     f"{lat['p50_ms']:.1f} |")
    lines += ["", "| scale | deconv p50 ms | sub-pixel p50 ms | ratio | max abs diff torch / ORT |", "|---|---|---|---|---|"]
    for c in results["conversion"]:
        lines.append(f"| x{c['scale']} | {c['deconv']['p50_ms']:.1f} | {c['subpixel']['p50_ms']:.1f} | "
                     f"{c['latency_ratio_subpixel_over_deconv']:.2f} | "
                     f"{c['torch_max_abs_diff']:.1e} / {c['ort_max_abs_diff']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
