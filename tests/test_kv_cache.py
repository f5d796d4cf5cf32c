"""Key/value-cache ONNX export of causal LMs (export/kv_cache.py) and its ORT decoder (runtime/kv_decoder.py),
on tiny random models of every architecture the issue names, in every cache layout (Optimum's present = past +
new, the buffer layout of export/kv_buffer.py with runtime/kv_buffer.py, and the shared layout of export/gqa.py):
logits parity at past 0, 1, 100
and greedy tokens equal to torch generate (both checked inside to_onnx_cache; asserted again here)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeslim.core.errors import ConfigError
from edgeslim.export.kv_cache import GREEDY_TOKENS, PARITY_PASTS, to_onnx_cache
from edgeslim.runtime import kv_buffer
from edgeslim.runtime.kv_decoder import LAYOUTS, open_cache_graph, past_arrays

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=192)


def tiny(arch: str, head: int = 8) -> torch.nn.Module:
    """A tiny random causal LM of `arch` (seeded), heads of `head` (16 for GroupQueryAttention's rotary)."""
    t = transformers
    torch.manual_seed(0)
    SMALL = dict(globals()["SMALL"], hidden_size=4 * head)
    if arch == "llama":
        cfg = t.LlamaConfig(**SMALL, num_key_value_heads=2)
        return t.LlamaForCausalLM(cfg).eval()
    if arch == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**SMALL, num_key_value_heads=2)).eval()
    if arch == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(**SMALL, num_key_value_heads=1)).eval()
    if arch == "phi3":
        return t.Phi3ForCausalLM(t.Phi3Config(**SMALL, num_key_value_heads=2, pad_token_id=0)).eval()
    if arch == "gemma":
        return t.GemmaForCausalLM(t.GemmaConfig(**SMALL, num_key_value_heads=1, head_dim=head)).eval()
    if arch == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=192)).eval()
    if arch == "gpt_neox":
        return t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**SMALL)).eval()
    if arch == "opt":
        return t.OPTForCausalLM(t.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=192,
                                            word_embed_proj_dim=32)).eval()
    raise ValueError(arch)


FAST = ["llama", "gpt2", "qwen2"]
ROTATE_HALF = {"llama", "qwen2", "mistral", "phi3", "gemma"}  # full-width rotate-half rope: fused (export/rotary.py)
SLOW = ["mistral", "phi3", "gemma", "gpt_neox", "opt"]
# the shared layout's attention as GroupQueryAttention (export/gqa.py); Mistral's sliding-window cache slices its
# present, and the others have no rotate-half rope: those keep Optimum's layout
GQA = ROTATE_HALF - {"mistral"}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", FAST + [pytest.param(a, marks=pytest.mark.slow) for a in SLOW])
def test_cache_graph_matches_torch(arch, layout, tmp_path, monkeypatch):
    # a buffer of 4-slot chunks: the greedy checks write past unwritten (masked) slots and grow it many times
    monkeypatch.setattr(kv_buffer, "CHUNK", 4)
    hf = tiny(arch, 16 if layout == "shared" else 8)
    res = to_onnx_cache(hf, tmp_path / "m.onnx", positions=192, layout=layout)
    fused = layout == "shared" and arch in GQA
    layout = "optimum" if layout == "shared" and not fused else layout
    assert res.layout == layout and res.greedy_equal == 3
    assert set(res.max_abs_diff) == set(PARITY_PASTS)
    assert max(res.max_abs_diff.values()) < 1e-4
    import onnx
    ops = [n.op_type for n in onnx.load(str(res.path)).graph.node]
    # q and k of each layer: one RotaryEmbedding each, or inside the layer's GroupQueryAttention
    assert ops.count("RotaryEmbedding") == (2 * res.layers if arch in ROTATE_HALF and not fused else 0)
    assert ops.count("GroupQueryAttention") == (res.layers if fused else 0)
    assert ops.count("Softmax") == (0 if fused else res.layers)
    graph = open_cache_graph(res.path)
    names = {i.name for i in graph.session.get_inputs()}
    assert {"input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.1.value"} <= names
    assert ("position_ids" in names) == (arch != "opt")
    outs = [o.name for o in graph.session.get_outputs()]
    new = "new_key_values.1.value" if layout == "buffer" else "present.1.value"
    assert outs[0] == "logits" and new in outs and graph.layout == layout and graph.meta["cache_layout"] == layout
    # batch and past are dynamic: a batch of 3 with a past of 7 runs, and a prompt in one call equals
    # the same prompt fed token by token through the cache
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 96, (3, 6))
    whole, _ = graph.step(ids, graph.empty_past(3))
    past = graph.empty_past(3)
    for j in range(6):
        logits, past = graph.step(ids[:, j:j + 1], past)
    assert graph.check_past(past, 3) == 6 and past_arrays(past)["past_key_values.0.key"].shape[2] == 6
    np.testing.assert_allclose(logits[:, -1], whole[:, -1], atol=1e-4)
    if layout != "optimum":  # a past given as arrays goes into a buffer (free slots after it); a buffer of another
        # batch is refused
        for start in (5, 2):  # one new token, then three at once after the past
            again, _ = graph.step(ids[:, start:], {k: v[:, :, :start] for k, v in past_arrays(past).items()})
            np.testing.assert_allclose(again[:, -1], whole[:, -1], atol=1e-4)
        with pytest.raises(ConfigError, match="cache buffer holds batch 3"):
            graph.step(ids[:1, :1], past)
    # logits_to_keep: an optional input (Optimum's names alone still give every position); generation asks
    # for the last position only and gets the same row
    assert graph.keeps_logits and "logits_to_keep" not in names
    last, _ = graph.step(ids, graph.empty_past(3), last=True)
    assert last.shape == (3, 1, 96)
    np.testing.assert_allclose(last[:, 0], whole[:, -1], atol=1e-5)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), **past_arrays(graph.empty_past(3))}
    if "position_ids" in names:
        feeds["position_ids"] = np.broadcast_to(np.arange(6), (3, 6)).copy()
    assert graph.session.run(["logits"], feeds)[0].shape == (3, 6, 96)
    # torch generate, once more, from the file alone
    prompt = [5, 17, 3, 44]
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS,
                          do_sample=False, pad_token_id=0, eos_token_id=None)[0, 4:].tolist()
    assert graph.generate(prompt, GREEDY_TOKENS).tokens == ref


