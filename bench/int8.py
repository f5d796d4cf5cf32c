"""Benchmark: INT8 (edgeslim's NNCF stage) vs fp32, vs ONNX Runtime's quantize_static, and after ASVD.

- ESPCN x3 (shipped, tanh) and a ReLU ESPCN x3 trained the same way for a short run: PSNR on the
  held-out bundled images, ORT CPU latency for one 1080p output frame (input 360 x 640). The tanh
  model with edgeslim's tanh table (compress/int8_chains.py, the default) and with NNCF's own
  placement (`tanh_table=false`, where every Conv stays fp32 behind Q/DQ).
- ORT kernel time by op type (runtime/op_profile.py) of every variant: which ops run in INT8.
- MiniLM-L6 sentence encoder on BBC News: a logistic-regression probe fitted on fp32 embeddings of
  training articles, its test accuracy with fp32 / INT8 (preset auto = mixed: uint8 activations) /
  INT8 preset performance (int8 activations) / ASVD / ASVD+INT8 embeddings, cosine to fp32,
  ORT latency at batch 8, sequence 128. (The fine-tuned classifier of bench/lowrank_minilm.py is not
  cached on this machine and fine-tuning it does not fit the time box; the probe stands in for it.)
- EfficientNet-Lite0: top-1 agreement with fp32 on crops of the bundled images.
Latencies of the variants of one model are timed in alternating rounds (the CPU is shared).

    python bench/int8.py            # subsampled full run (~20 min on 2 loaded cores), writes bench/results/
    python bench/int8.py --quick    # tiny ESPCN + tiny BERT, used by a test
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from edgeslim import images  # noqa: E402
from edgeslim.core.calib import CalibData  # noqa: E402
from edgeslim.compress.base import CompressContext, get_compressor  # noqa: E402
from edgeslim.export.onnx import to_onnx  # noqa: E402
from edgeslim.core.files import JSON, replace_output  # noqa: E402
from edgeslim.runtime.machine import machine_info  # noqa: E402
from edgeslim.runtime.measure import measure  # noqa: E402
from edgeslim.runtime.op_profile import op_breakdown  # noqa: E402
from edgeslim.runtime.session import OrtModule, open_session  # noqa: E402
from edgeslim.sources import load_model  # noqa: E402
from edgeslim.core.specs import TensorSpec  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SPEC = [TensorSpec("x", ("batch", 1, "height", "width"))]
FULL = dict(frame=(1080, 1920), relu_steps=400, calib_patches=256, rounds=3, iters=4, crop=None,
            text_model="minilm", train_docs=240, test_docs=160, text_batch=8, asvd_ratio=0.5,
            effnet=True, effnet_crops=48, effnet_rounds=5, effnet_iters=30,  # a 12 ms model: more iterations
            espcn_rounds=7, espcn_iters=8)  # 100 ms a call: 3 x 4 moved its ratios by 15% between runs
QUICK = dict(frame=(72, 96), relu_steps=3, calib_patches=64, rounds=1, iters=2, crop=96,
             text_model="tiny-bert", train_docs=24, test_docs=16, text_batch=4, asvd_ratio=0.5,
             effnet=False, effnet_crops=0)
PARTS = ("espcn", "text", "effnet")


def int8_onnx(loaded, calib: CalibData, fp32_path: Path, out: Path, **config) -> tuple[Path, dict]:
    """edgeslim's int8 step on `loaded`, its ONNX stage applied to the exported `fp32_path`."""
    comp = get_compressor("int8")
    context = CompressContext(inputs=tuple(loaded.inputs), task=loaded.task)
    result = comp.compress(loaded.model, comp.make_config(config), calib, context=context)
    comp.onnx_stage(result.resolved, fp32_path, out, context)
    worst = sorted((c for c in result.changes if c.rel_error is not None), key=lambda c: -c.rel_error)[:3]
    return out, {"worst_layers": [{"name": c.name, "rel_error": c.rel_error} for c in worst],
                 "quantized_layers": sum(c.status == "quantized" for c in result.changes)}


