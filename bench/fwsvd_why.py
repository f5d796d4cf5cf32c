"""Diagnosis: why FWSVD loses to plain SVD at moderate ranks on the BBC News MiniLM classifier.

Same classifier, calibration articles, target and alignment as bench/lowrank_minilm.py, uniform
allocation. It compares row weightings at kept 0.5 / 0.4 / 0.3 (accuracy on the test split only, no
latency):

- svd: no weighting;
- fwsvd (empirical): per-sample Fisher of the cross-entropy on the true labels (the paper's;
  fwsvd's `fisher_loss = "task"`);
- fwsvd (model labels): per-sample Fisher of the cross-entropy on labels drawn from the model's own
  softmax, the "true" Fisher, which does not vanish on articles the model fits;
- fwsvd (Gauss-Newton): the label-free estimate (logits + unit noise, MSE), fwsvd's default
  `fisher_loss = "output"`;
- fwsvd (fitted only): the empirical Fisher without the articles the model gets less than 0.9 on.

and measures where the empirical Fisher comes from: the share of its mass (sum of squared
per-sample gradients over the targeted weights) carried by the top 5% of the articles, how
concentrated the row weights sqrt(I_row) are (participation ratio over rows), and each weighting's
relative output error on the calibration inputs, tr(D S D^T) / tr(W S W^T), D = W - W', S = E[x x^T].

`--llm` adds the same comparison on SmolLM2-135M (lowrank_llm.py's calibration, evaluation and
sensitivity allocation at kept 0.8), where every sample carries 256 next-token losses:

    python bench/fwsvd_why.py          # ~7 min on 2 cores, writes bench/results/fwsvd_why.json
    python bench/fwsvd_why.py --llm    # + ~5 min
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from lowrank_minilm import FULL, RESULTS, TARGET, accuracy, finetuned_setup  # noqa: E402

from edgeslim.core.calib import CalibData  # noqa: E402
from edgeslim.compress.base import StatsRequest  # noqa: E402
from edgeslim.compress.statistics import collect_stats  # noqa: E402
from edgeslim.compress.replace import linear_view, select_modules  # noqa: E402
from edgeslim.compress.svd import FWSVD, SVD  # noqa: E402
from edgeslim.core.files import JSON, replace_output  # noqa: E402
from edgeslim.runtime.machine import machine_info  # noqa: E402

RATIOS = (0.5, 0.4, 0.3)
FITTED = 0.9  # "fitted only" keeps the articles whose true-class probability is at least this


@torch.inference_mode()
def true_class_probability(model, calib: CalibData) -> list[float]:
    probs = []
    for _, batch, target in calib:
        p = model(**batch).softmax(-1)
        probs += p.gather(1, target[:, None]).squeeze(1).tolist()
    return probs


@torch.no_grad()  # the labels are autograd targets later: no inference tensors
def model_labels(model, calib: CalibData, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.multinomial(model(**batch).softmax(-1), 1, generator=generator).squeeze(1) for _, batch, _ in calib]


def per_sample_mass(model, calib: CalibData, names: list[str]) -> list[float]:
    """Sum over the targeted weights of each article's squared gradient (its share of the Fisher)."""
    mass = []
    for _, batch, target in calib:
        for j in range(len(target)):
            one = CalibData("one", [{k: v[j:j + 1] for k, v in batch.items()}], [target[j:j + 1]])
            stats = collect_stats(model, one, names, StatsRequest(fisher=True), progress=False)
            mass.append(float(sum(f.double().sum() for f in stats.fisher.values())))
    return mass


def participation(weights: torch.Tensor) -> float:
    """(sum w)^2 / (m sum w^2): 1 for equal row weights, 1/m for one row."""
    w = weights.double()
    return float(w.sum() ** 2 / (len(w) * w.square().sum()))


def output_error(model, result, stats_x, names: list[str]) -> float:
    """Median over layers of tr(D S D^T) / tr(W S W^T) on the calibration second moments."""
    errors = []
    for name in names:
        weight = linear_view(model.get_submodule(name)).weight.detach().double()
        approx = result.model.get_submodule(name).weight.detach().double()  # LowRankLinear: A B
        cov = stats_x.xtx[name] / stats_x.rows[name]
        diff = weight - approx
        errors.append(float(torch.einsum("ij,jk,ik->", diff, cov, diff) / torch.einsum("ij,jk,ik->", weight, cov, weight)))
    return statistics.median(errors)