def test_decoder_refuses_bad_input(tmp_path):
    res = to_onnx_cache(tiny("llama"), tmp_path / "m.onnx", positions=40)
    graph = open_cache_graph(res.path)
    past = graph.empty_past(1)
    past["past_key_values.1.key"] = np.zeros((1, 3, 0, 8), np.float32)  # 3 kv heads, the graph has 2
    with pytest.raises(ConfigError, match="past_key_values.1.key has shape"):
        graph.step(np.zeros((1, 2), np.int64), past)
    with pytest.raises(ConfigError, match="must be > 0"):
        list(graph.stream([1, 2], 0))
    with pytest.raises(ConfigError, match="at most 40"):
        list(graph.stream(list(range(41)), 4))
    out = graph.generate(list(range(30)), 64)  # 30 + 10 = the 40 positions: stops there and says so
    assert out.stopped == "positions" and len(out.tokens) == 11
    assert graph.generate([1, 2, 3], 5).stopped == "length"


def test_non_causal_model_is_refused(tmp_path):
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ConfigError, match="not a Hugging Face causal LM"):
        to_onnx_cache(bert, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("method, params", [("svd", {"ratio": 0.5}), ("prune", {"ratio": 0.5}),
                                            pytest.param("mpo", {"ratio": 0.5}, marks=pytest.mark.slow)])
def test_compressed_models_export_their_cache(method, params, tmp_path):
    from edgeslim.compress.base import CompressContext, get_compressor
    from edgeslim.tasks import TextModel, text_inputs
    model = TextModel(tiny("llama"), "logits").eval()
    comp = get_compressor(method)
    context = CompressContext(inputs=tuple(text_inputs(96)), dims={"batch": 2, "sequence": 16}, task="causal-lm")
    result = comp.compress(model, comp.make_config(params), None, context=context)
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in model.parameters())
    res = to_onnx_cache(result.model, tmp_path / "m.onnx", positions=192)
    assert res.greedy_equal == 3 and max(res.max_abs_diff.values()) < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3", "gemma"])
def test_grouped_attention_equals_eager(arch):
    """export/attention.py folds the query heads of a kv head into its rows: the logits equal eager's."""
    from edgeslim.export.attention import grouped_attention
    model = tiny(arch)
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eager = model(ids, attention_mask=torch.ones_like(ids)).logits
        with grouped_attention(model) as grouped:
            folded = model(ids, attention_mask=torch.ones_like(ids)).logits
    assert grouped and model.config._attn_implementation == "eager"
    torch.testing.assert_close(folded, eager, rtol=1e-5, atol=1e-5)


def test_grouped_cache_graph_does_not_expand_the_past(tmp_path, monkeypatch):
    import onnx
    from edgeslim.export import attention
    counts = {}
    for grouped in (True, False):
        if not grouped:
            monkeypatch.setattr(attention, "GROUPED_FAMILIES", frozenset())
        res = to_onnx_cache(tiny("llama"), tmp_path / f"{grouped}.onnx")  # validated against eager torch
        counts[grouped] = sum(n.op_type == "Expand" for n in onnx.load(str(res.path)).graph.node)
    assert counts[False] - counts[True] == 2 * res.layers  # repeat_kv of keys and values, per layer


