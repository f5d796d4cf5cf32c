"""The .slim artifact: exact round trip, replay without data, refusal of corrupt or altered files."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from edgeslim import artifact
from edgeslim.core.calib import CalibData
from edgeslim.compress import get_compressor
from edgeslim.core.errors import SourceError
from edgeslim.sources import load_model


def compressed_mlp(method="svd", **cfg):
    loaded = load_model("tiny-mlp")
    comp = get_compressor(method)
    calib = CalibData("rand", [{"x": torch.randn(8, 16, generator=torch.Generator().manual_seed(i))} for i in range(4)])
    result = comp.compress(loaded.model, comp.make_config({"ratio": 0.5, **cfg}), calib)
    return loaded, result


def save(tmp_path, loaded, result, name="m.slim"):
    return artifact.save(tmp_path / name, result.model, loaded.source, [result.step_record()], loaded.inputs,
                         {"note": "test"}, loaded.task, loaded.dims)


def test_round_trip_reproduces_outputs_exactly(tmp_path):
    loaded, result = compressed_mlp()
    path = save(tmp_path, loaded, result)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["source"]["identifier"] == "tiny-mlp" and manifest["steps"][0]["method"] == "svd"
    assert set(manifest["files"]) == {"weights.safetensors", "report.json"}
    again = artifact.load(path)
    x = torch.randn(5, 16)
    assert torch.equal(again.model(x=x), result.model(x=x))
    assert [type(m).__name__ for m in again.model.modules()] == [type(m).__name__ for m in result.model.modules()]


def test_replay_needs_no_calibration_data(tmp_path, monkeypatch):
    loaded, result = compressed_mlp("fwsvd", allocation="sensitivity")
    path = save(tmp_path, loaded, result)
    import edgeslim.compress.statistics as statistics
    import edgeslim.compress.svd as svd
    import edgeslim.data as data

    def forbidden(*a, **k):
        raise AssertionError("replay touched calibration")
    monkeypatch.setattr(data, "load_calibration", forbidden)
    for module in (statistics, svd):
        for fn in [n for n in dir(module) if n.startswith("collect")]:
            monkeypatch.setattr(module, fn, forbidden)
    x = torch.randn(3, 16)
    assert torch.equal(artifact.load(path).model(x=x), result.model(x=x))


def test_unknown_format_version(tmp_path):
    path = save(tmp_path, *compressed_mlp())
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SourceError, match="unknown artifact format version 99"):
        artifact.load(path)


def test_corrupt_manifest_and_not_an_artifact(tmp_path):
    path = save(tmp_path, *compressed_mlp())
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(SourceError, match="corrupt manifest"):
        artifact.load(path)
    with pytest.raises(SourceError, match="not an edgeslim artifact"):
        artifact.load(tmp_path)


def test_modified_or_missing_weights_are_refused(tmp_path):
    path = save(tmp_path, *compressed_mlp())
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SourceError, match="weights.safetensors does not match its SHA-256"):
        artifact.load(path)
    weights.unlink()
    with pytest.raises(SourceError, match="weights.safetensors listed in the manifest is missing"):
        artifact.load(path)


def test_shape_mismatch_names_the_problem(tmp_path):
    loaded, result = compressed_mlp()
    path = save(tmp_path, loaded, result)
    other = save(tmp_path, *compressed_mlp(ratio=None, rank=2), name="other.slim")
    shutil.copy(other / "weights.safetensors", path / "weights.safetensors")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["weights.safetensors"] = json.loads((other / "manifest.json").read_text())["files"]["weights.safetensors"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SourceError, match="does not fit the replayed model"):
        artifact.load(path)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    loaded, result = compressed_mlp()
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, loaded, result)
    assert list(tmp_path.iterdir()) == []


def test_format_1_zoo_artifact_is_migrated_with_a_warning(tmp_path):
    loaded, result = compressed_mlp()
    path = save(tmp_path, loaded, result)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 1
    manifest["source"] = {"kind": "zoo", "identifier": "tiny-mlp", "weights": "0.1.0", "version": None, "sha256": None}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="format-1 artifact read as format 2"):
        again = artifact.load(path)
    assert again.source.version == "0.1.0" and again.source.weights is None
    x = torch.randn(2, 16)
    assert torch.equal(again.model(x=x), result.model(x=x))


def test_zoo_sources_record_their_version_in_the_version_field():
    from edgeslim import __version__
    source = load_model("tiny-mlp").source
    assert source.version == __version__ and source.weights is None
    shipped = json.loads((Path(__file__).parents[1] / "edgeslim" / "models" / "espcn-x3.slim" /
                          "manifest.json").read_text())
    assert shipped["format_version"] == artifact.FORMAT_VERSION and shipped["source"]["weights"] is None


def test_saving_a_model_that_does_not_run_on_its_inputs_writes_nothing(tmp_path):
    from edgeslim.core.errors import ConfigError
    from edgeslim.core.specs import TensorSpec
    loaded, result = compressed_mlp()
    with pytest.raises(ConfigError, match="does not run on its inputs"):
        artifact.save(tmp_path / "m.slim", result.model, loaded.source, [result.step_record()],
                      [TensorSpec("x", ("batch", 99))])
    assert list(tmp_path.iterdir()) == []
