"""edgeslim: compress a trained PyTorch model, export it to a device runtime, profile it.

Importing edgeslim changes no global state and imports no heavy optional dependency.
"""
from edgeslim.core.errors import ConfigError, EdgeslimError, ExportValidationError, MissingDependencyError, SourceError

__version__ = "0.1.0"
__all__ = ["ConfigError", "EdgeslimError", "ExportValidationError", "MissingDependencyError", "SourceError", "__version__"]
