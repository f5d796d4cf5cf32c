"""Contract v2: every registered compressor, on a tiny case of its own, keeps the same promises.

A family author adds one entry to CASES (a tiny source, a config, tiny data, a lossless setting if
the family has one); a registered compressor without one fails `test_contract` and says so.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, get_args

import pytest
import torch
from torch import nn

from edgeslim import artifact, pipeline
from edgeslim.core.calib import CalibData
from edgeslim.cli import main
from edgeslim.compress import base
from edgeslim.compress.base import CompressContext, Compressor, Kind, Status, get_compressor, list_compressors
from edgeslim.core.config import ConfigBase, parse_text
from edgeslim.core.errors import ConfigError, EdgeslimError, MissingDependencyError
from edgeslim.recipe import parse_recipe
from edgeslim.sources import LoadedModel, load_model
from edgeslim.core.specs import TensorSpec
from edgeslim.trust import Trust

torch.set_num_threads(1)


# ---------- tiny models (factory sources "test_contract:NAME"; tests/ is on sys.path under pytest)

class Rank4MLP(nn.Module):
    """16 -> 64 -> 64 -> 8 MLP whose weights are exactly rank 4: rank-4 factoring is lossless."""

    edgeslim_inputs = [TensorSpec("x", ("batch", 16))]

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 8)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in (self.fc1, self.fc2, self.head):
                m, n = layer.weight.shape
                layer.weight.copy_(torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g) / n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def rank4_mlp() -> nn.Module:
    return Rank4MLP().eval()


class Encoder(nn.Module):
    """One nn.TransformerEncoderLayer: its attention reads out_proj.weight directly."""

    edgeslim_inputs = [TensorSpec("x", ("batch", "sequence", 32))]

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def encoder() -> nn.Module:
    return Encoder().eval()


class Rank4CNN(nn.Module):
    """3x3 conv, then two 1x1 convs whose kernels are exactly rank 4: rank-4 factoring of those is lossless."""

    edgeslim_inputs = [TensorSpec("x", ("batch", 2, "height", "width"))]

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2, self.c3 = nn.Conv2d(2, 16, 3, padding=1), nn.Conv2d(16, 32, 1), nn.Conv2d(32, 8, 1)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for conv in (self.c2, self.c3):
                m, n = conv.weight.shape[:2]
                conv.weight.copy_((torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g) / n)[:, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


def rank4_cnn() -> nn.Module:
    return Rank4CNN().eval()


# ---------- tiny data

def random_inputs(loaded: LoadedModel, batches: int = 3, seed: int = 0) -> CalibData:
    """Random batches that fit the source's input spec (no targets: distillation)."""
    from edgeslim.core.specs import example_feeds
    dims = {**loaded.dims, "batch": 8}
    return CalibData("random", [{k: torch.from_numpy(v) for k, v in example_feeds(loaded.inputs, dims, seed + i).items()}
                                for i in range(batches)])


def distilled(loaded: LoadedModel) -> CalibData:
    from edgeslim.compress.train import teacher_targets
    return teacher_targets(loaded.model, random_inputs(loaded))


def sr_pairs(loaded: LoadedModel, scale: int = 2) -> CalibData:
    hr = torch.rand(16, 1, 8 * scale, 8 * scale, generator=torch.Generator().manual_seed(0))
    lr = nn.functional.avg_pool2d(hr, scale)
    return CalibData("tiny-sr", [{"x": lr[:8]}, {"x": lr[8:]}], [hr[:8], hr[8:]])


def labelled_text(loaded: LoadedModel) -> CalibData:
    """Two classes of toy sentences for a text model (adapter training)."""
    texts = ["good great fine", "bad awful poor", "nice good", "sad bad"] * 2
    return CalibData("toy-labelled", [loaded.encode(texts[:4]), loaded.encode(texts[4:])],
                     [torch.tensor([0, 1, 0, 1])] * 2)


@dataclass
class Case:
    """A family's tiny case: source, config, data, and its lossless setting if it has one."""

    source: str  # zoo name or "test_contract:factory"
    config: dict[str, Any]
    calib: Callable[[LoadedModel], CalibData] | None = None
    lossless: dict[str, Any] | None = None  # a config whose output equals the original's (None: none)
    atol: float = 1e-5
    dims: dict[str, int] = field(default_factory=dict)  # sizes of named dims for the test inputs


