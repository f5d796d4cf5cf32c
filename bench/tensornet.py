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

import lowrank_llm as llm_bench  # noqa: E402
import lowrank_minilm as lr  # noqa: E402
from edgeslim.core.calib import CalibData  # noqa: E402
from edgeslim.compress.base import StatsRequest  # noqa: E402
from edgeslim.compress.statistics import collect_stats  # noqa: E402
from edgeslim.compress.replace import count_params, linear_view, select_linear_maps, select_modules  # noqa: E402
from edgeslim.compress.sensitivity import layer_sensitivity  # noqa: E402
from edgeslim.compress.svd import ASVD, SVD, LowRankLinear  # noqa: E402
from edgeslim.compress.mpo_layer import MPOLinear, default_factors, paired, tt_svd  # noqa: E402
from edgeslim.compress.tensornet import MPO, MPOPlan  # noqa: E402
from edgeslim.compress.train import heal  # noqa: E402
from edgeslim.data import text_calibration  # noqa: E402
from edgeslim.evaluate import perplexity  # noqa: E402
from edgeslim.export.onnx import to_onnx  # noqa: E402
from edgeslim.report import save_png  # noqa: E402
from edgeslim.core.errors import ConfigError, require  # noqa: E402
from edgeslim.core.files import JSON, replace_output  # noqa: E402
from edgeslim.runtime.machine import machine_info  # noqa: E402
from edgeslim.runtime.measure import measure  # noqa: E402
from edgeslim.runtime.session import open_session  # noqa: E402
from edgeslim.sources import load_model, make_encoder  # noqa: E402
from edgeslim.core.specs import TensorSpec, example_feeds  # noqa: E402
from edgeslim.tasks import lm_targets  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LLAMA_TARGET = r"hf\.model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
FULL = dict(finetune=lr.FULL["finetune"], chis=[32, 16], sens_chi=16, heal_chis=[16], heal_steps=20,
            cores=3, calib_samples=64, profile_batches=2, test_docs=160, latency_rounds=3, latency_iters=2,
            latency_dims={"batch": 8, "sequence": 128}, align=8, tl_ranks=[8, 16, 32], layer_cores=[2, 3], layer_align=16,
            latency_kept=[0.25], layer_latency_dims=[{"batch": 1, "sequence": 1}, {"batch": 8, "sequence": 128}],
            layer_iters=5,
            llm=dict(texts=6, tokens=256, batch=4, ratios=[0.7, 0.5], heal_ratios=[0.7, 0.5], heal_steps=8,
                     heal_batch=1, heal_tokens=64, heal_lr=1e-4, calib_texts=16, profile_every=5, profile_texts=2, profile_tokens=128,
                     latency_batches=[1, 8], latency_seq=64, rounds=2, iters=2))
QUICK = dict(finetune=lr.QUICK["finetune"], chis=[4], sens_chi=4, heal_chis=[4], heal_steps=2, cores=2,
             calib_samples=16, profile_batches=1, test_docs=16, latency_rounds=1, latency_iters=2,
             latency_dims={"batch": 2, "sequence": 32}, align=2, tl_ranks=[2, 4], layer_cores=[2], layer_align=8,
             tiny_layers=True, latency_kept=[0.25], layer_latency_dims=[{"batch": 1, "sequence": 1}], layer_iters=2,
             llm=dict(tiny=True, texts=4, tokens=32, batch=2, ratios=[0.5], heal_ratios=[0.5], heal_steps=2,
                      heal_batch=2, heal_tokens=16, heal_lr=1e-4, calib_texts=2, profile_every=1, profile_texts=2, profile_tokens=16,
                      latency_batches=[1, 2], latency_seq=16, rounds=1, iters=2))