def llm_part() -> dict:
    """fwsvd on SmolLM2 at kept 0.8 with the output (Gauss-Newton) and the task (next-token) Fisher."""
    import lowrank_llm as L
    from edgeslim.compress.replace import select_linear_maps
    from edgeslim.data import text_calibration
    from edgeslim.evaluate import perplexity
    from edgeslim.sources import load_model
    cfg = L.FULL
    loaded = load_model(cfg["model"])
    model, tok = loaded.model, loaded.encode.tokenizer
    calib_texts, eval_texts = L.texts(cfg)
    calib = text_calibration(f"bbc-news train:{len(calib_texts)}", calib_texts, loaded, cfg["calib_batch"])
    names = [n for n, _ in select_linear_maps(model, L.TARGET)[0]]

    def ppl(m) -> float:
        return perplexity(m, tok, eval_texts, cfg["eval_tokens"], batch_size=4, max_tokens=cfg["eval_tokens"])[0]

    out = {"model": cfg["model"], "ratio": 0.8, "allocation": "sensitivity", "calib_docs": cfg["calib_docs"],
           "eval": f"perplexity, first {cfg['eval_tokens']} tokens of {len(eval_texts)} BBC News test docs",
           "original_perplexity": ppl(model)}
    for loss in ("output", "task"):
        config = {"ratio": 0.8, "target": L.TARGET, "align": cfg["align"], "allocation": "sensitivity", "fisher_loss": loss}
        stats = FWSVD().collect(model, calib, names, FWSVD().make_config(config))
        out[f"fwsvd_{loss}_perplexity"] = ppl(FWSVD().compress_with_stats(model, config, stats).model)
        print(f"SmolLM2 fwsvd kept 0.8, {loss} Fisher: perplexity {out[f'fwsvd_{loss}_perplexity']:.1f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgeslim")
    parser.add_argument("--llm", action="store_true", help="also compare the two Fisher losses on SmolLM2")
    parser.add_argument("--llm-only", action="store_true", help="only the SmolLM2 part, into the existing JSON")
    args = parser.parse_args(argv)
    if args.llm_only:
        summary = json.loads((args.out / "fwsvd_why.json").read_text())
        summary["smollm2"] = llm_part()
        with replace_output(args.out / "fwsvd_why.json", JSON) as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
        return
    cfg = dict(FULL)
    setup = finetuned_setup(cfg, args.cache)
    model, calib, test = setup.loaded.model, setup.calib, setup.test
    names = [n for n, _ in select_modules(model, TARGET)]
    t0 = time.perf_counter()
    p_true = true_class_probability(model, calib)
    keep = [p >= FITTED for p in p_true]
    mass = per_sample_mass(model, calib, names)
    print(f"per-sample Fisher mass of {len(mass)} articles: {time.perf_counter() - t0:.0f} s", flush=True)
    order = sorted(range(len(mass)), key=lambda i: -mass[i])
    top = order[:max(1, len(mass) // 20)]
    fitted_batches, fitted_targets = [], []
    flat = [(i, j) for i, (_, b, t) in enumerate(calib) for j in range(len(t))]
    for k in range(0, len(flat), 16):
        idx = [ij for n, ij in enumerate(flat[k:k + 16], start=k) if keep[n]]
        if idx:
            fitted_batches.append({key: torch.cat([calib.batches[i][key][j:j + 1] for i, j in idx])
                                   for key in calib.batches[0]})
            fitted_targets.append(torch.cat([calib.targets[i][j:j + 1] for i, j in idx]))
    estimates = {
        "empirical": calib,
        "model labels": CalibData("bbc-news (model labels)", calib.batches, model_labels(model, calib)),
        "gauss-newton": CalibData("bbc-news (no labels)", calib.batches),
        "fitted only": CalibData("bbc-news (fitted)", fitted_batches, fitted_targets),
    }
    stats = {label: collect_stats(model, data, names, StatsRequest(fisher=True)) for label, data in estimates.items()}
    stats_x = collect_stats(model, calib, names, StatsRequest(input_moments=True))
    fwsvd = FWSVD()
    fw_config = fwsvd.make_config({"ratio": 0.5})
    summary = {
        "model": str(setup.folder), "target": TARGET, "calib_samples": len(mass), "align": cfg["align"],
        "test_docs": sum(len(t) for t in test.targets), "allocation": "uniform", "machine": machine_info(),
        "original_accuracy": accuracy(model, test),
        "calib_true_class_probability": {"median": statistics.median(p_true), "below_0.9": sum(not k for k in keep),
                                         "below_0.5": sum(p < 0.5 for p in p_true)},
        "fisher_mass_top5pct_share": sum(mass[i] for i in top) / sum(mass),
        "fisher_mass_top5pct_true_class_probability": [p_true[i] for i in top],
        "row_weight_participation": {
            label: statistics.median(participation(fwsvd.weighting(n, model.get_submodule(n), fw_config, s)[0])
                                     for n in names) for label, s in stats.items()},
        "rows": [],
    }
    for ratio in RATIOS:
        config = {"ratio": ratio, "target": TARGET, "align": cfg["align"], "allocation": "uniform"}
        variants = {"svd": SVD().compress_with_stats(model, config, None)}
        variants |= {f"fwsvd ({label})": FWSVD().compress_with_stats(model, config, s) for label, s in stats.items()}
        for label, result in variants.items():
            row = {"ratio": ratio, "method": label, "accuracy": accuracy(result.model, test),
                   "median_output_error": output_error(model, result, stats_x, names)}
            summary["rows"].append(row)
            print(f"kept {ratio}  {label:24s} accuracy {row['accuracy']:.4f}  median output error "
                  f"{row['median_output_error']:.4f}", flush=True)
    summary["seconds"] = time.perf_counter() - t0
    if args.llm:
        summary["smollm2"] = llm_part()
    with replace_output(args.out / "fwsvd_why.json", JSON) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