RANK4 = "test_contract:rank4_mlp"
CASES: dict[str, Case] = {
    "svd": Case(RANK4, {"ratio": 0.5}, lossless={"rank": 4}),
    "fwsvd": Case(RANK4, {"ratio": 0.5}, random_inputs, lossless={"rank": 4}),
    "asvd": Case(RANK4, {"ratio": 0.5}, random_inputs, lossless={"rank": 4}),
    "heal": Case("tiny-mlp", {"steps": 3, "lr": 1e-3}, distilled),
    "prune": Case("tiny-mlp", {"ratio": 0.5, "criterion": "merge"}, random_inputs, lossless={"ratio": 1.0}),
    "sparsify": Case("tiny-mlp", {"pattern": "2:4"}, lossless={"sparsity": 0.0}),
    "deconv_to_subpixel": Case("deconv-sr-x3", {}, lossless={}, dims={"height": 9, "width": 7}),
    "factorize": Case("test_contract:rank4_cnn", {"ratio": 0.5, "n_iter": 5},
                      lossless={"rank": 4, "target": ["c2", "c3"]}, dims={"height": 9, "width": 7}),
    # adapters: one pass over the two batches (the default picks ~60 from the data size; test_compacter.py tests it)
    "compacter": Case("tiny-bert", {"labels": ["neg", "pos"], "reduction": 4, "epochs": 1}, labelled_text,
                      lossless={"reduction": 4, "epochs": 0}),
    "compacter_pp": Case("tiny-bert", {"labels": ["neg", "pos"], "reduction": 4, "epochs": 1}, labelled_text,
                         lossless={"reduction": 4, "epochs": 0}),
    "bottleneck": Case("tiny-bert", {"labels": ["neg", "pos"], "reduction": 4, "placement": "ffn", "epochs": 1},
                       labelled_text,
                       lossless={"reduction": 4, "epochs": 0}),
    "lora": Case("tiny-bert", {"labels": ["neg", "pos"], "rank": 2, "epochs": 1}, labelled_text, lossless={"epochs": 0}),
    "head": Case("tiny-bert", {"labels": ["neg", "pos"], "epochs": 1}, labelled_text),
    # MPO: exactness needs full bonds, which never save parameters (tests/test_tensornet.py proves it)
    "mpo": Case(RANK4, {"ratio": 0.5, "cores": 2}, random_inputs),
    "espcn": Case("bicubic-x2", {"scale": 2, "channels": [4, 4], "steps": 3, "batch_size": 4}, sr_pairs,
                  dims={"height": 9, "width": 7}),
    "int8": Case(RANK4, {"subset_size": 16}, random_inputs),  # torch model unchanged; QDQ in the ONNX stage
    "wq": Case(RANK4, {"mode": "int4", "group_size": 16}),  # data-free; lossy at every setting
}


def feeds_for(loaded: LoadedModel, dims: dict[str, int]) -> dict[str, torch.Tensor]:
    from edgeslim.core.specs import example_feeds
    return {k: torch.from_numpy(v) for k, v in example_feeds(loaded.inputs, {**loaded.dims, "batch": 3, **dims},
                                                             seed=5).items()}


