"""Recipes: the sections of a recipe TOML file, each checked against its dataclass (`parse_recipe`,
`load_recipe`), the `Recipe` a run follows, and the built-in demo's recipe (`edgeslim run` alone)."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from edgeslim.compress.base import get_compressor
from edgeslim.core.config import ConfigBase
from edgeslim.core.errors import ConfigError
from edgeslim.core.files import parse_file, plain_stem, safe_stem
from edgeslim.trust import Trust
from edgeslim.defaults import DEFAULT_PROFILE



# The built-in demo: packaged MiniLM, activation-aware SVD at a 0.5 kept ratio of its encoder linears,
# calibrated on BBC News TRAINING articles; checked on the demo sentences (other data). Loss-measured
# allocation (each layer factored alone, its effect on the embedding measured on one calibration
# batch); "kfac" weighs each layer's error by the output's Gauss-Newton factor as well as by its
# inputs. On the demo sentences (cosine to the original embeddings, no healing): whiten 0.811, kfac
# 0.872 with 1 probe per sample, 0.881 with 2; healed 40 steps without dropout 0.903, with dropout
# 0.900 (bench/demo_ceiling.py). The whole demo: ~172 s on 2 AVX2 cores.
DEMO_RECIPE: dict[str, Any] = {
    "source": "minilm", "name": "minilm-asvd",
    # calibrated and healed on sentences of BBC News training articles (short texts, like those an
    # encoder embeds and the demo checks), never on the demo sentences themselves
    "step": [{"method": "asvd", "mode": "kfac", "draws": 2, "ratio": 0.5, "allocation": "loss",
              "calib": "bbc-news-sentences:512", "target": r".*encoder\.layer\.\d+\..*"},
             {"method": "heal", "calib": "bbc-news-sentences:1024", "steps": 40, "lr": 1e-4, "dropout": False}],
    "export": {"to": "onnx"},
    "profile": {"name": "cpu-ort-fp32", "batch": [1, 8], "dims": {"sequence": 128}, "iters": 20},
    "eval": "sentences",
}


@dataclass(frozen=True)
class StepSection(ConfigBase):
    """The pipeline's own keys of a [[step]]; every other key belongs to the compressor's config."""

    method: str  # a registered compressor (edgeslim list compressors)
    calib: str | None = None  # calibration data: NAME[:COUNT] or a file/folder of the user's inputs
    calib_batch: int = 16  # batch size of the calibration data
    gemm_table: str | None = None  # a speedup budget for a target that is not this machine: GEMM table measured on it
    latency_batch: int = 8  # batch size a speedup budget is measured at (other dims: the model's defaults)

    def validate(self) -> None:
        if self.latency_batch < 1:
            raise ConfigError(f"latency_batch must be a positive integer, got {self.latency_batch}")


@dataclass(frozen=True)
class ExportSection(ConfigBase):
    """[export]: the device format."""

    to: Literal["onnx", "tensorrt"] = "onnx"
    opset: int = 20


@dataclass(frozen=True)
class ProfileSection(ConfigBase):
    """[profile]: the target and how to measure on it."""

    name: str = DEFAULT_PROFILE  # shipped profile name or a .toml path
    batch: tuple[int, ...] | None = None  # None: the profile's own batch list
    dims: dict[str, int] = field(default_factory=dict)  # sizes of named dims when profiling
    warmup: int = 5
    iters: int = 30

    def validate(self) -> None:
        if self.batch is not None and (not self.batch or min(self.batch) < 1):
            raise ConfigError(f"[profile]: 'batch' must be a non-empty list of positive integers, got {list(self.batch)}")
        if any(v < 1 for v in self.dims.values()) or self.warmup < 0 or self.iters < 1:
            raise ConfigError(f"[profile]: dims must be >= 1, warmup >= 0 and iters >= 1, got dims {self.dims}, "
                              f"warmup {self.warmup}, iters {self.iters}")


@dataclass(frozen=True)
class RecipeSection(ConfigBase):
    """The top level of a recipe."""

    source: str  # a zoo name, a Hugging Face folder, pkg.mod:factory or an artifact
    name: str | None = None  # output name stem (default: source stem + methods)
    weights: str | None = None  # weights file of a factory source
    inputs: str | None = None  # inputs of a factory source, e.g. "x:batch,16"
    step: tuple[dict[str, Any], ...] = ()
    export: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    eval: str | None = None  # data to compare original and compressed outputs on
    source_factory: str | None = None  # the pkg.mod:factory an artifact source may name (like --source)
    trust_source: bool = False  # replay any factory an artifact source names (like --trust-source)


@dataclass
class Recipe:
    """A whole run, as parse_recipe builds it from the checked sections (their defaults apply)."""

    source: str
    steps: list[dict[str, Any]]
    name: str
    weights: str | None
    inputs: str | None
    export_to: str
    opset: int
    profile: str
    batches: list[int] | None  # None: the profile's own batch list
    dims: dict[str, int]  # sizes of named dims when profiling
    warmup: int
    iters: int
    eval: str | None  # data to compare original and compressed outputs on
    source_factory: str | None = None  # the pkg.mod:factory an artifact source may name (as --source)
    trust_source: bool = False  # replay any factory an artifact source names (as --trust-source)

    @property
    def trust(self) -> Trust:
        return Trust(self.source_factory, self.trust_source)


def split_step(step: Mapping[str, Any], where: str = "step") -> tuple[StepSection, dict[str, Any]]:
    """A [[step]] as its pipeline keys (checked) and the compressor's own config keys."""
    own = {f.name for f in dataclasses.fields(StepSection)}
    return (StepSection.from_dict({k: v for k, v in step.items() if k in own}, where),
            {k: v for k, v in step.items() if k not in own})


