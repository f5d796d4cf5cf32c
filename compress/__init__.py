"""Compressors: each family in its own module, all behind one registry (see base.py)."""
from edgeslim.compress.base import (CompressContext, CompressResult, Compressor, LayerChange, get_compressor,
                                    list_compressors, register)

__all__ = ["CompressContext", "CompressResult", "Compressor", "LayerChange", "get_compressor", "list_compressors",
           "register"]