@pytest.mark.parametrize("name", sorted(list_compressors()))
def test_contract(name, tmp_path):
    if name not in CASES:
        pytest.fail(f"compressor '{name}' is registered but has no case in tests/test_contract.py CASES: "
                    "add a tiny case for your family (source, config, calibration data, lossless setting)")
    case, comp = CASES[name], get_compressor(name)
    assert comp.kind in get_args(Kind) and isinstance(comp.schema, int)
    declared = comp.statistics(comp.make_config(case.config))  # what the one collector gathers for it
    assert declared is None or isinstance(declared, base.StatsRequest)
    loaded = load_model(case.source)
    calib = case.calib(loaded) if case.calib else None
    state, mode = copy.deepcopy(loaded.model.state_dict()), loaded.model.training
    context = CompressContext(inputs=tuple(loaded.inputs), align=1, profile="cpu-ort-fp32")
    result = comp.compress(loaded.model, comp.make_config(case.config), calib, context=context)

    # the caller's model is untouched
    after = loaded.model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert loaded.model.training == mode
    assert result.method == name and result.resolved["schema"] == comp.schema
    assert all(c.status in get_args(Status) for c in result.changes)

    # the config round-trips through the manifest; the result replays bit-exactly from the artifact
    path = artifact.save(tmp_path / "m.slim", result.model, loaded.source, [result.step_record()], loaded.inputs,
                         {}, loaded.task, loaded.dims)
    step = json.loads((path / "manifest.json").read_text())["steps"][0]
    assert step["config"] == result.config == comp.make_config(step["config"]).to_dict()
    again = artifact.load(path, Trust(any_factory=True))  # the test wrote it: its factory source may replay
    feeds = feeds_for(loaded, case.dims)
    with torch.no_grad():
        assert torch.equal(again.model(**feeds), result.model.eval()(**feeds))

    # the lossless setting is exact
    if case.lossless is not None:
        exact = comp.compress(loaded.model, comp.make_config(case.lossless), calib, context=context).model.eval()
        with torch.no_grad():
            torch.testing.assert_close(exact(**feeds), loaded.model(**feeds), atol=case.atol, rtol=1e-4)

    # ONNX export has parity (to_onnx raises ExportValidationError otherwise)
    from edgeslim.export.onnx import to_onnx
    exported = to_onnx(result.model, loaded.inputs, tmp_path / "m.onnx", dims=case.dims or None)
    assert max(exported.max_abs_diff.values()) < 1e-4


def test_every_builtin_family_is_an_entry_point():
    from importlib.metadata import entry_points
    modules = {ep.value for ep in entry_points(group=base.ENTRY_POINT_GROUP)}
    assert {"edgeslim.compress.svd", "edgeslim.compress.subpixel", "edgeslim.compress.train",
            "edgeslim.compress.compacter"} <= modules
    assert {type(get_compressor(n)).__module__ for n in list_compressors()} <= modules


@pytest.mark.parametrize("body, error", [(None, MissingDependencyError), ("raise RuntimeError('boom')\n", EdgeslimError)])
def test_a_family_that_fails_to_import_is_named(tmp_path, monkeypatch, body, error):
    from importlib.metadata import EntryPoint
    module = "edgeslim_no_such_family" if body is None else "edgeslim_broken_family"
    if body is not None:
        (tmp_path / f"{module}.py").write_text(body)
        monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("importlib.metadata.entry_points",
                        lambda group: [EntryPoint("mine", module, base.ENTRY_POINT_GROUP)])
    monkeypatch.setattr(base, "_loaded", [])
    with pytest.raises(error, match=f"compressor family 'mine' \\({module}\\)"):
        list_compressors()


def test_register_needs_a_kind():
    class NoKind(Compressor):
        name = "no_kind"

    with pytest.raises(ValueError, match="kind"):
        base.register(NoKind)
    assert "no_kind" not in list_compressors()


def test_unknown_resolved_schema_is_refused(tmp_path):
    loaded = load_model("tiny-mlp")
    result = get_compressor("svd").compress(loaded.model, {"rank": 4})
    record = result.step_record()
    record["resolved"]["schema"] = 99
    path = artifact.save(tmp_path / "m.slim", result.model, loaded.source, [record], loaded.inputs)
    from edgeslim.core.errors import SourceError
    with pytest.raises(SourceError, match=r"step 1 \(svd\).*schema 99.*reads schema 1"):
        artifact.load(path)


def test_manifest_values_must_be_json(tmp_path):
    loaded = load_model("tiny-mlp")
    result = get_compressor("svd").compress(loaded.model, {"rank": 4})
    record = result.step_record()
    record["resolved"]["oops"] = torch.tensor(1.0)
    with pytest.raises(TypeError, match="not JSON serializable"):
        artifact.save(tmp_path / "m.slim", result.model, loaded.source, [record], loaded.inputs)
    assert not (tmp_path / "m.slim").exists()


# ---------- a replacement inside a parent that reads `.weight` directly