def ort_static(fp32_path: Path, calib: CalibData, out: Path) -> Path:
    """ONNX Runtime's own quantize_static (QDQ, per-channel weights) after quant_pre_process."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{k: v.numpy() for k, v in b.items()} for b in calib.batches])

        def get_next(self):
            return next(self.it, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return out


def interleaved(paths: dict[str, Path], feeds: dict, rounds: int, iters: int) -> dict[str, float]:
    """Median over alternating rounds of each file's p50 (ms) in ORT CPU (cpu-ort-fp32 settings)."""
    sessions = {k: open_session(p, "cpu-ort-fp32") for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in paths}
    try:
        for _ in range(rounds):
            for k, s in sessions.items():
                times[k].append(measure(s, feeds, warmup=1, iters=iters).p50_ms)
    finally:
        for s in sessions.values():
            s.close()
    return {k: statistics.median(v) for k, v in times.items()}


def op_shares(paths: dict[str, Path], feeds: dict) -> dict[str, dict[str, float]]:
    """Share of ORT kernel time per op type (2 threads, one profiled run after a warm-up), top 6."""
    return {k: {op: round(v, 4) for op, v in list(op_breakdown(p, feeds, iters=1, threads=2).items())[:6]}
            for k, p in paths.items()}


def espcn_psnr(model: torch.nn.Module, crop: int | None) -> float:
    vals = []
    for name in images.HELD_OUT:
        rgb = images.load_bundled(name)
        rgb = rgb[:crop, :crop] if crop else rgb
        hr, lr = images.degrade(rgb, 3)
        y_hr = images.luma(hr)
        vals.append(images.psnr(images.to_uint8(images.upscale_luma(model, images.luma(lr))), y_hr, 3))
    return float(np.mean(vals))


def espcn_part(cfg: dict, tmp: Path) -> dict:
    from edgeslim.sr_train import train_espcn
    calib = images.patch_calibration(3, cfg["calib_patches"], batch_size=32)
    calib = CalibData("sr-patches", calib.batches)
    shipped = load_model("espcn-x3")
    relu = train_espcn(3, cfg["relu_steps"], seed=0, activation="relu").model.eval()
    variants = {"tanh": shipped.model, "relu": relu}
    out: dict = {"relu_steps": cfg["relu_steps"], "calib_patches": cfg["calib_patches"], "models": {}}
    h, w = cfg["frame"][0] // 3, cfg["frame"][1] // 3
    feeds = {"x": np.random.default_rng(0).random((1, 1, h, w), dtype=np.float32)}
    paths: dict[str, Path] = {}
    for act, model in variants.items():
        loaded = shipped if act == "tanh" else type(shipped)(model, shipped.source, shipped.inputs, shipped.task,
                                                             shipped.dims)
        fp32 = to_onnx(model, SPEC, tmp / f"espcn-{act}.onnx", dims={"batch": 1, "height": 24, "width": 20}).path
        q, info = int8_onnx(loaded, calib, fp32, tmp / f"espcn-{act}-int8.onnx")
        peer = ort_static(fp32, calib, tmp / f"espcn-{act}-ortq.onnx")
        row = {"int8": info}
        tags = [("fp32", fp32), ("int8", q), ("ort_quantize_static", peer)]
        if act == "tanh":  # NNCF's own placement, for comparison
            tags.append(("int8_nncf_placement",
                         int8_onnx(loaded, calib, fp32, tmp / "espcn-tanh-nncf.onnx", tanh_table=False, quantize_output=False,
                                   overflow_fix="disable")[0]))  # every Conv in fp32 in ORT: 8-bit weights
        for tag, p in tags:
            net = model if tag == "fp32" else OrtModule(p)
            row[f"{tag}_psnr"] = espcn_psnr(net, cfg["crop"])
            row[f"{tag}_bytes"] = p.stat().st_size
            paths[f"{act}/{tag}"] = p
        out["models"][act] = row
        print(f"ESPCN {act}: PSNR fp32 {row['fp32_psnr']:.3f} int8 {row['int8_psnr']:.3f} "
              f"ort {row['ort_quantize_static_psnr']:.3f} dB", flush=True)
    lat = interleaved(paths, feeds, cfg.get("espcn_rounds", cfg["rounds"]), cfg.get("espcn_iters", cfg["iters"]))
    for key, ms in lat.items():
        act, tag = key.split("/")
        out["models"][act][f"{tag}_p50_ms"] = ms
    out["op_shares"] = op_shares(paths, feeds)
    for act, row in out["models"].items():
        row["int8_speedup"] = row["fp32_p50_ms"] / row["int8_p50_ms"]
        row["ort_speedup"] = row["fp32_p50_ms"] / row["ort_quantize_static_p50_ms"]
        if "int8_nncf_placement_p50_ms" in row:
            row["int8_nncf_placement_speedup"] = row["fp32_p50_ms"] / row["int8_nncf_placement_p50_ms"]
            row["int8_nncf_placement_psnr_drop_db"] = row["fp32_psnr"] - row["int8_nncf_placement_psnr"]
        row["int8_psnr_drop_db"] = row["fp32_psnr"] - row["int8_psnr"]
        print(f"ESPCN {act} 1080p: fp32 {row['fp32_p50_ms']:.1f} ms, int8 x{row['int8_speedup']:.2f}, "
              f"ort quantize_static x{row['ort_speedup']:.2f}", flush=True)
    out["frame"], out["lr_input"] = list(cfg["frame"]), [h, w]
    return out


