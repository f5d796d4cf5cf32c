"""ONNX export hardening: onnxslim with validation after it, the external-data threshold, every family's
layer at several shapes, and a module that does not export named."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgeslim.core.errors import ExportValidationError
from edgeslim.export.onnx import to_onnx
from edgeslim.export.validate import check_parity
from edgeslim.core.specs import TensorSpec, example_feeds

torch.set_num_threads(1)
VEC = [TensorSpec("x", ("batch", 12))]
SEQ = [TensorSpec("x", ("batch", "sequence", 12))]
IMG = [TensorSpec("x", ("batch", 4, "height", "width"))]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3)).eval()


class Call(nn.Module):
    """Called as model(x=...), like every edgeslim model."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_slimmed_graph_is_validated_and_keeps_module_scopes(tmp_path):
    res = to_onnx(Call(mlp()), VEC, tmp_path / "m.onnx")
    assert res.slimmed and res.notes == [] and res.data_path is None
    graph = onnx.load(str(res.path)).graph
    assert any(p.key == "pkg.torch.onnx.name_scopes" for n in graph.node for p in n.metadata_props)
    assert all(c.ok for c in res.checks) and len({c.onnx_shape for c in res.checks}) == 2


def test_a_slimmed_graph_that_fails_parity_falls_back_with_a_note(tmp_path, monkeypatch):
    import onnxslim

    real = onnxslim.slim

    def broken(model, *args, **kwargs):  # a clean-up that changes the numbers
        out = real(model, *args, **kwargs)
        init = out.graph.initializer[0]
        init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 1.5, init.name))
        return out
    monkeypatch.setattr(onnxslim, "slim", broken)
    model = Call(mlp())
    res = to_onnx(model, VEC, tmp_path / "m.onnx")
    assert not res.slimmed and "onnxslim's graph failed validation" in res.notes[0]
    check_parity(res.path, model, example_feeds(VEC, {"batch": 5}, seed=3))  # the kept graph is right


def test_weights_over_the_threshold_go_to_external_data(tmp_path):
    model = Call(mlp())
    small = to_onnx(model, VEC, tmp_path / "small.onnx")
    assert small.data_path is None and not (tmp_path / "small.onnx.data").exists()
    big = to_onnx(model, VEC, tmp_path / "big.onnx", external_data_bytes=1024)  # ~1.9 KB of weights
    assert big.data_path == tmp_path / "big.onnx.data" and big.data_path.stat().st_size >= 4 * (12 * 32)
    assert big.file_bytes == big.path.stat().st_size + big.data_path.stat().st_size
    assert any(i.data_location == onnx.TensorProto.EXTERNAL
               for i in onnx.load(str(big.path), load_external_data=False).graph.initializer)
    assert "not slimmed" in big.notes[0]
    check_parity(big.path, model, example_feeds(VEC, {"batch": 4}, seed=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data", "small.onnx"]  # no temps


def _families():
    """One replacement layer of every family, built from a trained layer, with the input it takes."""
    from edgeslim.compress.compacter import LoRALinear
    from edgeslim.compress.separable_conv import SeparableConv2d
    from edgeslim.compress.subpixel import SubPixelConv2d
    from edgeslim.compress.svd import LowRankLinear
    from edgeslim.compress.tensornet import MPOLinear
    torch.manual_seed(0)
    lin = nn.Linear(12, 16)
    lora = LoRALinear.from_linear(nn.Linear(12, 16), rank=2, alpha=4.0)
    with torch.no_grad():
        lora.lora_b.normal_()  # B starts at zero: make the adapter path count
    return {
        "lowrank": (LowRankLinear.from_linear(lin, rank=4), SEQ),
        "mpo": (MPOLinear.from_linear(lin, rank=3, in_factors=(3, 4), out_factors=(4, 4)), SEQ),
        "lora": (lora, VEC),
        "separable_conv": (SeparableConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1), rank=2), IMG),
        "subpixel": (SubPixelConv2d.from_conv_transpose(nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1)), IMG),
    }


@pytest.mark.parametrize("family", ["lowrank", "mpo", "lora", "separable_conv", "subpixel"])
def test_every_family_exports_with_dynamic_axes_checked_at_several_shapes(family, tmp_path):
    layer, spec = _families()[family]
    names = sorted({d for s in spec for d in s.shape if isinstance(d, str)})
    shapes = [{n: v for n in names} for v in (3, 5, 9)]  # three sizes of every dynamic axis
    res = to_onnx(Call(layer.eval()), spec, tmp_path / f"{family}.onnx", validate_dims=shapes)
    assert len({c.onnx_shape for c in res.checks}) == 3 and all(c.ok for c in res.checks)


@torch.library.custom_op("edgeslim_test::wobble", mutates_args=())
def wobble(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@wobble.register_fake
def _(x):
    return torch.empty_like(x)


class Wobbly(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return wobble(x)


def test_an_op_without_onnx_translation_names_its_module(tmp_path):
    torch.manual_seed(0)
    model = Call(nn.Sequential(nn.Linear(12, 8), nn.Sequential(nn.ReLU(), Wobbly()), nn.Linear(8, 2))).eval()
    with pytest.raises(ExportValidationError, match=r"does not export: inner\.1\.1"):
        to_onnx(model, VEC, tmp_path / "w.onnx")
    assert not (tmp_path / "w.onnx").exists()


def test_export_bundle_holds_model_tokenizer_spec_and_hashes(in_tmp):
    import json

    from edgeslim.cli import main
    from edgeslim.core.files import sha256_file
    assert main(["export", "tiny-bert", "--bundle", "-o", "b.bundle"]) == 0
    folder = in_tmp / "b.bundle"
    meta = json.loads((folder / "bundle.json").read_text())
    assert meta["format"] == "edgeslim-bundle" and meta["model"] == "model.onnx" and meta["task"]
    assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask"]
    assert "tokenizer_config.json" in meta["files"] and "model.onnx" in meta["files"]
    assert all(sha256_file(folder / n) == h for n, h in meta["files"].items())
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(folder))  # a device app needs nothing else to feed the model
    import onnxruntime as ort
    enc = tok(["a short sentence"], return_tensors="np")
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input_ids": enc["input_ids"].astype(np.int64),
                          "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
    assert out.shape[0] == 1
    (folder / "stray.txt").write_text("x")  # a file edgeslim did not write: the bundle is no longer only its own
    assert main(["export", "tiny-bert", "--bundle", "-o", "b.bundle"]) == 2
    assert (folder / "stray.txt").read_text() == "x"
    (folder / "stray.txt").unlink()
    assert main(["export", "tiny-bert", "--bundle", "-o", "b.bundle"]) == 0  # its own bundle is replaced whole


def test_bundle_refuses_a_foreign_folder(in_tmp):
    from edgeslim.cli import main
    (in_tmp / "mine").mkdir()
    (in_tmp / "mine" / "notes.txt").write_text("keep me")
    assert main(["export", "tiny-mlp", "--bundle", "-o", "mine"]) == 2
    assert (in_tmp / "mine" / "notes.txt").read_text() == "keep me"
