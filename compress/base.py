"""The Compressor protocol (contract v2) and its flags, its result types, the shared configs
(TargetConfig, RatioBudgetConfig, BudgetConfig, ProfiledBudgetConfig), the statistics a family
declares (StatsRequest) and the registry.

A compressor family is one module under compress/ (or in another package) that defines
`Compressor` subclasses decorated with `@register`, and is listed in the `edgeslim.compressors`
entry-point group of its package's pyproject.toml (one line per module). See "Adding a compressor"
in docs/architecture.md (a worked example) and in docs/adding-a-compressor.md.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Mapping, Protocol, Sequence, get_args

from torch import nn

from edgeslim.core.calib import CalibData
from edgeslim.core.config import ConfigBase, field_docs, field_types
from edgeslim.core.errors import ConfigError, EdgeslimError, MissingDependencyError
from edgeslim.core.specs import TensorSpec

ENTRY_POINT_GROUP = "edgeslim.compressors"

Kind = Literal["structural", "adapter", "quantized", "sparsity", "training"]
Status = Literal["replaced", "dense", "adapter", "quantized", "sparsified", "skipped"]
Decision = int | tuple[int, ...]  # a rank, a kept channel count, or several (MPO bond dimensions)


class Measure(Protocol):
    """What the pipeline can measure for a compressor on the target (compress/ never imports runtime/)."""

    times_models: bool  # model_ms really runs the model given (a local target), not a recorded latency

    def gemm_ms(self, m: int, k: int, n: int) -> float:
        """Latency in ms of an (m x k) @ (k x n) matrix product on the target."""
        ...

    def model_ms(self, model: nn.Module, inputs: Sequence[TensorSpec], dims: Mapping[str, int]) -> float:
        """Latency in ms of one call of the whole `model` on the target at the input sizes `dims`."""
        ...

    def speedup(self, base: nn.Module, trial: nn.Module, inputs: Sequence[TensorSpec], dims: Mapping[str, int]
                ) -> float:
        """Latency of `base` over that of `trial`, both timed side by side (only where times_models)."""
        ...


@dataclass(frozen=True)
class CompressContext:
    """What the caller knows beyond model, config and data; every field may be absent.

    The pipeline fills it from the source and the target profile; library callers pass what they
    have (or nothing).
    """

    inputs: tuple[TensorSpec, ...] = ()  # the model's input spec (example tensors: edgeslim.core.specs)
    align: int | None = None  # the target profile's shape multiple (8 CPU SIMD, 16/32 tensor cores)
    profile: str | None = None  # target profile name
    measure: Measure | None = None  # e.g. a GEMM latency table of the target, for latency budgets
    monitor: Callable[[int, nn.Module], None] | None = None  # training families call it after each step
    dims: Mapping[str, int] = field(default_factory=dict)  # input sizes a latency budget is for (batch, sequence)
    task: str | None = None  # the source's task, e.g. "super-resolution" (its outputs are images in [0, 1])
    # the target CPU's INT8 features (runtime.machine.INT8_FLAGS it has, e.g. ("avx2", "avx512_vnni")); None: unknown
    int8_features: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TargetConfig(ConfigBase):
    """Which modules a compressor touches: `target` and `exclude`, declared once for every family."""

    target: str | tuple[str, ...] | None = None  # regex (fullmatch) or list of names / dotted suffixes
    exclude: str | tuple[str, ...] | None = None  # same forms; removed from the selection


def _either(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


@dataclass(frozen=True)
class RatioBudgetConfig(TargetConfig):
    """A kept-params ratio for the targeted layers and its allocation across them (pruning takes only
    this form; BudgetConfig adds rank, energy and speedup).

    Allocation values mean the same in every family:
    "uniform": the same kept ratio per layer;
    "sensitivity": the global greedy on each layer's error estimate (weighted spectral energy,
    relative error, measured output change: what the family's statistics give);
    "loss": each layer replaced alone at `ratio`, the task-loss change measured on the calibration data,
    and the global greedy run on those measured losses (compress/sensitivity.py; families with
    `loss_allocation`, which declare `profile_batches`);
    "auto": decided per call by the family (`resolve`): a data-aware family with calibration data takes
    "sensitivity" (mpo: "loss"), else "uniform".
    """

    budget_forms: ClassVar[tuple[str, ...]] = ("ratio",)  # the budget fields; one of them is set
    loss_allocation: ClassVar[bool] = False  # True: the family offers allocation = "loss" (a measured profile)

    ratio: float | None = None  # kept fraction of the targeted layers' parameters, in (0, 1]; default 0.5
    # "uniform": the same kept ratio per layer; "sensitivity": the greedy on the layers' error estimates;
    # "loss": the greedy on each layer's measured task-loss change; "auto": the family's choice for the data
    allocation: Literal["auto", "uniform", "sensitivity", "loss"] = "auto"
    align: int | None = None  # decisions rounded to a multiple of this; None: the profile's, else 1

    def validate(self) -> None:
        super().validate()
        set_forms = [k for k in self.budget_forms if getattr(self, k) is not None]
        if len(set_forms) > 1:
            raise ConfigError(f"give one budget form, not {set_forms} ({_either(self.budget_forms)})")
        if not set_forms:
            object.__setattr__(self, "ratio", 0.5)
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise ConfigError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.allocation == "loss" and not self.loss_allocation:
            raise ConfigError(f"{type(self).__name__} has no loss-measured allocation; allocation = \"loss\" is "
                              "offered by the low-rank and MPO methods (svd, fwsvd, asvd, mpo): use \"sensitivity\" "
                              "here")
        if self.allocation == "loss" and self.ratio is None:
            raise ConfigError("allocation = \"loss\" needs a ratio budget (the kept fraction it profiles and "
                              "allocates), not rank, energy or speedup")
        if self.align is not None and self.align < 1:
            raise ConfigError(f"align must be a positive integer, got {self.align!r}")

    def resolve(self, *, data_aware: bool, context: CompressContext | None) -> "RatioBudgetConfig":
        """The config with its call-dependent defaults decided (the one place they are).

        Args:
            data_aware: calibration data (or statistics from it) is given and the method uses it.
            context: the caller's context; its `align` is used when the config sets none.
        """
        allocation = self.allocation
        if allocation == "auto":
            allocation = "sensitivity" if data_aware else "uniform"
        align = self.align if self.align is not None else (context.align if context and context.align else 1)
        return dataclasses.replace(self, allocation=allocation, align=align)


@dataclass(frozen=True)
class BudgetConfig(RatioBudgetConfig):
    """Budget forms shared by every low-rank / tensor / factorized-conv compressor.

    Exactly one of ratio, rank, energy or speedup is set; when none is, ratio=0.5. A speedup budget
    needs a family with a latency model of its layers (`latency_budget`) and a `Measure` in the context.
    """

    budget_forms: ClassVar[tuple[str, ...]] = ("ratio", "rank", "energy", "speedup")
    latency_budget: ClassVar[bool] = False  # True: the family allocates for `speedup` (low-rank linear maps)

    rank: int | None = None  # fixed rank / bond dimension for every layer
    energy: float | None = None  # kept fraction of (weighted) spectral energy per layer, in (0, 1]
    speedup: float | None = None  # measured whole-model speedup to reach on the target with the least error, > 1

    def validate(self) -> None:
        super().validate()
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ConfigError(f"energy must be in (0, 1], got {self.energy}")
        if self.speedup is not None and not self.speedup > 1.0:
            raise ConfigError(f"speedup must be > 1 (e.g. 1.5), got {self.speedup}")
        if self.speedup is not None and not self.latency_budget:
            raise ConfigError(f"{type(self).__name__} has no latency model for a speedup budget; it is offered by "
                              "the low-rank methods (svd, fwsvd, asvd): use ratio, rank or energy here")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")


@dataclass(frozen=True)
class ProfiledBudgetConfig(BudgetConfig):
    """A budget with allocation = "loss", whose profile runs on the first `profile_batches` calibration
    batches (svd, fwsvd, asvd, mpo)."""

    loss_allocation: ClassVar[bool] = True

    profile_batches: int = 1  # calibration batches the loss profile runs each replaced layer on

    def validate(self) -> None:
        super().validate()
        if self.profile_batches < 1:
            raise ConfigError(f"profile_batches must be >= 1, got {self.profile_batches}")


@dataclass(frozen=True)
class StatsRequest:
    """The calibration statistics a family needs of its targeted linear maps, declared by
    `Compressor.statistics(config)` and gathered by the one collector (compress/statistics.py) in the
    fewest passes: the input moments ride along whichever pass runs; the per-sample Fisher is one
    forward and backward per sample; the output-gradient moments one backward per batch and probe.
    (A GPTQ-style method that needs each layer's inputs with the layers before it already changed
    reads them one layer at a time with `statistics.layer_inputs`.)"""

    input_moments: bool = False  # E[x x^T] and E|x| of each layer's inputs (CalibStats.second_moment, mean_abs)
    output_gradients: bool = False  # E[g g^T] of the model output's gradient at each layer's output (gradient_moment)
    fisher: bool = False  # mean squared per-sample gradient of each weight (CalibStats.fisher)
    # the Fisher's loss: "task": the calibration targets' task loss (without targets, the label-free
    # estimate below); "output": the Gauss-Newton diagonal of the model's outputs (label-free);
    # "auto": "task" when each sample's target holds many losses (next tokens, pixels), else "output"
    fisher_loss: Literal["auto", "task", "output"] = "task"
    draws: int = 1  # random probes of the output per calibration batch for output_gradients
    seed: int = 0  # seed of the label-free Fisher's noise and of the gradient probes

    def __post_init__(self) -> None:
        if self.draws < 1:
            raise ConfigError(f"calibration: draws must be a positive integer, got {self.draws}")


@dataclass
class LayerChange:
    """One targeted module: what it was, what it became (or why it stayed), at what cost.

    Every targeted layer gets a row, also those left dense or skipped (status and note say why).
    """

    name: str
    kind: str  # e.g. "Linear -> LowRankLinear", or "Linear" for a layer left as it was
    params_before: int
    params_after: int
    decision: Decision | None = None  # rank, bond dimensions, kept channels; None when not replaced
    status: Status = "replaced"
    bytes_before: int | None = None  # storage of the layer's tensors (what INT8 changes)
    bytes_after: int | None = None
    rel_error: float | None = None  # relative (weighted) reconstruction error of the layer
    sensitivity: float | None = None  # task-loss or output change this layer alone causes
    note: str = ""  # e.g. "dense: factoring would not save parameters at rank 8"
    latency_ms_before: float | None = None  # the layer's GEMM time on the target (measured table), dense
    latency_ms_after: float | None = None  # ... as it was left (factored pair, or dense)

    def __post_init__(self) -> None:
        if self.status not in get_args(Status):
            raise ValueError(f"LayerChange status must be one of {get_args(Status)}, got {self.status!r}")
        if isinstance(self.decision, list):
            self.decision = tuple(self.decision)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if isinstance(self.decision, tuple):
            out["decision"] = list(self.decision)
        return out


@dataclass
class CompressResult:
    """What a compressor returns: the new model, one row per targeted layer, and every decision made."""

    model: nn.Module
    method: str
    config: dict[str, Any]  # the RESOLVED config (no "auto" left), as the manifest records it
    changes: list[LayerChange] = field(default_factory=list)
    resolved: dict[str, Any] = field(default_factory=dict)  # enough to replay without data, + "schema"

    @property
    def params_before(self) -> int:
        return sum(c.params_before for c in self.changes)

    @property
    def params_after(self) -> int:
        return sum(c.params_after for c in self.changes)

    def step_record(self) -> dict[str, Any]:
        """The manifest entry for this step."""
        return {"method": self.method, "config": self.config, "resolved": self.resolved,
                "changes": [c.to_dict() for c in self.changes]}


class Compressor:
    """Protocol of a compressor family member (contract v2).

    Subclasses set `name`, `Config` and `kind`, and implement `compress` and `replay`:
    - `compress(model, config, calib=None, inplace=False, context=None) -> CompressResult` decides
      and applies; the caller's model is left untouched unless inplace=True. Build the result with
      `self.result(...)`, which records `schema` in `resolved`.
    - `replay(model, resolved, inputs) -> nn.Module` applies the recorded structure without data
      (the artifact loads the weights afterwards); `inputs` is the artifact's input spec, from
      which example tensors are made with `edgeslim.core.specs.example_feeds`.
    - optionally `onnx_stage(resolved, onnx_in, onnx_out, context)` with has_onnx_stage = True:
      run by the pipeline on the exported ONNX file after export (e.g. INT8 on the graph).
    """

    name: ClassVar[str]
    Config: ClassVar[type[ConfigBase]]
    kind: ClassVar[Kind]  # report wording: adapters and INT8 never "stayed dense"
    schema: ClassVar[int] = 1  # layout version of `resolved`; bump it when the layout changes
    needs_calibration: ClassVar[bool] = False  # True when calib is mandatory
    data_aware: ClassVar[bool] = False  # True: calibration data, when given, informs the decisions
    distils: ClassVar[bool] = False  # True: without targets, train toward the ORIGINAL model's outputs
    has_onnx_stage: ClassVar[bool] = False  # True: onnx_stage runs on the exported graph
    ends_torch_steps: ClassVar[bool] = False  # True: its weights are no longer float; only ONNX-stage steps may follow

    def statistics(self, config: ConfigBase) -> StatsRequest | None:
        """The calibration statistics this family's decisions read at `config` (None: none), which its
        `compress` gathers with the one collector, `edgeslim.compress.statistics.collect_stats`."""
        return None

    def make_config(self, data: Mapping[str, Any] | ConfigBase | None = None) -> ConfigBase:
        if isinstance(data, ConfigBase):
            if not isinstance(data, self.Config):
                raise ConfigError(f"{self.name} takes a {self.Config.__name__}, got {type(data).__name__}")
            return data
        return self.Config.from_dict(data or {}, where=self.name)

    def result(self, model: nn.Module, config: ConfigBase, changes: Sequence[LayerChange],
               resolved: Mapping[str, Any]) -> CompressResult:
        """The CompressResult of this compressor: resolved config, rows, and `resolved` with its schema."""
        return CompressResult(model, self.name, config.to_dict(), list(changes), {**resolved, "schema": self.schema})

    def compress(self, model: nn.Module, config: ConfigBase, calib: CalibData | None = None,
                 inplace: bool = False, context: CompressContext | None = None) -> CompressResult:
        raise NotImplementedError

    def replay(self, model: nn.Module, resolved: Mapping[str, Any], inputs: Sequence[TensorSpec]) -> nn.Module:
        raise NotImplementedError

    def onnx_stage(self, resolved: Mapping[str, Any], onnx_in: Path, onnx_out: Path,
                   context: CompressContext) -> None:
        """Transform the exported ONNX file `onnx_in` into `onnx_out` (only when has_onnx_stage)."""
        raise NotImplementedError


def working_copy(model: nn.Module, inplace: bool) -> nn.Module:
    """The model a compressor may modify: the caller's own when inplace, else a deep copy."""
    return model if inplace else copy.deepcopy(model)