def test_logits_to_keep_slices_before_the_head(tmp_path):
    """export/last_logits.py on a bare head (MatMul, then a bias Add): 0 keeps every position, n the last n."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from edgeslim.export.last_logits import add_logits_to_keep
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((8, 5)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["h", "w"], ["z"]), helper.make_node("Add", ["z", "b"], ["logits"])],
                              "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", "sequence", 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", 5])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    assert add_logits_to_keep(model) and not add_logits_to_keep(model)  # once
    onnx.save(model, str(tmp_path / "head.onnx"))
    session = ort.InferenceSession(str(tmp_path / "head.onnx"), providers=["CPUExecutionProvider"])
    h = rng.standard_normal((2, 4, 8)).astype(np.float32)
    full = session.run(None, {"h": h})[0]
    np.testing.assert_allclose(full, h @ w + b, rtol=1e-6, atol=1e-6)
    for n in (0, 1, 3):
        np.testing.assert_array_equal(session.run(None, {"h": h, "logits_to_keep": np.array(n, np.int64)})[0],
                                      session.run(None, {"h": h[:, -n:] if n else h})[0])


def test_a_graph_without_logits_to_keep_still_generates(tmp_path, monkeypatch):
    """Older cache graphs (no logits_to_keep): step(last=True) returns every position, generation is the same."""
    from edgeslim.export import kv_cache
    monkeypatch.setattr(kv_cache, "add_logits_to_keep", lambda model: False)
    res = to_onnx_cache(tiny("llama"), tmp_path / "m.onnx", positions=192)
    assert res.greedy_equal == 3 and any("no logits_to_keep" in n for n in res.notes)
    graph = open_cache_graph(res.path)
    ids = np.random.default_rng(1).integers(0, 96, (1, 5))
    assert not graph.keeps_logits and graph.step(ids, graph.empty_past(1), last=True)[0].shape == (1, 5, 96)


def test_buffer_layout_reads_the_past_in_place(tmp_path):
    """No node of a buffer-layout graph concatenates (copies) a past input; Optimum's does, once per input."""
    import onnx
    concats = {}
    for layout in LAYOUTS:
        graph = onnx.load(str(to_onnx_cache(tiny("qwen2", 16), tmp_path / f"{layout}.onnx", positions=192,
                                            layout=layout).path)).graph
        concats[layout] = sum(n.op_type == "Concat" and any(i.startswith("past_key_values.") for i in n.input)
                              for n in graph.node)
    assert concats == {"optimum": 4, "buffer": 0, "shared": 0}


def test_shared_layout_writes_the_past_in_place(tmp_path):
    """GroupQueryAttention writes the new keys into the buffer bound as both past and present: after a step the
    buffer's own array holds what a plain (Optimum-style) call of the same graph returns as present. A padded mask
    is refused; a model without rotate-half rope keeps Optimum's layout and says why."""
    res = to_onnx_cache(tiny("llama", 16), tmp_path / "m.onnx", positions=192, layout="shared")
    graph = open_cache_graph(res.path)
    ids = np.array([[3, 9, 4]])
    _, past = graph.step(ids, graph.empty_past(1))
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, 3), np.int64), "position_ids": np.arange(3)[None],
             **{k: v[:, :, :0] for k, v in past_arrays(past).items()}}
    present = graph.session.run(["present.0.key", "present.1.value"], feeds)
    assert past.capacity > past.length == 3
    np.testing.assert_array_equal(past.arrays["past_key_values.0.key"][:, :, :3], present[0])
    np.testing.assert_array_equal(past.arrays["past_key_values.1.value"][:, :, :3], present[1])
    with pytest.raises(ConfigError, match="takes padding only after a prompt"):
        graph.step(np.array([[5]]), past, attention_mask=np.array([[0, 1, 1, 1]]))
    with pytest.raises(ConfigError, match=r"attention_mask has shape \[1, 3\]"):  # the mask covers past + new
        graph.step(np.array([[5]]), past, attention_mask=np.ones((1, 3), np.int64))
    gpt2 = to_onnx_cache(tiny("gpt2"), tmp_path / "gpt2.onnx", positions=192, layout="shared")
    assert gpt2.layout == "optimum" and any("shared cache layout refused" in n for n in gpt2.notes)


def test_shared_layout_falls_back_when_a_layer_does_not_fuse(tmp_path, monkeypatch):
    """A layer whose attention GroupQueryAttention cannot replace (another form): exported again in the fallback."""
    from edgeslim.export import kv_cache
    monkeypatch.setattr(kv_cache, "fuse_group_query_attention", lambda *args: 1)
    res = to_onnx_cache(tiny("llama", 16), tmp_path / "m.onnx", positions=192, layout="shared", fallback="buffer")
    assert res.layout == "buffer" and res.greedy_equal == 3
    assert res.notes[0].startswith("shared cache layout refused (1 of 2 layers' attention")
    assert open_cache_graph(res.path).layout == "buffer"
    with pytest.raises(ConfigError, match="fallback 'shared'"):
        to_onnx_cache(tiny("llama", 16), tmp_path / "x.onnx", layout="shared", fallback="shared")


def test_buffer_layout_refused_for_a_short_sliding_window(tmp_path):
    """A window shorter than the positions measures slot distances, which the buffer's gap would change."""
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, num_key_value_heads=1, sliding_window=160))
    res = to_onnx_cache(hf.eval(), tmp_path / "m.onnx", positions=192, layout="buffer")
    assert res.layout == "optimum" and any("sliding-window" in n for n in res.notes) and res.greedy_equal == 3
    assert open_cache_graph(res.path).layout == "optimum"
