"""Target profiles: every shipped one loads, bad keys and values are rejected with the allowed ones."""
from __future__ import annotations

import pytest

from edgeslim.core.errors import ConfigError, SourceError
from edgeslim.runtime.targets import ALLOWED, Profile, list_profiles, load_profile

SHIPPED = ("cpu-ort-fp32", "cpu-torch-fp32", "cuda-torch-fp16", "cuda-trt-fp16", "jetson-orin-nano")

GOOD = """
description = "mine"
device = "cpu"
runtime = "onnxruntime"
provider = "CPUExecutionProvider"
precision = "fp32"
threads = 1
batch = [1, 4]
align = 8
peak_gflops = 100
mem_gbps = 20.5
"""


def test_every_shipped_profile_loads_and_names_a_device():
    profiles = list_profiles()
    assert set(SHIPPED) <= set(profiles)
    for name, p in profiles.items():
        assert p.name == name
        assert p.device in ("cpu", "cuda")
        assert p.peak_gflops > 0 and p.mem_gbps > 0 and p.batch and p.align >= 1
        assert load_profile(name) == p


def test_cpu_ort_profile_values():
    p = load_profile("cpu-ort-fp32")
    assert (p.runtime, p.provider, p.precision, p.threads, p.batch, p.align) == \
        ("onnxruntime", "CPUExecutionProvider", "fp32", 2, (1, 8, 32), 8)
    assert p.peak_gflops == 147.0


def test_user_toml_path(tmp_path):
    f = tmp_path / "my-box.toml"
    f.write_text(GOOD)
    p = load_profile(f)
    assert p.name == "my-box" and p.batch == (1, 4) and p.mem_gbps == 20.5 and p.threads == 1
    assert load_profile(str(f)) == p


def test_unknown_key_lists_allowed_keys(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text(GOOD + 'thread = 4\n')
    with pytest.raises(ConfigError) as err:
        load_profile(f)
    assert "thread" in str(err.value)
    for key in ALLOWED:
        assert key in str(err.value)


@pytest.mark.parametrize("key,value,allowed", [
    ("runtime", '"openvino"', ["torch", "onnxruntime", "tensorrt"]),
    ("precision", '"bf16"', ["fp32", "fp16", "int8"]),
    ("device", '"tpu"', ["cpu", "cuda"]),
    ("provider", '"DmlExecutionProvider"', ["CPUExecutionProvider", "CUDAExecutionProvider"]),
])
def test_unknown_value_lists_allowed_values(tmp_path, key, value, allowed):
    text = "\n".join(line for line in GOOD.splitlines() if not line.startswith(key + " "))
    f = tmp_path / "bad.toml"
    f.write_text(text + f"\n{key} = {value}\n")
    with pytest.raises(ConfigError) as err:
        load_profile(f)
    for a in allowed:
        assert a in str(err.value)


@pytest.mark.parametrize("line", ['batch = []', 'batch = [0, 8]', 'threads = "two"', 'align = 0',
                                  'peak_gflops = -1', 'threads = true'])
def test_bad_types_and_ranges(tmp_path, line):
    key = line.split()[0]
    text = "\n".join(x for x in GOOD.splitlines() if not x.startswith(key + " "))
    f = tmp_path / "bad.toml"
    f.write_text(text + "\n" + line + "\n")
    with pytest.raises(ConfigError, match=key):
        load_profile(f)


@pytest.mark.parametrize("changes,needle", [
    ({"provider": None}, "needs a provider"),
    ({"device": "cuda"}, "runs on 'cpu'"),
    ({"runtime": "tensorrt"}, "provider"),
])
def test_inconsistent_combinations(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        load_profile("cpu-ort-fp32").override(changes)


def test_torch_fp16_needs_cuda_and_int8_needs_onnxruntime():
    base = load_profile("cpu-torch-fp32")
    with pytest.raises(ConfigError, match="needs device 'cuda'"):
        base.override({"precision": "fp16"})
    with pytest.raises(ConfigError, match="int8"):
        base.override({"precision": "int8"})


def test_override_checks_keys_and_keeps_the_rest():
    p = load_profile("cpu-ort-fp32").override({"batch": [1, 8]})
    assert p.batch == (1, 8) and p.provider == "CPUExecutionProvider"
    with pytest.raises(ConfigError, match="allowed keys"):
        p.override({"batches": [1]})


def test_missing_required_key(tmp_path):
    f = tmp_path / "short.toml"
    f.write_text('device = "cpu"\nruntime = "torch"\nprecision = "fp32"\n')
    with pytest.raises(ConfigError, match="peak_gflops"):
        load_profile(f)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(SourceError, match="nope.toml"):
        load_profile(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as err:
        load_profile("cpu-ort-fp33")
    assert "cpu-ort-fp32" in str(err.value)


def test_invalid_toml_names_the_file(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text("device = \n")
    with pytest.raises(ConfigError, match="broken.toml"):
        load_profile(f)


def test_to_dict_round_trips():
    p = load_profile("cuda-trt-fp16")
    assert Profile.from_dict(p.name, p.to_dict()) == p


def test_remote_must_be_a_boolean(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text('device = "cpu"\nruntime = "torch"\nprecision = "fp32"\npeak_gflops = 1\nmem_gbps = 1\n'
                    'remote = "yes"\n')
    with pytest.raises(ConfigError, match="'remote' must be true or false"):
        load_profile(path)