def test_transformer_encoder_layer_artifact_runs_after_load(tmp_path):
    _, compressed, results, path = pipeline.compress_to_artifact(
        "test_contract:encoder", [{"method": "svd", "rank": 8}], tmp_path / "enc.slim", quiet=True)
    rows = {c.name: c for c in results[0].changes}
    assert rows["layer.self_attn.out_proj"].status == "skipped"
    assert rows["layer.linear1"].status == rows["layer.linear2"].status == "replaced"
    again = artifact.load(path, Trust("test_contract:encoder"))
    x = torch.randn(2, 5, 32)
    with torch.no_grad():  # eval + no grad: the fused fast path of TransformerEncoderLayer
        assert torch.equal(again.model(x=x), compressed.model(x=x))
    from edgeslim.export.onnx import to_onnx
    assert max(to_onnx(again.model, again.inputs, tmp_path / "enc.onnx").max_abs_diff.values()) < 1e-4


# ---------- the ONNX-level stage of the pipeline

class OnnxTag(Compressor):
    """Test-only: changes nothing in torch, tags the exported graph in its ONNX stage."""

    name, Config, kind, has_onnx_stage = "onnx_tag", ConfigBase, "quantized", True

    def compress(self, model, config, calib=None, inplace=False, context=None):
        return self.result(base.working_copy(model, inplace), self.make_config(config), [], {"tag": "tagged"})

    def replay(self, model, resolved, inputs):
        return model

    def onnx_stage(self, resolved, onnx_in, onnx_out, context):
        import onnx
        graph = onnx.load(str(onnx_in))
        onnx.helper.set_model_props(graph, {"edgeslim_tag": resolved["tag"], "align": str(context.align)})
        onnx.save(graph, str(onnx_out))


def onnx_props(path) -> dict[str, str]:
    import onnx
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.mark.parametrize("cpu_simd_width", [8, 16], indirect=True)  # a local CPU target: AVX2 and AVX-512
def test_onnx_stage_runs_after_export(in_tmp, monkeypatch, cpu_simd_width):
    monkeypatch.setitem(base._REGISTRY, "onnx_tag", OnnxTag)
    recipe = parse_recipe({"source": "tiny-mlp", "step": [{"method": "onnx_tag"}]})
    original, compressed, _, path = pipeline.compress_to_artifact(recipe.source, recipe.steps, "t.slim", quiet=True)
    assert pipeline.apply_onnx_stages(original, in_tmp / "none.onnx") == []  # no step of the source has one
    assert main(["export", str(path), "-o", "t.onnx"]) == 0  # `run` exports through the same export_model
    assert onnx_props(in_tmp / "t.onnx") == {"edgeslim_tag": "tagged", "align": "None"}
    info = pipeline.export_model(compressed, "onnx", in_tmp / "p.onnx", "cpu-ort-fp32", quiet=True)
    assert info["onnx_stages"] == ["onnx_tag"] and info["onnx_bytes"] == (in_tmp / "p.onnx").stat().st_size
    assert onnx_props(in_tmp / "p.onnx") == {"edgeslim_tag": "tagged", "align": str(cpu_simd_width)}


# ---------- the same decisions from every entry point

@pytest.mark.parametrize("cpu_simd_width", [8, 16], indirect=True)  # a local CPU target: AVX2 and AVX-512
def test_compress_and_a_one_step_run_decide_the_same(in_tmp, cpu_simd_width):
    assert main(["compress", "tiny-mlp", "-m", "svd", "--ratio", "0.4", "-o", "c.slim"]) == 0
    recipe = parse_recipe({"source": "tiny-mlp", "step": [{"method": "svd", "ratio": 0.4}]})
    # what pipeline.run does before exporting and profiling
    pipeline.compress_to_artifact(recipe.source, recipe.steps, "r.slim", quiet=True, profile=recipe.profile)
    one, two = (json.loads((in_tmp / p / "manifest.json").read_text())["steps"][0] for p in ("c.slim", "r.slim"))
    assert one["resolved"]["ranks"] == two["resolved"]["ranks"] and one["config"] == two["config"]
    assert one["config"]["align"] == cpu_simd_width and one["config"]["allocation"] == "uniform"  # resolved, recorded
    timed = ("latency_ms_before", "latency_ms_after", "note")  # measured per run (a note says whether it paid off)
    assert [{k: v for k, v in c.items() if k not in timed} for c in one["changes"]] == \
        [{k: v for k, v in c.items() if k not in timed} for c in two["changes"]]