# What the full run leaves out to fit ~20 min of lock time on the 2 shared cores.
CUTS = ("MiniLM: test accuracy on 160 of the 334 test texts; bond dimensions chi 32 and 16 with k=3 cores only "
        "(chi 8 keeps 2% of the parameters, below svd's smallest aligned ranks; chi 64 costs ~40x the dense "
        "FLOPs); calibration 64 texts; layer profile (mpo+sens, at chi 16) on 2 batches of 16; heal 20 steps "
        "(batch 16) at chi 16 only; latency 3 paired rounds x 2 calls. SmolLM2: perplexity on the first 256 tokens of "
        "the first 6 of lowrank_llm's 12 BBC test docs (MPO's forward is several times dense); asvd statistics from 16 training docs; heal 8 steps "
        "(batch 1 x the first 64 tokens: MPO's backward at 2 x 256 tokens went past the machine's 24 GB); no ONNX export (torch CPU latency, sequence 64); block profile on every 5th "
        "block with 2 texts x 128 tokens")


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
    stats = collect_stats(model, calib, names, StatsRequest(input_moments=True))
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
            try:
                variants.append((method, comp.compress_with_stats(model, {"ratio": kept, "target": lr.TARGET,
                                                                          "align": cfg["align"]}, stats if method == "asvd" else None)))
            except ConfigError as err:  # below the smallest aligned rank of every layer
                summary["minilm"].setdefault("not_reachable", []).append(
                    {"method": method, "chi": chi, "targeted_kept": kept, "error": str(err)})
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
        tensor = paired(w, out_f, in_f)
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
                         "agree_1e-5": abs(e_ours - e_tl) <= 1e-5,
                         "seconds_ours": t_ours, "seconds_tensorly": t_tl})
    return rows


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


def linear_flops(model: torch.nn.Module, names: Sequence[str]) -> int:
    """FLOPs per token of the named linear maps as they are now (dense, low-rank pair or MPO)."""
    total = 0
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, MPOLinear):
            total += module.flops_per_row()
        elif isinstance(module, LowRankLinear):
            total += 2 * module.rank * (module.in_features + module.out_features)
        else:
            view = linear_view(module)
            total += 2 * view.in_features * view.out_features
    return total


def heal_batches(calib: CalibData, size: int, tokens: int) -> CalibData:
    """Healing batches of `size` calibration texts cut to their first `tokens` tokens, next-token targets.
    MPO's backward keeps every core contraction: 8 steps of 2 x 256 tokens on SmolLM2 went past 24 GB."""
    split = llm_bench.split_batches(calib, size)
    batches = [{k: v[:, :tokens] for k, v in b.items()} for b in split.batches]
    return CalibData(f"{split.name} first {tokens} tokens", batches,
                     [lm_targets(b["input_ids"], b["attention_mask"]) for b in batches])