def parse_recipe(data: Mapping[str, Any], origin: str = "recipe") -> Recipe:
    """Check a whole parsed recipe and build a Recipe (errors name the key and the allowed ones).

    Everything is checked before any work: keys, types, step configs, the names of the profile and
    the eval data, the factory to trust, and a plain output name.
    """
    top = RecipeSection.from_dict(data, origin)
    if not all(isinstance(s, dict) and "method" in s for s in top.step):
        raise ConfigError(f"{origin}: each [[step]] needs a 'method' (see `edgeslim list compressors`)")
    for i, step in enumerate(top.step):  # validate configs now, before any slow work
        section, params = split_step(step, f"{origin} [[step]] {i + 1}")
        get_compressor(section.method).make_config(params)
    exp = ExportSection.from_dict(top.export, f"{origin} [export]")
    prof = ProfileSection.from_dict(top.profile, f"{origin} [profile]")
    _check_names(top, prof, origin)
    default = Path(top.source).name.removesuffix(".slim") + "".join(f"-{s['method']}" for s in top.step)
    name = safe_stem(default) if top.name is None else plain_stem(top.name, f"{origin}: 'name'")
    return Recipe(source=top.source, steps=[dict(s) for s in top.step], name=name, weights=top.weights,
                  inputs=top.inputs, export_to=exp.to, opset=exp.opset, profile=prof.name,
                  batches=None if prof.batch is None else list(prof.batch), dims=dict(prof.dims),
                  warmup=prof.warmup, iters=prof.iters, eval=top.eval, source_factory=top.source_factory,
                  trust_source=top.trust_source)


def _check_names(top: RecipeSection, prof: ProfileSection, origin: str) -> None:
    """The names a recipe refers to exist (profile, eval data), its inputs parse, its factory is one."""
    from edgeslim.data import list_datasets, parse_spec
    from edgeslim.runtime.targets import load_profile
    from edgeslim.sources import parse_inputs

    load_profile(prof.name)
    if top.eval is not None and parse_spec(top.eval)[0] not in list_datasets() and not Path(top.eval).exists():
        raise ConfigError(f"{origin}: eval data {top.eval!r} is not a file and not one of "
                          f"{sorted(list_datasets())} (see `edgeslim list datasets`)")
    if top.inputs is not None:
        parse_inputs(top.inputs)
    Trust(top.source_factory)


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe TOML file."""
    return parse_recipe(parse_file(path, "recipe", "TOML", tomllib.loads), str(path))
