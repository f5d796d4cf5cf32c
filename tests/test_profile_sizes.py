"""Every dynamic dim gets a size with its provenance; a fixed batch is never silently profiled at another."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgeslim.core.errors import ConfigError
from edgeslim.profiling import resolve_sizes
from edgeslim.runtime.op_profile import shares
from edgeslim.sources import LoadedModel, SourceSpec
from edgeslim.core.specs import TensorSpec


def loaded(shape, kind="file", dims=None):
    return LoadedModel(torch.nn.Identity(), SourceSpec(kind, "m.onnx"), [TensorSpec("x", shape)], "generic",
                       dims or {})


def test_sizes_say_where_they_came_from():
    sizes, where = resolve_sizes(loaded(("batch", 3, "height", "width"), "zoo", {"height": 32, "width": 48}),
                                 {"width": 64}, 4)
    assert sizes == {"batch": 4, "height": 32, "width": 64}
    assert where == {"batch": "batch", "height": "model", "width": "--dim"}
    _, where = resolve_sizes(loaded(("batch", "sequence"), "file", {"sequence": 128}), {}, 1)
    assert where["sequence"] == "default"


def test_dynamic_dim_without_size_is_named():
    with pytest.raises(ConfigError, match=r"'height' has no size: give it with --dim height=SIZE"):
        resolve_sizes(loaded(("batch", 1, "height", 8)), {}, 1)


def test_fixed_batch_asked_for_another_is_an_error():
    assert resolve_sizes(loaded((1, 16)), {}, 1)[0] == {"batch": 1}
    with pytest.raises(ConfigError, match=r"fixed batch \[1\], but batch 8 was asked"):
        resolve_sizes(loaded((1, 16)), {}, 8)


@pytest.mark.slow  # bench/ --quick
def test_profiler_check_quick_runs(tmp_path):
    bench = Path(__file__).parents[1] / "bench" / "profiler_check.py"
    res = subprocess.run([sys.executable, str(bench), "--quick", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    import json
    summary = json.loads((tmp_path / "profiler_check.json").read_text())
    row = summary["results"][0]
    assert row["model"] == "tiny-mlp" and row["flops"] == 2 * (16 * 64 + 64 * 64 + 64 * 8)
    assert row["bare_script_max_rss_bytes"] > 0 and "load_avg" in summary["machine_before"]
    assert row["rss_ratio_profiler_child_over_bare"] > 0 and row["rounds"][0]["profiler_memory"]["peak_rss_bytes"] > 0
    assert (tmp_path / "profiler_check_p50.png").stat().st_size > 0


def test_profile_onnx_file_gets_graph_roofline_and_op_breakdown(in_tmp, capsys):
    from edgeslim.cli import main

    assert main(["export", "tiny-mlp", "--to", "onnx", "-o", "m.onnx"]) == 0
    capsys.readouterr()
    assert main(["profile", "m.onnx", "--batch", "1,3", "--iters", "2", "--warmup", "0", "--ops", "--json"]) == 0
    rows = __import__("json").loads(capsys.readouterr().out)["timings"]
    assert [r["flops"] for r in rows] == [b * 2 * (16 * 64 + 64 * 64 + 64 * 8) for b in (1, 3)]
    assert all(r["roofline_fraction"] > 0 and r["peak"]["source"].startswith("measured on ") for r in rows)
    assert all(abs(sum(r["op_time_share"].values()) - 1) < 1e-6 for r in rows)
    assert all(r["op_time_share"] == pytest.approx(shares(r["op_time_ms"])) for r in rows)  # ms per run beside
    assert main(["profile", "m.onnx", "--batch", "1", "--iters", "2", "--warmup", "0"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "memory read by: VmHWM of a fresh child process" in out and "cpu_mem_arena True" in out


def test_an_exported_file_is_profiled_at_the_model_s_own_sequence(in_tmp, capsys):
    """tiny-bert takes 64 positions: its file records sequence 16 (the model's size), not the bare-file 128
    that made its token-type Expand fail; a size the graph cannot run is one line and exit 6, no traceback."""
    import json

    from edgeslim.cli import main
    from edgeslim.pipeline import recorded_dims

    assert main(["export", "tiny-bert", "-o", "b.onnx"]) == 0
    assert recorded_dims(Path("b.onnx")) == {"sequence": 16}
    capsys.readouterr()
    assert main(["profile", "b.onnx", "--batch", "2", "--iters", "2", "--warmup", "0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["timings"]
    assert rows[0]["sizes"] == {"batch": 2, "sequence": 16}
    assert main(["profile", "b.onnx", "--batch", "1", "--iters", "2", "--warmup", "0", "--dim", "sequence=200"]) == 6
    err = capsys.readouterr().err
    assert "Traceback" not in err and "ONNX Runtime failed running b.onnx on inputs input_ids [1, 200]" in err


def test_a_recorded_size_beyond_any_model_s_is_ignored(tmp_path):
    """A file from elsewhere whose metadata asks for a huge or negative sequence gets none of it (the example
    inputs would be that big); a model's own size is read, from a path or from the header already read."""
    import json

    import onnx
    from onnx import TensorProto, helper

    from edgeslim.export.onnx import read_onnx_header
    from edgeslim.pipeline import DIMS_KEY, MAX_RECORDED_DIM, recorded_dims

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence"])])
    model = helper.make_model(graph)
    model.metadata_props.add(key=DIMS_KEY, value=json.dumps({"sequence": MAX_RECORDED_DIM + 1, "width": -3,
                                                              "frames": 24}))
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert recorded_dims(tmp_path / "m.onnx") == {"frames": 24}
    assert recorded_dims(read_onnx_header(tmp_path / "m.onnx")) == {"frames": 24}
