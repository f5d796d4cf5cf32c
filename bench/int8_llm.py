"""Benchmark: weight-only INT8 / INT4 (NNCF `compress_weights`) on SmolLM2-135M: size and perplexity.

Through edgeslim's `wq` compressor (compress/weight_quant.py): weights of every linear map are stored
as integers with per-channel (INT8) or per-group (INT4, groups of 64 along the input) scales and zero
points, and dequantized on the fly; activations stay fp32 (NNCF, Torch backend; data-free: no AWQ / scale estimation). Perplexity through edgeslim's own
`evaluate.perplexity` (the `edgeslim eval` path) on the first tokens of BBC News test documents.
SmolLM2's weights already sit on a 4-bit grid (Q4_1 GGUF) before any of this: INT4 here re-quantizes
a 4-bit model onto another 4-bit grid. Sizes are the bytes of the model's state (tied tensors once).

    python bench/int8_llm.py            # subsampled run (~5 min on 2 cores), writes bench/results/int8_llm.json
    python bench/int8_llm.py --quick    # tiny random LLaMA, seconds; used by a test
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from edgeslim.compress.base import CompressContext, CompressResult, get_compressor  # noqa: E402
from edgeslim.evaluate import perplexity  # noqa: E402
from edgeslim.core.files import JSON, replace_output  # noqa: E402
from edgeslim.runtime.machine import machine_info  # noqa: E402
from edgeslim.sources import LoadedModel, load_model  # noqa: E402
from lowrank_llm import texts, tiny_llama  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FULL = dict(model="smollm2", eval_docs=24, eval_tokens=256, calib_docs=1, group_size=64)
QUICK = dict(FULL, model="tiny", eval_docs=4, eval_tokens=32, group_size=16)
MODES = ("int8_asym", "int8_sym", "int4_asym", "int4_sym")
WQ_MODES = {"int8_asym": "int8", "int8_sym": "int8_sym", "int4_asym": "int4", "int4_sym": "int4_sym"}  # -m wq mode


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (packed integer weights, scales, zero points), each tensor once."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())}
    return int(sum(seen.values()))


def compress(loaded: LoadedModel, mode: str, group_size: int) -> CompressResult:
    """edgeslim's `wq` step (`edgeslim compress SOURCE -m wq --set mode=...`) on a copy of the model."""
    wq = get_compressor("wq")
    config = wq.make_config({"mode": WQ_MODES[mode], "group_size": group_size})
    return wq.compress(loaded.model, config, context=CompressContext(inputs=tuple(loaded.inputs)))


def run(cfg: dict) -> dict:
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="int8_llm_"))
    loaded = load_model(tiny_llama(tmp / "tiny") if cfg["model"] == "tiny" else cfg["model"])
    model, tok = loaded.model.eval(), loaded.encode.tokenizer
    _, eval_texts = texts(cfg)

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, tok, eval_texts, cfg["eval_tokens"], batch_size=4, max_tokens=cfg["eval_tokens"])[0]

    fp32 = {"perplexity": ppl(model), "state_bytes": state_bytes(model)}
    print(f"fp32: perplexity {fp32['perplexity']:.3f}, {fp32['state_bytes'] / 1e6:.1f} MB", flush=True)
    rows = {"fp32": fp32}
    for mode in MODES:
        t0 = time.perf_counter()
        result = compress(loaded, mode, cfg["group_size"])
        small = result.model
        row = {"perplexity": ppl(small), "state_bytes": state_bytes(small), "compress_s": time.perf_counter() - t0,
               "quantized_bytes_ratio": result.resolved["size_ratio"]}  # the quantized weights' rows alone
        row["size_ratio"] = row["state_bytes"] / fp32["state_bytes"]
        row["perplexity_ratio"] = row["perplexity"] / fp32["perplexity"]
        rows[mode] = row
        print(f"{mode}: perplexity {row['perplexity']:.3f} (x{row['perplexity_ratio']:.3f}), "
              f"{row['state_bytes'] / 1e6:.1f} MB (x{row['size_ratio']:.3f})", flush=True)
    import nncf
    return {"model": cfg["model"], "config": cfg, "machine": machine_info(), "nncf_version": nncf.__version__,
            "eval": f"perplexity on the first {cfg['eval_tokens']} tokens of {len(eval_texts)} BBC News test docs "
                    "(edgeslim.evaluate.perplexity, window = eval_tokens)",
            "weights_note": "SmolLM2 weights are dequantized from a Q4_1 GGUF: already on a 4-bit grid",
            "method": "edgeslim -m wq: nncf.compress_weights (Torch backend, data-free); INT4 with ratio 1.0 "
                      "(NNCF keeps the embedding / tied head at INT8) and groups of group_size", "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random LLaMA (seconds); used by a test")
    ap.add_argument("--out", default=str(RESULTS), help="results folder")
    args = ap.parse_args(argv)
    summary = run(dict(QUICK if args.quick else FULL))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with replace_output(out / "int8_llm.json", JSON) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