def text_part(cfg: dict, tmp: Path) -> dict:
    from sklearn.linear_model import LogisticRegression

    from edgeslim.data import bbc_news_split
    loaded = load_model(cfg["text_model"])
    split = bbc_news_split(0)
    train, test = split["train"][:cfg["train_docs"]], split["test"][:cfg["test_docs"]]
    def enc(docs):  # the model's own tokenizer (MiniLM: padded to 128 tokens)
        return [loaded.encode([t for t, _ in docs[i:i + 16]]) for i in range(0, len(docs), 16)]

    train_b, test_b = enc(train), enc(test)
    calib = CalibData("bbc-news", train_b[:4])
    fp32 = to_onnx(loaded.model, loaded.inputs, tmp / "text.onnx").path
    q, qinfo = int8_onnx(loaded, calib, fp32, tmp / "text-int8.onnx", model_type="transformer")
    qp, _ = int8_onnx(loaded, calib, fp32, tmp / "text-int8-perf.onnx", model_type="transformer", preset="performance")
    asvd = get_compressor("asvd").compress(loaded.model, {"ratio": cfg["asvd_ratio"], "align": 8,
                                                          "target": r".*encoder\.layer\.\d+\..*"}, calib)
    small = type(loaded)(asvd.model.eval(), loaded.source, loaded.inputs, loaded.task, loaded.dims)
    small_path = to_onnx(small.model, loaded.inputs, tmp / "text-asvd.onnx").path
    sq, _ = int8_onnx(small, calib, small_path, tmp / "text-asvd-int8.onnx", model_type="transformer")
    paths = {"fp32": fp32, "int8": q, "int8_performance": qp, "asvd": small_path, "asvd+int8": sq}

    def embed(path: Path, batches) -> np.ndarray:
        net = OrtModule(path)
        return np.concatenate([net(**b).numpy() for b in batches])

    ref_train, ref_test = embed(fp32, train_b), embed(fp32, test_b)
    y_train = np.array([y for _, y in train])
    y_test = np.array([y for _, y in test])
    probe = LogisticRegression(max_iter=2000).fit(ref_train, y_train)
    rows = {}
    for tag, p in paths.items():
        e = ref_test if tag == "fp32" else embed(p, test_b)
        cos = (e * ref_test).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(ref_test, axis=1))
        rows[tag] = {"probe_accuracy": float((probe.predict(e) == y_test).mean()),
                     "cosine_to_fp32": float(cos.mean()), "onnx_bytes": p.stat().st_size}
    feeds = {k: v[:cfg["text_batch"]].numpy() for k, v in test_b[0].items()}
    lat = interleaved(paths, feeds, cfg["rounds"], cfg["iters"])
    for tag, ms in lat.items():
        rows[tag]["p50_ms"] = ms
        rows[tag]["speedup_vs_fp32"] = lat["fp32"] / ms
    shares = op_shares({k: paths[k] for k in ("fp32", "int8", "int8_performance")}, feeds)
    for tag, r in rows.items():
        print(f"{cfg['text_model']} {tag}: probe accuracy {r['probe_accuracy']:.4f}, cosine {r['cosine_to_fp32']:.4f}, "
              f"p50 {r['p50_ms']:.1f} ms (x{r['speedup_vs_fp32']:.2f})", flush=True)
    return {"model": cfg["text_model"], "train_docs": len(train), "test_docs": len(test),
            "seq": int(feeds["input_ids"].shape[1]),
            "batch": cfg["text_batch"], "asvd_ratio": cfg["asvd_ratio"], "int8": qinfo, "rows": rows,
            "op_shares": shares}


