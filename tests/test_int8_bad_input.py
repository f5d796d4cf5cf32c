"""INT8 bad input: a calibration set smaller than the subset asked for, NaN or constant calibration inputs,
a record whose ranges are not finite: one line, exit 2 or 3, nothing written; and the samples counted."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeslim.cli import main
from edgeslim.compress.quantize import calibration_batches
from edgeslim.core.errors import ConfigError
from test_bad_input import one_line_error

pytest.importorskip("nncf")


def _int8(tensors: dict, *extra: str) -> list[str]:
    from safetensors.torch import save_file
    save_file(tensors, "calib.safetensors")
    return ["compress", "tiny-mlp", "-m", "int8", "--calib", "calib.safetensors", *extra, "-o", "q.slim"]


def _nan() -> torch.Tensor:
    x = torch.randn(8, 16)
    x[5, 3] = float("nan")
    return x


@pytest.mark.parametrize("make, code, message", [
    (lambda: _int8({"x": _nan()}), 3, "NaN or Inf in input 'x'"),  # the file loader's own check
    (lambda: _int8({"x": torch.full((8, 16), 0.5)}), 2, "every input is constant ('x' is 0.5 everywhere)"),
    (lambda: _int8({"x": torch.randn(8, 16)}, "--set", "subset_size=32"), 2,
     "subset_size=32 asks for more samples than the 8 the data has"),
])
def test_bad_calibration_is_one_line_and_writes_nothing(in_tmp, capfd, make, code, message):
    args = make()
    before = sorted(p.name for p in in_tmp.iterdir())
    assert main(args) == code
    err = capfd.readouterr().err
    one_line_error(err)
    assert message in err, err
    assert sorted(p.name for p in in_tmp.iterdir()) == before


def test_samples_are_counted_not_batches():
    batches = [{"x": np.random.default_rng(i).random((16, 4), dtype=np.float32)} for i in range(3)]
    assert calibration_batches(batches, None, "t") == (3, 48)  # all of it, under the default 300
    assert calibration_batches(batches, 16, "t") == (1, 16)
    assert calibration_batches(batches, 20, "t") == (2, 32)  # whole batches: at least what was asked
    assert calibration_batches(batches, 48, "t") == (3, 48)
    with pytest.raises(ConfigError, match="subset_size=49 .* 48 the data has"):
        calibration_batches(batches, 49, "t")
    nan = [dict(b) for b in batches]
    nan[2]["x"] = np.where(np.arange(4) == 1, np.inf, nan[2]["x"]).astype(np.float32)
    with pytest.raises(ConfigError, match=r"input 'x' holds NaN or inf \(batch 2\)"):  # library callers' data
        calibration_batches(nan, None, "t")
    ids = [{"input_ids": np.ones((16, 8), np.int64), "x": b["x"]} for b in batches]
    assert calibration_batches(ids, None, "t") == (3, 48)  # constant integer inputs (a mask) are fine


def test_the_record_says_how_many_samples_calibrated(in_tmp):
    assert main(["compress", "tiny-mlp", "-m", "int8", "--calib", "random:32", "-o", "q.slim"]) == 0
    steps = json.loads((in_tmp / "q.slim" / "manifest.json").read_text())["steps"]
    assert steps[-1]["resolved"]["calibration_samples"] == 32


@pytest.mark.parametrize("key, value", [("output_ranges", [0.0, float("inf")]), ("tanh_table", [float("nan"), 1.0]),
                                        ("output_ranges", [2.0, 1.0]), ("changed", [1.0, float("nan")])])
def test_a_record_with_non_finite_ranges_is_refused(in_tmp, capfd, key, value):
    assert main(["compress", "tiny-mlp", "-m", "int8", "--calib", "random:32", "-o", "q.slim"]) == 0
    manifest = in_tmp / "q.slim" / "manifest.json"
    data = json.loads(manifest.read_text())
    resolved = data["steps"][-1]["resolved"]
    if key == "changed":
        resolved["changed"] = {"some_bias": value}
    else:
        resolved[key] = {"some_tensor": value}
    manifest.write_text(json.dumps(data).replace("Infinity", "1e999"))
    capfd.readouterr()
    assert main(["export", "q.slim", "-o", "q.onnx"]) == 3
    err = capfd.readouterr().err
    one_line_error(err)
    assert "not finite" in err or "not a finite range" in err, err
    assert not (in_tmp / "q.onnx").exists()
