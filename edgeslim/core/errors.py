"""The one error hierarchy of edgeslim; the CLI maps each class to an exit code."""
from __future__ import annotations


class EdgeslimError(Exception):
    """Base class for every error edgeslim raises on purpose (bad input, missing piece)."""

    exit_code = 1


class ConfigError(EdgeslimError, ValueError):
    """A config, recipe, profile or option has an unknown key or a value out of range."""

    exit_code = 2


class SourceError(EdgeslimError):
    """A model source, weights file, data file or artifact cannot be read or is corrupt."""

    exit_code = 3


class MissingDependencyError(EdgeslimError, ImportError):
    """An optional package (or device) is needed for this path and is absent."""

    exit_code = 4


class ExportValidationError(EdgeslimError):
    """An exported model's outputs differ from PyTorch's beyond tolerance."""

    exit_code = 5


class ActivationDriftError(ExportValidationError):
    """With int8 activations (MatMulNBits accuracy level 4) a graph drifts from PyTorch beyond its bound; the same
    file at level 0 passed its exact checks (export/kv_cache.py)."""


class InferenceCrashError(EdgeslimError):
    """The process running a model died (a runtime crash, out of memory, a timeout); the message says how."""

    exit_code = 6


def require(module: str, extra: str | None = None, purpose: str = ""):
    """Import an optional dependency or raise MissingDependencyError with the install command.

    Args:
        module: importable module name, e.g. "transformers".
        extra: the edgeslim extra that brings it, e.g. "data".
        purpose: what it is needed for, shown in the message.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        how = f"pip install 'edgeslim[{extra}]'" if extra else f"pip install {module}"
        why = f" for {purpose}" if purpose else ""
        raise MissingDependencyError(f"'{module}' is needed{why} but is not installed: {how}") from exc