def effnet_part(cfg: dict, tmp: Path) -> dict:
    loaded = load_model("efficientnet-lite0")
    rng = np.random.default_rng(0)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    crops = []
    for i in range(cfg["effnet_crops"]):
        img = images.load_bundled(images.BUNDLED_IMAGES[i % len(images.BUNDLED_IMAGES)])
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, 2)
        hgt, wid = img.shape[:2]
        s = min(hgt, wid, 224 + int(rng.integers(0, 64)))
        y0, x0 = int(rng.integers(0, hgt - s + 1)), int(rng.integers(0, wid - s + 1))
        c = torch.from_numpy(np.ascontiguousarray(img[y0:y0 + s, x0:x0 + s, :3])).float().permute(2, 0, 1)[None]
        c = torch.nn.functional.interpolate(c / (255.0 if c.max() > 1.5 else 1.0), size=(224, 224), mode="bilinear")
        crops.append(((c[0].numpy().transpose(1, 2, 0) - mean) / std).transpose(2, 0, 1).astype(np.float32))
    x = torch.from_numpy(np.stack(crops))
    calib = CalibData("bundled-crops", [{"x": x[i:i + 8]} for i in range(0, len(x), 8)])
    fp32 = to_onnx(loaded.model, loaded.inputs, tmp / "effnet.onnx", dims={"batch": 1}).path
    q, info = int8_onnx(loaded, calib, fp32, tmp / "effnet-int8.onnx")
    ref = OrtModule(fp32)(x=x).numpy()
    out = OrtModule(q)(x=x).numpy()
    lat = interleaved({"fp32": fp32, "int8": q}, {"x": x[:1].numpy()}, cfg.get("effnet_rounds", cfg["rounds"]),
                      cfg.get("effnet_iters", cfg["iters"]))
    shares = op_shares({"fp32": fp32, "int8": q}, {"x": x[:1].numpy()})
    row = {"crops": len(x), "top1_agreement": float((ref.argmax(1) == out.argmax(1)).mean()),
           "fp32_bytes": fp32.stat().st_size, "int8_bytes": q.stat().st_size, "fp32_p50_ms": lat["fp32"],
           "int8_p50_ms": lat["int8"], "int8_speedup": lat["fp32"] / lat["int8"], "int8": info, "op_shares": shares,
           "note": "calibrated and evaluated on the same crops (no other images are bundled)"}
    print(f"EfficientNet-Lite0: top-1 agreement {row['top1_agreement']:.3f}, int8 x{row['int8_speedup']:.2f}", flush=True)
    return row