_REGISTRY: dict[str, type[Compressor]] = {}
_loaded: list[bool] = []  # set once the entry points have been imported


def register(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator adding a compressor to the registry; a second use of a name is an error."""
    key = cls.name
    if key in _REGISTRY and _REGISTRY[key] is not cls:
        raise ValueError(f"compressor name '{key}' registered twice: {_REGISTRY[key].__module__} and {cls.__module__}")
    if getattr(cls, "kind", None) not in get_args(Kind):
        raise ValueError(f"compressor '{key}' ({cls.__module__}) must set kind to one of {get_args(Kind)}")
    _REGISTRY[key] = cls
    return cls


def _load_families() -> None:
    """Import every module of the `edgeslim.compressors` entry-point group (once)."""
    if _loaded:
        return
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except ImportError as exc:
            raise MissingDependencyError(f"compressor family '{ep.name}' ({ep.value}) cannot be imported: "
                                         f"{exc}") from exc
        except Exception as exc:  # a broken third-party family: name it, keep the cause chained
            raise EdgeslimError(f"compressor family '{ep.name}' ({ep.value}) failed to import: "
                                f"{type(exc).__name__}: {exc}") from exc
    _loaded.append(True)


def compressor_rows() -> list[dict[str, Any]]:
    """Every registered compressor as data: name, kind, whether calibration is required, its summary,
    and each config key with its default, allowed values (a Literal) and meaning (the field's comment)."""
    rows = []
    for name, cls in list_compressors().items():
        docs, types_ = field_docs(cls.Config), field_types(cls.Config)
        keys = {}
        for f in dataclasses.fields(cls.Config):
            literal = typing.get_origin(types_[f.name]) is Literal
            keys[f.name] = {"default": None if f.default is dataclasses.MISSING else f.default,
                            "choices": list(get_args(types_[f.name])) if literal else None, "doc": docs[f.name]}
        rows.append({"name": name, "kind": cls.kind, "needs_calibration": cls.needs_calibration,
                     "summary": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "", "keys": keys})
    return rows


def get_compressor(name: str) -> Compressor:
    """An instance of the registered compressor `name`.

    Raises:
        ConfigError: no compressor of that name (the registered names are listed).
    """
    _load_families()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown compressor '{name}'; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]()


def list_compressors() -> dict[str, type[Compressor]]:
    """Registered compressors by name."""
    _load_families()
    return dict(sorted(_REGISTRY.items()))
