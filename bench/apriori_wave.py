"""A priori factorized convolutions (Boukraichi et al., arXiv 2304.04964, 2023) on a wave simulator.

1. Wave: the 2-D wave equation u_tt = c(x)^2 lap(u) solved by leapfrog finite differences (zero
   Dirichlet walls) for seeded Gaussian pulses, wave speeds and a smooth heterogeneous medium with an
   inclusion. A CNN sees (u_{t-1}, u_t, c) and predicts u_{t+1} as 2 u_t - u_{t-1} + net(...) (the
   leapfrog form, so the net learns the Laplacian term). Trained with standard convolutions and
   a priori factorized (`factorize`, init="fresh") at two ranks, same steps, same loop (`heal`).
2. Fashion-MNIST: the same comparison on a small classification CNN.
3. A posteriori: EfficientNet-Lite0 CP-factorized (init="cp") at several kept ratios (of the targeted
   convolutions; the 16 depthwise ones are skipped by default), allocated without data (kernel error)
   and with calibration crops (each layer's output change), each also healed a few steps by
   distillation; top-1/top-5 agreement with the original on centre crops of 12 bundled images, the
   calibration crops coming from the other bundled images only.
Each training runs in a child process (its own peak RSS, VmHWM reset after the data is loaded).
ORT CPU latency is timed round by round, interleaved, and reported as ratios to the dense model.
Writes bench/results/apriori_wave.json and apriori_wave_*.png; `--quick` runs in seconds.
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.compress import get_compressor
from edgeslim.core.calib import CalibData
from edgeslim.compress.replace import count_params
from edgeslim.compress.train import fit, heal
from edgeslim.core.files import JSON, replace_output
from edgeslim.runtime.machine import machine_info

FASHION = Path("/usr/share/datasets/fashion-mnist")
SETTINGS = {  # full run, subsampled for a shared 2-core CPU (see the module docstring)
    "full": dict(grid=32, sims_train=32, sims_test=6, frames=16, stride=3, width=16, kernel=5, epochs=40, batch=16,
                 ranks=[16, 4], rollout=10, fashion_train=12000, fashion_epochs=5, fashion_ranks=[16, 4],
                 effnet_images=12, effnet_ratios=[0.99, 0.95, 0.9], effnet_sens_crops=2, effnet_heal_steps=10,
                 effnet_heal_lr=1e-4, lat_rounds=3),
    "quick": dict(grid=16, sims_train=3, sims_test=2, frames=8, stride=2, width=8, kernel=3, epochs=1, batch=8,
                  ranks=[4, 2], rollout=3, fashion_train=256, fashion_epochs=1, fashion_ranks=[4, 2],
                  effnet_images=2, effnet_ratios=[0.6], effnet_sens_crops=1, effnet_heal_steps=1,
                  effnet_heal_lr=1e-4, lat_rounds=1),
}


# -- data ---------------------------------------------------------------------------------------------
def smooth_field(rng: np.random.Generator, n: int, cells: int = 4) -> np.ndarray:
    """A smooth random field in [-1, 1]: bilinear upsampling of a coarse random grid."""
    coarse = torch.from_numpy(rng.uniform(-1, 1, (1, 1, cells, cells)).astype(np.float32))
    return F.interpolate(coarse, size=(n, n), mode="bicubic", align_corners=True)[0, 0].clamp(-1, 1).numpy()


def simulate(n_sims: int, grid: int, frames: int, stride: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Leapfrog finite differences of u_tt = c^2 lap(u): (n, frames, H, W) fields and (n, H, W) speeds.

    Per simulation: background speed c0 ~ U(0.6, 1.0), +-25 % smooth variation, a circular slow or
    fast inclusion; 1-3 Gaussian pulses (random centre, width, sign), zero initial velocity; time
    step at CFL 0.5 / sqrt(2) of the fastest speed; every `stride`-th step is stored.
    """
    rng = np.random.default_rng(seed)
    h = 1.0 / grid
    yy, xx = np.meshgrid(np.linspace(0, 1, grid), np.linspace(0, 1, grid), indexing="ij")
    fields = np.zeros((n_sims, frames, grid, grid), np.float32)
    speeds = np.zeros((n_sims, grid, grid), np.float32)
    for s in range(n_sims):
        c = rng.uniform(0.6, 1.0) * (1 + 0.25 * smooth_field(rng, grid))
        cy, cx, r = rng.uniform(0.25, 0.75, 2).tolist() + [rng.uniform(0.08, 0.2)]
        c = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2, c * rng.choice([0.6, 1.4]), c)
        dt = 0.5 * h / (np.sqrt(2) * c.max())
        u = np.zeros((grid, grid))
        for _ in range(rng.integers(1, 4)):
            py, px, w = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.03, 0.08)
            u += rng.choice([-1.0, 1.0]) * np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / (2 * w ** 2))
        coef = (c * dt / h) ** 2

        def lap(v: np.ndarray) -> np.ndarray:
            out = np.zeros_like(v)
            out[1:-1, 1:-1] = v[2:, 1:-1] + v[:-2, 1:-1] + v[1:-1, 2:] + v[1:-1, :-2] - 4 * v[1:-1, 1:-1]
            return out

        prev = u - 0.5 * coef * lap(u)  # zero initial velocity: u^{-1} = u^0 + dt^2/2 c^2 lap(u^0)
        for f in range(frames):
            fields[s, f] = u
            for _ in range(stride):
                u, prev = 2 * u - prev + coef * lap(u), u
                u[0, :] = u[-1, :] = u[:, 0] = u[:, -1] = 0.0
        speeds[s] = c
    return fields, speeds