def smollm(cfg: dict, summary: dict, out: Path, resume: bool = False) -> None:
    """SmolLM2-135M: MPO at kept 0.7 / 0.5 vs asvd at the same parameters, healed and not; torch
    latency at batch 1 and 8; a one-block-at-a-time MPO loss profile (does depth tolerate more?)."""
    llm = cfg["llm"]
    tmp = Path(tempfile.mkdtemp(prefix="tensornet_llm_"))
    loaded = load_model(llm_bench.tiny_llama(tmp / "tiny") if llm.get("tiny") else "smollm2")
    model, tok = loaded.model, loaded.encode.tokenizer
    calib_texts, eval_texts = llm_bench.texts({"model": "tiny" if llm.get("tiny") else "smollm2",
                                               "calib_docs": llm["calib_texts"], "eval_docs": llm["texts"]})
    calib = text_calibration(f"bbc-news train:{len(calib_texts)}", calib_texts, loaded, llm["batch"])
    names = [name for name, _ in select_linear_maps(model, LLAMA_TARGET)[0]]
    targeted = sum(count_params(model.get_submodule(name)) for name in names)
    base_flops = linear_flops(model, names)

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, tok, eval_texts, llm["tokens"], batch_size=4, max_tokens=llm["tokens"])[0]

    res = {"model": "tiny LLaMA" if llm.get("tiny") else
           "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32: weights on a 4-bit grid)",
           "target": LLAMA_TARGET, "targeted_params": targeted, "texts": len(eval_texts), "tokens": llm["tokens"],
           "eval": f"edgeslim.evaluate.perplexity on the first {llm['tokens']} tokens of {len(eval_texts)} BBC test docs",
           "heal_note": f"heal = {llm['heal_steps']} AdamW steps, next-token loss on the {len(calib_texts)} calibration "
                        f"texts in batches of {llm['heal_batch']}, first {llm['heal_tokens']} tokens", "machine": machine_info(), "rows": []}
    summary["smollm2"] = res
    done: set[float] = set()  # --resume: the rows of ratios a previous run of the same settings measured are kept
    if resume and (out / "tensornet.json").is_file():
        old = json.loads((out / "tensornet.json").read_text()).get("smollm2", {})
        if (old.get("texts"), old.get("tokens"), old.get("heal_note")) == (res["texts"], res["tokens"], res["heal_note"]):
            done = {r["ratio"] for r in old.get("rows", []) if r["ratio"] != min(llm["ratios"])}
            res["rows"] = [r for r in old["rows"] if r["ratio"] in done]
            res["resumed"] = f"rows at kept {sorted(done)} kept from the previous run ({old['machine'].get('load_avg')})"
    res["original_ppl"] = ppl(model)
    print(f"SmolLM2 original: perplexity {res['original_ppl']:.2f}", flush=True)
    stats = collect_stats(model, calib, names, StatsRequest(input_moments=True))
    heal_data = heal_batches(calib, llm["heal_batch"], llm["heal_tokens"])
    low = min(llm["ratios"])
    lat_models = {"original": model}
    for ratio in [r for r in llm["ratios"] if r not in done]:
        mpo = MPO().compress(model, {"ratio": ratio, "cores": cfg["cores"], "target": LLAMA_TARGET})
        kept = mpo.params_after / mpo.params_before
        asvd = ASVD().compress_with_stats(model, {"ratio": kept, "target": LLAMA_TARGET, "align": cfg["align"]}, stats)
        for method, result in (("mpo", mpo), ("asvd", asvd)):
            row = {"method": method, "ratio": ratio, "healed": False,
                   "targeted_kept": result.params_after / result.params_before, "params": count_params(result.model),
                   "linear_flops_ratio": linear_flops(result.model, names) / base_flops, "ppl": ppl(result.model)}
            row["ppl_ratio"] = row["ppl"] / res["original_ppl"]
            res["rows"].append(row)
            print(f"SmolLM2 {method} ratio {ratio}: kept {row['targeted_kept']:.3f} perplexity {row['ppl']:.2f}", flush=True)
            write_results(summary, out)
            if ratio == low:
                lat_models[method] = result.model
            if ratio in llm["heal_ratios"]:
                t0 = time.perf_counter()
                report = heal(result.model, heal_data, steps=llm["heal_steps"], lr=llm["heal_lr"], seed=0)
                res["rows"].append({**row, "healed": True, "heal_steps": llm["heal_steps"],
                                    "heal_seconds": time.perf_counter() - t0, "heal_final_loss": report.final_loss,
                                    "ppl": ppl(result.model)})
                res["rows"][-1]["ppl_ratio"] = res["rows"][-1]["ppl"] / res["original_ppl"]
                print(f"SmolLM2 {method} ratio {ratio} healed: perplexity {res['rows'][-1]['ppl']:.2f}", flush=True)
                write_results(summary, out)
    res["latency"] = []
    for batch in llm["latency_batches"]:
        ids = calib.batches[0]["input_ids"][:1, :llm["latency_seq"]].repeat(batch, 1)
        feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}
        p50 = paired_torch_latency(lat_models, feeds, llm["rounds"], llm["iters"])
        res["latency"].append({"batch": batch, "sequence": llm["latency_seq"], "ratio": low, "p50_ms": p50,
                               **{f"{k}_latency_ratio": p50[k] / p50["original"] for k in ("mpo", "asvd")}})
        print(f"SmolLM2 latency batch {batch}: {p50}", flush=True)
    del lat_models
    write_results(summary, out)
    prof = llm_bench.short_lm_data(calib, llm["profile_texts"], llm["profile_tokens"])
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