def goals(summary: dict) -> dict:
    out = {}
    esp = summary.get("espcn", {}).get("models", {})
    for act, r in esp.items():
        out[f"espcn_{act}_within_0.1dB"] = r["int8_psnr_drop_db"] <= 0.1
        out[f"espcn_{act}_1.5x_at_1080p"] = r["int8_speedup"] >= 1.5
    text = summary.get("text", {}).get("rows", {})
    if text:
        out["minilm_2x_at_batch8"] = text["int8"]["speedup_vs_fp32"] >= 2.0
        out["minilm_le_1pt_drop"] = text["fp32"]["probe_accuracy"] - text["int8"]["probe_accuracy"] <= 0.01
    eff = summary.get("efficientnet_lite0", {})
    if "top1_agreement" in eff:
        out["efficientnet_int8_faster"] = eff["int8_speedup"] > 1.0
    return out


def plot(summary: dict, out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    esp = summary["espcn"]["models"]
    labels, speed, drop = [], [], []
    for act, r in esp.items():
        for tag in ("int8", "int8_nncf_placement", "ort_quantize_static"):
            if f"{tag}_p50_ms" not in r:
                continue
            labels.append(f"{act}\n" + {"int8": "edgeslim", "int8_nncf_placement": "NNCF place", "ort_quantize_static": "ORT qs"}[tag])
            speed.append(r["fp32_p50_ms"] / r[f"{tag}_p50_ms"])
            drop.append(r["fp32_psnr"] - r[f"{tag}_psnr"])
    axes[0].bar(labels, speed, color="tab:blue")
    axes[0].axhline(1.5, ls="--", c="k", lw=0.8)
    axes[0].set_title("ESPCN x3 1080p: speedup over fp32 (ORT CPU)")
    axes[1].bar(labels, drop, color="tab:orange")
    axes[1].axhline(0.1, ls="--", c="k", lw=0.8)
    axes[1].set_title("PSNR lost vs fp32 (dB, held-out images)")
    fig.tight_layout()
    fig.savefig(out / "int8_espcn.png", dpi=110)
    plt.close(fig)
    if "text" in summary:
        rows = summary["text"]["rows"]
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for tag, r in rows.items():
            ax.scatter(r["p50_ms"], 100 * r["probe_accuracy"], s=40)
            ax.annotate(tag, (r["p50_ms"], 100 * r["probe_accuracy"]))
        ax.set_xlabel(f"ORT p50 ms (batch {summary['text']['batch']}, seq {summary['text']['seq']})")
        ax.set_ylabel("BBC News probe accuracy (%)")
        ax.set_title(f"{summary['text']['model']}: fp32 / INT8 / ASVD / ASVD+INT8")
        fig.tight_layout()
        fig.savefig(out / "int8_minilm.png", dpi=110)
        plt.close(fig)


def write(summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary["goals"] = goals(summary)
    with replace_output(out / "int8.json", JSON) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny inputs (seconds); used by a test")
    ap.add_argument("--out", default=str(RESULTS), help="results folder")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}; the others "
                    "are kept from an existing int8.json (so one run can be split into several lock holds)")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    parts = args.parts.split(",")
    torch.set_num_threads(2)
    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix="int8_bench_"))
    old = out / "int8.json"
    summary: dict = json.loads(old.read_text()) if old.is_file() and set(parts) != set(PARTS) else {}
    summary.pop("goals", None)
    summary |= {"config": cfg, "quick": args.quick,
                "latency": "ORT CPU p50 (2 threads), median of rounds alternating between the variants"}
    summary.setdefault("machine_per_part", {})
    for part, key, fn in (("espcn", "espcn", espcn_part), ("text", "text", text_part),
                          ("effnet", "efficientnet_lite0", effnet_part)):
        if part in parts and (part != "effnet" or cfg["effnet"]):
            summary["machine_per_part"][part] = summary["machine"] = machine_info()
            summary[key] = fn(cfg, tmp)
            write(summary, out)
    write(summary, out)
    plot(summary, out)
    print(json.dumps(summary["goals"], indent=1))


if __name__ == "__main__":
    main()