def wave_pairs(fields: np.ndarray, speeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (N, 3, H, W) = (u_{t-1}, u_t, c) and targets (N, 1, H, W) = u_{t+1}."""
    n, t = fields.shape[:2]
    xs = [np.stack([fields[s, i - 1], fields[s, i], speeds[s]]) for s in range(n) for i in range(1, t - 1)]
    ys = [fields[s, i + 1][None] for s in range(n) for i in range(1, t - 1)]
    return np.stack(xs), np.stack(ys)


def read_idx(name: str, offset: int) -> np.ndarray:
    with gzip.open(FASHION / name, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def fashion(limit: int) -> tuple[np.ndarray, ...]:
    """Fashion-MNIST train (first `limit`) and test images in [0, 1] (N, 1, 28, 28) and labels."""
    def images(name):
        return (read_idx(name, 16).reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
    return (images("train-images-idx3-ubyte.gz")[:limit], read_idx("train-labels-idx1-ubyte.gz", 8)[:limit].astype(np.int64),
            images("t10k-images-idx3-ubyte.gz"), read_idx("t10k-labels-idx1-ubyte.gz", 8).astype(np.int64))


# -- models -------------------------------------------------------------------------------------------
class WaveCNN(nn.Module):
    """(u_{t-1}, u_t, c) -> u_{t+1} = 2 u_t - u_{t-1} + convs(...): four k x k convolutions, ReLU."""

    def __init__(self, width: int, kernel: int) -> None:
        super().__init__()
        p = kernel // 2
        self.convs = nn.ModuleList([nn.Conv2d(3, width, kernel, padding=p), nn.Conv2d(width, width, kernel, padding=p),
                                    nn.Conv2d(width, width, kernel, padding=p), nn.Conv2d(width, 1, kernel, padding=p)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for i, conv in enumerate(self.convs):
            y = conv(y) if i == len(self.convs) - 1 else torch.relu(conv(y))
        return 2 * x[:, 1:2] - x[:, 0:1] + y


class FashionCNN(nn.Module):
    """3x3 convs 1-32-64-64 with two max-pools, global average pool, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(torch.relu(self.c1(x)), 2)
        y = F.max_pool2d(torch.relu(self.c2(y)), 2)
        return self.head(torch.relu(self.c3(y)).mean((2, 3)))


def build(task: str, rank: int | None, s: dict) -> nn.Module:
    """The task's model, a priori factorized at `rank` (every conv that saves parameters) or dense."""
    torch.manual_seed(0)
    model = WaveCNN(s["width"], s["kernel"]) if task == "wave" else FashionCNN()
    if rank is None:
        return model
    comp = get_compressor("factorize")
    return comp.compress(model, comp.make_config({"init": "fresh", "rank": rank}), inplace=True).model


# -- one training run per child process ---------------------------------------------------------------
def child(spec_path: str) -> None:
    """Train one variant: peak RSS above the loaded data, seconds per epoch, final weights."""
    from safetensors.torch import save_file

    from edgeslim.runtime.memory import MemoryProbe

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    arrays = np.load(spec["data"], allow_pickle=False)
    x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    s, batch = spec["settings"], spec["batch"]
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    batches = [perm[i:i + batch] for i in range(0, len(x) - batch + 1, batch)]
    data = CalibData(spec["task"], [{"x": x[b]} for b in batches], [y[b] for b in batches])
    model = build(spec["task"], spec["rank"], s)
    probe = MemoryProbe("rss")
    base = probe.current()
    probe.reset_peak()
    start = time.perf_counter()
    report = heal(model, data, steps=spec["epochs"] * len(batches), lr=spec["lr"], weight_decay=0.0, progress=False)
    seconds = time.perf_counter() - start
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, spec["weights"])
    Path(spec["result"]).write_text(json.dumps({
        "seconds_per_epoch": seconds / spec["epochs"], "peak_rss_bytes": probe.peak(), "base_rss_bytes": base,
        "training_rss_bytes": probe.peak() - base, "rss_method": probe.method, "final_loss": report.tail_loss(),
        "first_loss": float(np.mean(report.losses[:5]))}))


