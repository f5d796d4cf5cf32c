"""Library noise: hidden by default, shown with `-v`.

What the libraries edgeslim drives print on their own (torchao's "Failed to load ... .so", torch's
`_pytree` deprecation lines, NNCF's warnings, transformers' advisories and "Loading weights" bars,
FutureWarnings from any of them) is not something the user asked for. `quiet_libraries` runs before
any of them is imported: their loggers are set to ERROR, their progress bars off, and Python warnings
raised from outside edgeslim ignored. edgeslim's own warnings (an unreached ratio, an unstable timing)
and its progress lines always show.
"""
from __future__ import annotations

import logging
import os
import warnings

LIBRARIES = ("torch", "torch.utils._pytree", "torchao", "nncf", "transformers", "onnxscript", "onnx_ir", "accelerate", "huggingface_hub",
             "safetensors", "tensorly", "torch_pruning", "matplotlib", "PIL", "urllib3")
ENVIRONMENT = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "TORCH_CPP_LOG_LEVEL": "ERROR"}
VERBOSE = [False]  # set once by the CLI; read where a library is loaded (edgeslim.loaders)


def quiet_libraries(verbose: bool = False) -> None:
    """Hide the libraries' own output unless `verbose` (call before they are imported)."""
    VERBOSE[0] = verbose
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        return
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(?!edgeslim)")  # raised from outside edgeslim
    warnings.filterwarnings("default", module=r"edgeslim")


def quiet_transformers() -> None:
    """transformers' progress bars off (they ignore the logging level), unless -v."""
    if not VERBOSE[0]:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