# ---------- typed configs

@dataclass(frozen=True)
class KindsConfig(ConfigBase):
    count: int = 1
    scale: float = 1.0
    flag: bool = False
    label: str = "a"
    mode: Literal["x", "y"] = "x"
    limit: float | None = None
    names: tuple[str, ...] = ()
    kernel: int | tuple[int, ...] = 3
    sizes: dict[str, int] = field(default_factory=dict)


@pytest.mark.parametrize("key, value, message", [
    ("count", 1.5, "'count' must be an integer, got 1.5"),
    ("count", True, "'count' must be an integer, got True"),
    ("scale", "0.5", "'scale' must be a number, got '0.5'"),
    ("flag", 1, "'flag' must be true or false, got 1"),
    ("label", 3, "'label' must be a string, got 3"),
    ("mode", "z", "'mode' must be 'x' or 'y', got 'z'"),
    ("limit", "abc", "'limit' must be a number or none, got 'abc'"),
    ("names", "a", "'names' must be a list (each item a string), got 'a'"),
    ("kernel", [3, "a"], "'kernel' must be an integer or a list (each item an integer), got [3, 'a']"),
    ("sizes", {"h": "b"}, "'sizes' must be a table (each value an integer)"),
])
def test_type_errors_name_key_type_and_value(key, value, message):
    with pytest.raises(ConfigError, match="^" + re.escape(f"where: {message}")):
        KindsConfig.from_dict({key: value}, where="where")
    with pytest.raises(ConfigError, match="must be"):
        KindsConfig(**{key: value})  # direct construction is checked the same way


def test_values_are_converted_and_text_is_parsed():
    cfg = KindsConfig.from_dict({"scale": 2, "names": ["a", "b"], "kernel": [3, 3], "sizes": {"h": 4}})
    assert cfg.scale == 2.0 and isinstance(cfg.scale, float) and cfg.names == ("a", "b") and cfg.kernel == (3, 3)
    text = {"count": "8", "scale": "0.25", "flag": "true", "mode": "y", "limit": "0.5", "names": "a,b",
            "kernel": "3,5", "label": "3"}
    parsed = {k: parse_text(KindsConfig, k, v) for k, v in text.items()}
    assert KindsConfig.from_dict(parsed) == KindsConfig(8, 0.25, True, "3", "y", 0.5, ("a", "b"), (3, 5))
    assert parse_text(KindsConfig, "kernel", "3") == 3
    with pytest.raises(ConfigError, match="'scale' must be a number, got 'abc'"):
        parse_text(KindsConfig, "scale", "abc")
    with pytest.raises(TypeError, match="validate"):
        @dataclass(frozen=True)
        class Bad(ConfigBase):
            def __post_init__(self):
                pass


def test_cli_and_recipe_values_are_type_checked(in_tmp, capsys):
    assert main(["compress", "tiny-mlp", "-m", "svd", "--set", "ratio=abc"]) == 2
    assert "'ratio' must be a number or none, got 'abc'" in capsys.readouterr().err
    assert main(["compress", "tiny-mlp", "-m", "svd", "--set", "ratio=0.3", "--set", "calib_batch=4",
                 "-o", "m.slim"]) == 0
    assert json.loads((in_tmp / "m.slim" / "manifest.json").read_text())["steps"][0]["config"]["ratio"] == 0.3
    with pytest.raises(ConfigError, match="'ratio' must be a number or none, got '0.5'"):
        parse_recipe({"source": "tiny-mlp", "step": [{"method": "svd", "ratio": "0.5"}]})
    for section, bad in (("export", {"opset": "20"}), ("profile", {"iters": 2.5}), ("profile", {"batch": [1, "8"]})):
        with pytest.raises(ConfigError, match=rf"\[{section}\]: '\w+' must be"):
            parse_recipe({"source": "tiny-mlp", section: bad})
    with pytest.raises(ConfigError, match="'eval' must be a string or none"):
        parse_recipe({"source": "tiny-mlp", "eval": 3})