def train_variants(task: str, x: np.ndarray, y: np.ndarray, ranks: list, s: dict, epochs: int, lr: float,
                   tmp: Path) -> dict[str, dict]:
    """Each variant trained in its own child process; returns rows with the trained models."""
    data = tmp / f"{task}.npz"
    np.savez(data, x=x, y=y)
    rows = {}
    for rank in [None] + ranks:
        name = "dense" if rank is None else f"rank {rank}"
        paths = {k: str(tmp / f"{task}-{rank}.{k}") for k in ("json", "weights", "result")}
        Path(paths["json"]).write_text(json.dumps({
            "task": task, "rank": rank, "settings": s, "data": str(data), "batch": s["batch"], "epochs": epochs,
            "lr": lr, "threads": torch.get_num_threads(), "weights": paths["weights"], "result": paths["result"]}))
        print(f"[{task}] training {name} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--child", paths["json"]], check=True)
        from safetensors.torch import load_file
        model = build(task, rank, s)
        model.load_state_dict(load_file(paths["weights"]))
        row = json.loads(Path(paths["result"]).read_text())
        row.update(variant=name, rank=rank, params=count_params(model), model=model.eval())
        rows[name] = row
    return rows


def latency_ratios(rows: dict[str, dict], shape: tuple[int, ...], rounds: int, tmp: Path) -> None:
    """ORT CPU p50 per variant, interleaved round by round; ratio to dense stored in each row."""
    from edgeslim.export.onnx import to_onnx
    from edgeslim.runtime.measure import measure
    from edgeslim.runtime.session import open_session
    from edgeslim.core.specs import TensorSpec

    class Keyword(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)

    sessions, feeds = {}, {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    for name, row in rows.items():
        path = tmp / f"{name.replace(' ', '_')}-{shape[-1]}.onnx"
        result = to_onnx(Keyword(row["model"]), [TensorSpec("x", ("batch", *shape[1:]))], path)
        row["onnx_max_abs_diff"] = max(result.max_abs_diff.values())
        sessions[name] = open_session(path, "cpu-ort-fp32")
    times = {n: [] for n in rows}
    for _ in range(rounds):
        for name, session in sessions.items():
            times[name].append(measure(session, feeds, warmup=2, iters=10).p50_ms)
    for name, row in rows.items():
        row["ort_p50_ms"] = float(np.median(times[name]))
        row["latency_ratio"] = row["ort_p50_ms"] / float(np.median(times["dense"]))


@torch.no_grad()
def wave_eval(rows: dict[str, dict], fields: np.ndarray, speeds: np.ndarray, steps: int) -> None:
    """Test MSE of one step and relative L2 error of a `steps`-step rollout from frames (0, 1)."""
    x, y = wave_pairs(fields, speeds)
    c = torch.from_numpy(speeds)[:, None]
    truth = torch.from_numpy(fields[:, 2:2 + steps])
    for row in rows.values():
        model = row["model"]
        row["test_mse"] = float(F.mse_loss(model(torch.from_numpy(x)), torch.from_numpy(y)))
        prev, cur = torch.from_numpy(fields[:, 0:1]), torch.from_numpy(fields[:, 1:2])
        errors = []
        for k in range(steps):
            prev, cur = cur, model(torch.cat([prev, cur, c], 1))
            errors.append(float((cur[:, 0] - truth[:, k]).norm() / truth[:, k].norm()))
        row["rollout_rel_l2"] = errors


def public(rows: dict[str, dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "model"} for r in rows.values()]


# -- a posteriori on EfficientNet-Lite0 -----------------------------------------------------------------
def effnet_images(count: int) -> tuple[torch.Tensor, list[str], torch.Tensor, list[str]]:
    """224 x 224 crops of the bundled images, preprocessed (x - 127) / 128: the evaluation set is the
    centre crop of each of the first `count` images; calibration (sensitivity and healing) uses the
    centre and four corner crops of the OTHER images only, so no evaluation image is seen."""
    from edgeslim.images import BUNDLED_IMAGES, load_bundled, resize_bicubic

    crops: dict[str, list[np.ndarray]] = {}
    for name in BUNDLED_IMAGES:
        try:
            img = load_bundled(name)
        except Exception:  # an image this scikit-image wheel cannot load offline
            continue
        h, w = img.shape[:2]
        side = min(h, w)
        img = resize_bicubic(img[(h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2], 256, 256)
        crops[name] = [img[t:t + 224, l:l + 224] for t, l in ((16, 16), (0, 0), (32, 32), (0, 32), (32, 0))]
    names = list(crops)
    evaluate, calibrate = names[:count], names[count:]

    def batch(arrays: list[np.ndarray]) -> torch.Tensor:
        return (torch.from_numpy(np.stack(arrays).astype(np.float32)).permute(0, 3, 1, 2) - 127.0) / 128.0

    return (batch([crops[n][0] for n in evaluate]), evaluate,
            batch([c for n in calibrate for c in crops[n]]), calibrate)


class InferenceMode(nn.Module):
    """Keeps the wrapped model in eval mode while it is trained: BatchNorm uses its running statistics
    and dropout / drop-connect stay off (healing on a few dozen crops must not re-estimate them)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def train(self, mode: bool = True) -> "InferenceMode":
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x=x)


def agreement(logits: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and mean top-5 overlap of `logits` with the original's `ref`."""
    top5 = ref.topk(5, dim=1).indices
    return {"top1_agreement": float((logits.argmax(1) == ref.argmax(1)).float().mean()),
            "top5_overlap": float(np.mean([len(set(a.tolist()) & set(b.tolist())) / 5
                                           for a, b in zip(logits.topk(5, dim=1).indices, top5)]))}


def effnet_rows(s: dict) -> tuple[dict, list[dict]]:
    """Kept ratio x {no data: greedy on kernel errors, calibration: greedy on each layer's output change}
    x {as factored, healed a few steps by distillation toward the original on the calibration crops}."""
    from edgeslim.zoo import build as zoo_build

    model = zoo_build("efficientnet-lite0").model.eval()
    x, eval_names, xc, calib_names = effnet_images(s["effnet_images"])

    @torch.no_grad()
    def logits(m: nn.Module) -> torch.Tensor:
        return torch.cat([m(x=x[i:i + 4]) for i in range(0, len(x), 4)])

    ref = logits(model)
    k = s["effnet_sens_crops"]  # sensitivity on the most colourful centre crops of the calibration images
    centres = xc[::5]
    sens_idx = centres.std(1).mean((1, 2)).argsort(descending=True)[:k]
    sens = CalibData("bundled crops (calibration images)", [{"x": centres[sens_idx]}])
    heal_data = CalibData("bundled crops (calibration images)",
                          [{"x": xc[i:i + 4]} for i in range(0, len(xc) - 3, 4)])
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    original = {"params": count_params(model), "conv_params": sum(count_params(m) for m in convs),
                "convs": len(convs), "depthwise_convs": sum(m.groups > 1 and m.groups == m.in_channels for m in convs),
                "eval_images": eval_names, "calibration_images": calib_names, "calibration_crops": len(xc),
                "sensitivity_images": [calib_names[int(i)] for i in sens_idx],
                "heal_steps": s["effnet_heal_steps"], "heal_lr": s["effnet_heal_lr"],
                "heal_params": "the factored layers only (distilled toward the original, BatchNorm frozen)"}
    comp, out = get_compressor("factorize"), []
    for ratio in s["effnet_ratios"]:
        for label, data in (("no data: kernel error", None), ("calibration: output change", sens)):
            start = time.perf_counter()
            result = comp.compress(model, comp.make_config({"ratio": ratio, "allocation": "sensitivity",
                                                            "n_iter": 20, "sensitivity_batches": 1}), data)
            seconds = time.perf_counter() - start
            replaced = [c for c in result.changes if c.status == "replaced"]
            row = {"ratio": ratio, "allocation": label, "params": count_params(result.model),
                   "params_kept": count_params(result.model) / original["params"],
                   "factored_layers": len(replaced), "factored": {c.name: c.decision for c in replaced},
                   "dense_layers": len(result.resolved["dense"]),
                   "skipped_depthwise": len(result.resolved["skipped"]), "compress_seconds": seconds,
                   "median_rel_kernel_error": float(np.median([c.rel_error for c in replaced])) if replaced else 0.0,
                   "healed": False, **agreement(logits(result.model), ref)}
            out.append(row)
            print(f"[effnet] ratio {ratio}, {label}: {len(replaced)} factored, top-1 {row['top1_agreement']:.2f}",
                  flush=True)
            if not replaced:
                continue
            start = time.perf_counter()
            # heal's settings (AdamW, linear decay, clipping), on the factored layers only: moving every
            # weight of the trained network on a few dozen crops costs more agreement than it restores
            trained = [p for c in replaced for p in result.model.get_submodule(c.name).parameters()]
            report = fit(InferenceMode(result.model), heal_data, steps=s["effnet_heal_steps"], lr=s["effnet_heal_lr"],
                         teacher=InferenceMode(model), params=trained, max_grad_norm=1.0, progress=False,
                         label="healing")
            out.append({**row, "healed": True, "heal_seconds": time.perf_counter() - start,
                        "heal_first_loss": report.losses[0], "heal_final_loss": report.tail_loss(3),
                        **agreement(logits(result.model), ref)})
            print(f"[effnet]   healed: top-1 {out[-1]['top1_agreement']:.2f}", flush=True)
    return original, out


# -- main ---------------------------------------------------------------------------------------------------
def plots(summary: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for row in summary["wave"]["rows"]:
        axes[0].plot(range(1, len(row["rollout_rel_l2"]) + 1), row["rollout_rel_l2"], marker="o",
                     label=f"{row['variant']} ({row['params']} params)")
    axes[0].set(xlabel="rollout step", ylabel="relative L2 error", title="wave: multi-step rollout")
    axes[0].legend()
    names = [r["variant"] for r in summary["wave"]["rows"]]
    dense = (summary["wave"]["rows"] or [{}])[0]  # the wave section may not have run
    metrics = {"params": "params", "training RSS": "training_rss_bytes", "s/epoch": "seconds_per_epoch",
               "ORT latency": "ort_p50_ms", "test MSE": "test_mse"}
    for i, (label, key) in enumerate(metrics.items()):
        axes[1].bar(np.arange(len(names)) + i * 0.16, [r[key] / dense[key] for r in summary["wave"]["rows"]], 0.16,
                    label=label)
    axes[1].set_xticks(np.arange(len(names)) + 0.32, names)
    axes[1].set(ylabel="ratio to dense", title="wave: cost and accuracy vs dense")
    axes[1].legend(fontsize=7)
    eff = summary["efficientnet"]["rows"]
    total = summary["efficientnet"].get("original", {}).get("params", 1)
    for (allocation, healed), marker in zip(sorted({(r["allocation"], r.get("healed", False)) for r in eff}), "osD^"):
        rows = [r for r in eff if r["allocation"] == allocation and r.get("healed", False) == healed]
        label = f"{allocation}{', healed' if healed else ''}"
        axes[2].plot([r["params"] / total for r in rows], [r["top1_agreement"] for r in rows], marker=marker,
                     label=f"top-1, {label}")
        axes[2].plot([r["params"] / total for r in rows], [r["top5_overlap"] for r in rows], marker=marker,
                     linestyle=":", label=f"top-5 overlap, {label}")
    axes[2].set(xlabel="kept params (whole model)", ylabel="agreement with original",
                title="EfficientNet-Lite0, CP a posteriori")
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "apriori_wave_summary.png", dpi=110)
    plt.close(fig)
    return ["apriori_wave_summary.png"]


def wave_section(s: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp_name:
        train = simulate(s["sims_train"], s["grid"], s["frames"], s["stride"], seed=0)
        test = simulate(s["sims_test"], s["grid"], s["frames"], s["stride"], seed=1)
        x, y = wave_pairs(*train)
        rows = train_variants("wave", x, y, s["ranks"], s, s["epochs"], 3e-3, Path(tmp_name))
        wave_eval(rows, *test, s["rollout"])
        latency_ratios(rows, (1, 3, s["grid"], s["grid"]), s["lat_rounds"], Path(tmp_name))
    return {"train_pairs": len(x), "test_simulations": s["sims_test"], "rows": public(rows)}


def fashion_section(s: dict) -> dict:
    xf, yf, xt, yt = fashion(s["fashion_train"])
    with tempfile.TemporaryDirectory() as tmp_name:
        rows = train_variants("fashion", xf, yf, s["fashion_ranks"], dict(s, batch=64), s["fashion_epochs"], 3e-3,
                              Path(tmp_name))
        with torch.no_grad():
            for row in rows.values():
                logits = torch.cat([row["model"](torch.from_numpy(xt[i:i + 1000])) for i in range(0, len(xt), 1000)])
                row["test_accuracy"] = float((logits.argmax(1).numpy() == yt).mean())
        latency_ratios(rows, (32, 1, 28, 28), s["lat_rounds"], Path(tmp_name))
    return {"train_images": len(xf), "test_images": len(xt), "rows": public(rows)}


def effnet_section(s: dict) -> dict:
    original, rows = effnet_rows(s)
    return {"original": original, "rows": rows}


SECTIONS = {"efficientnet": effnet_section, "wave": wave_section, "fashion": fashion_section}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (seconds), for the test")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--section", action="append", choices=list(SECTIONS),
                        help="run only these sections (default: all, in turn); their results replace those "
                             "sections of the existing summary, the others are kept as last measured")
    parser.add_argument("--merge", action="store_true",
                        help="write the summary from the parts present now (missing sections marked as not run)")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return {}
    s = SETTINGS["quick" if args.quick else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = {k: out / f"apriori_wave.{k}.part.json" for k in SECTIONS}
    for section in [] if args.merge else args.section or SECTIONS:
        start = time.perf_counter()
        part = SECTIONS[section](s)
        part["wall_seconds"] = time.perf_counter() - start
        with replace_output(parts[section], JSON) as tmp:
            tmp.write_text(json.dumps(part, indent=2, default=float))
    if not (args.merge or args.section or all(p.exists() for p in parts.values())):
        return {}
    missing = {"rows": [], "not_run": "did not finish within the time box of this run"}
    final = out / "apriori_wave.json"
    previous = json.loads(final.read_text()) if final.exists() else {}
    summary: dict = {"settings": s, "machine": machine_info()}
    for key, part in parts.items():  # a section not run now keeps its last measured result, if any
        summary[key] = json.loads(part.read_text()) if part.exists() else previous.get(key, missing)
        if not part.exists() and key in previous:
            summary[key]["machine"] = summary[key].get("machine", previous.get("machine"))
    summary["figures"] = plots(summary, out)
    with replace_output(final, JSON) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=float))
    for p in parts.values():
        p.unlink(missing_ok=True)
    return summary


if __name__ == "__main__":
    main()