def verdict(summary: dict) -> list[str]:
    """Where MPO wins and where SVD does, read off the measured rows (equal parameter counts)."""
    lines = []
    m = summary.get("minilm", {})
    for chi in sorted({r["chi"] for r in m.get("rows", [])}):
        for healed in (False, True):
            rows = {r["method"]: r for r in m["rows"] if r["chi"] == chi and r["healed"] == healed}
            if "mpo" not in rows or "svd" not in rows:
                continue
            best = max((k for k in rows if not k.startswith("mpo")), key=lambda k: rows[k]["accuracy"])
            mpo = max((k for k in rows if k.startswith("mpo")), key=lambda k: rows[k]["accuracy"])
            who = "MPO" if rows[mpo]["accuracy"] > rows[best]["accuracy"] else "SVD"
            lines.append(f"MiniLM chi {chi} (kept {rows['mpo']['targeted_kept']:.3f}){' healed' if healed else ''}: "
                         f"{who} wins on accuracy ({mpo} {rows[mpo]['accuracy']:.3f} vs {best} {rows[best]['accuracy']:.3f})"
                         + ("" if healed else f"; FLOPs x{rows['mpo']['flops_ratio']:.2f} vs x{rows[best]['flops_ratio']:.2f},"
                            f" latency x{rows['mpo']['latency_ratio']:.2f} vs x{rows[best]['latency_ratio']:.2f}"))
    llm = summary.get("smollm2", {})
    for ratio in sorted({r["ratio"] for r in llm.get("rows", [])}):
        for healed in (False, True):
            rows = {r["method"]: r for r in llm["rows"] if r["ratio"] == ratio and r["healed"] == healed}
            if {"mpo", "asvd"} <= rows.keys():
                who = "MPO" if rows["mpo"]["ppl"] < rows["asvd"]["ppl"] else "ASVD"
                lines.append(f"SmolLM2 kept {rows['mpo']['targeted_kept']:.3f}{' healed' if healed else ''}: {who} wins "
                             f"on perplexity (mpo {rows['mpo']['ppl']:.1f} vs asvd {rows['asvd']['ppl']:.1f}); linear-map "
                             f"FLOPs x{rows['mpo']['linear_flops_ratio']:.2f} vs x{rows['asvd']['linear_flops_ratio']:.2f}")
    for lat in llm.get("latency", []):
        lines.append(f"SmolLM2 torch latency batch {lat['batch']} x {lat['sequence']} at kept {lat['ratio']}: "
                     f"mpo x{lat['mpo_latency_ratio']:.2f}, asvd x{lat['asvd_latency_ratio']:.2f} of the original")
    return lines


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
    summary["verdict"] = verdict(summary)
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
        save_png(fig, out / "tensornet_layers.png")
        plt.close(fig)
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
        save_png(fig, out / "tensornet_minilm.png")
        plt.close(fig)
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
        save_png(fig, out / "tensornet_sensitivity.png")
        plt.close(fig)


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
    parser.add_argument("--resume", action="store_true",
                        help="SmolLM2: keep the rows of the higher kept ratios from the existing JSON (same settings)")
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
        smollm(cfg, summary, out, args.resume)
    summary[f"seconds_{'_'.join(p for p in ('layers', 'minilm', 'smollm2') if p not in args.skip)}"] = time.perf_counter() - t0
    summary["machine_after"] = machine_info()
    write_results(summary, out)
    print(f"results in {out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
