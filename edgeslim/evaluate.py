"""The task's metric on the user's data, for a source, an artifact or its exported ONNX file.

- causal-lm: perplexity over documents (a text file, one document a line, or a data set name), in
  sliding windows of the model's sequence length with a half-window stride, each token scored once
  with at least half a window of context (the usual strided evaluation of fixed-context LMs);
- sequence-classification: accuracy and macro-F1 on JSONL/CSV `{"text", "label"}` (labels as ids or
  as names of the model's `id2label`), or bbc-news (its test split) for a 5-class head;
- image-classification: the same on an image folder with one subfolder per class named as in `id2label`;
- feature-extraction: cosine agreement of the embeddings with the original model's;
- super-resolution: Y-PSNR/SSIM (BT.601, border = scale) of the upscaled bicubic-downscaled images
  against the given high-resolution images.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from edgeslim.core.progress import each
from torch import nn

from edgeslim.core.errors import ConfigError, SourceError
from edgeslim.loaded import LoadedModel

TEXT_SETS = ("bbc-news", "sentences")


@dataclass
class EvalResult:
    """One evaluation: the task's main metric and the others, on `samples` items of `data`."""

    task: str
    data: str
    metric: str
    value: float
    samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    model: str = ""
    reference: str | None = None  # what an agreement metric compares with (an encoder's original)

    def line(self) -> str:
        others = ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items() if k != self.metric)
        against = f", against {self.reference}" if self.reference else ""
        return (f"{self.model}: {self.metric} {self.value:.4f} on {self.data} ({self.samples} samples, {self.task}"
                f"{against})" + (f"; {others}" if others else ""))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class OnnxModel(nn.Module):
    """An exported ONNX file called like the torch model (`model(**feeds) -> tensor`), run by ONNX Runtime.
    A causal LM's key/value-cache graph (`export --kv-cache`) is fed an empty past: its logits for the
    whole window, through the graph a deployment runs."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        from edgeslim.runtime.session import open_session
        self.path = Path(path)
        self.session = open_session(self.path, "cpu-ort-fp32")
        self.cache = None
        if any(name.startswith("past_key_values.") for name in self.session.inputs):
            from edgeslim.runtime.kv_decoder import open_cache_graph
            self.session.close()
            self.cache = open_cache_graph(self.path)

    def forward(self, **feeds: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            ids = feeds["input_ids"].numpy()
            mask = feeds["attention_mask"].numpy() if "attention_mask" in feeds else None
            return torch.from_numpy(self.cache.step(ids, self.cache.empty_past(ids.shape[0]), mask)[0])
        out = self.session.run({k: v.numpy() for k, v in feeds.items() if k in self.session.inputs})
        return torch.from_numpy(next(iter(out.values())))


def _texts(data: str) -> list[str]:
    """Documents of a data set name (bbc-news: its test split; sentences) or a text file, one a line."""
    from edgeslim.data import DEMO_SENTENCES, bbc_news_split, parse_spec

    name, count = parse_spec(data) if not Path(data).exists() else (data, None)
    if name == "bbc-news":
        texts = [t for t, _ in bbc_news_split()["test"]]
    elif name == "sentences":
        texts = list(DEMO_SENTENCES)
    else:
        path = Path(data)
        if not path.is_file():
            raise ConfigError(f"evaluation data '{data}': not a file and not one of {TEXT_SETS}")
        from edgeslim.data import data_text
        texts = [line for line in data_text(path, "evaluation data").splitlines() if line.strip()]
    if not texts:
        raise SourceError(f"evaluation data '{data}' holds no text")
    return texts[:count or len(texts)]


def perplexity(model: Callable[..., torch.Tensor], tokenizer: Any, texts: Sequence[str], window: int,
               batch_size: int = 4, progress: bool = True, max_tokens: int | None = None) -> tuple[float, int]:
    """(perplexity, tokens scored) of a causal LM over `texts`, each tokenized whole (or its first
    `max_tokens` tokens) and scored in windows of `window` tokens with stride window // 2 (a token is
    scored once, from the window that first covers it with at least half a window of context; the
    first window scores from token 1)."""
    if window < 2:
        raise ConfigError(f"perplexity needs a window of at least 2 tokens, got {window}")
    stride = max(1, window // 2)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows: list[tuple[list[int], int]] = []  # (window ids, index of the first scored token in it)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_tokens]
        scored = 1
        for begin in range(0, max(len(ids) - 1, 1), stride):
            end = min(begin + window, len(ids))
            if end - begin >= 2 and end > scored:
                rows.append((ids[begin:end], max(scored - begin, 1)))
                scored = end
            if end == len(ids):
                break
    if not rows:
        raise SourceError("no text long enough to score (each document needs at least 2 tokens)")
    nll, count = 0.0, 0
    batches = range(0, len(rows), batch_size)
    for i in each(batches, "perplexity", progress):
        chunk = rows[i:i + batch_size]
        length = max(len(r) for r, _ in chunk)
        ids = torch.full((len(chunk), length), pad, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        score = torch.zeros((len(chunk), length), dtype=torch.bool)
        for j, (r, first) in enumerate(chunk):
            ids[j, :len(r)] = torch.tensor(r)
            mask[j, :len(r)] = 1
            score[j, first:len(r)] = True
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).double()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        nll -= float(logp[score[:, 1:]].sum())
        count += int(score[:, 1:].sum())
    return math.exp(nll / count), count


def classification_metrics(predicted: Sequence[int], truth: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-F1 (mean over the classes present in truth or predictions of the per-class F1)."""
    p, t = np.asarray(predicted), np.asarray(truth)
    f1 = []
    for c in np.union1d(p, t):
        tp, fp, fn = np.sum((p == c) & (t == c)), np.sum((p == c) & (t != c)), np.sum((p != c) & (t == c))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": float(np.mean(p == t)), "macro_f1": float(np.mean(f1))}


def _label_ids(labels: Sequence[str | int], id2label: dict[int, str] | None, where: str) -> list[int]:
    names = {str(v): int(k) for k, v in (id2label or {}).items()}
    out = []
    for y in labels:
        if isinstance(y, int) or (isinstance(y, str) and y.lstrip("-").isdigit() and y not in names):
            y = int(y)
            if id2label and y not in {int(k) for k in id2label}:
                raise ConfigError(f"{where}: label {y} is not a class of the model ({len(id2label)} classes)")
            out.append(y)
        elif y in names:
            out.append(names[y])
        else:
            raise ConfigError(f"{where}: label {y!r} is not one of the model's classes {sorted(names)}")
    return out


def _adapter_labels(loaded: LoadedModel) -> list[str | int] | None:
    """The class names of an adapter artifact's head, in output order (stored in its manifest)."""
    labels = getattr(loaded.model, "labels", None)
    return list(labels) if isinstance(labels, (list, tuple)) and labels else None


def _id2label(loaded: LoadedModel) -> dict[int, str] | None:
    """Class names by output index: an adapter's labels, else the Hugging Face config's id2label."""
    from edgeslim.tasks import hf_config
    adapter = _adapter_labels(loaded)
    if adapter is not None:
        return {i: str(y) for i, y in enumerate(adapter)}
    mapping = getattr(hf_config(loaded.model), "id2label", None)
    return {int(k): str(v) for k, v in mapping.items()} if mapping else None


def _classify(model: Callable[..., torch.Tensor], batches: list[dict[str, torch.Tensor]], progress: bool) -> list[int]:
    out = []
    for b in each(batches, "classifying", progress):
        with torch.inference_mode():
            out += model(**b).argmax(-1).tolist()
    return out


def _labelled_text(loaded: LoadedModel, data: str) -> tuple[list[str], list[int], str]:
    from edgeslim.data import bbc_news_classes, bbc_news_split, parse_spec, read_labelled

    name, count = parse_spec(data) if not Path(data).exists() else (data, None)
    if name == "bbc-news":
        id2label = _id2label(loaded)
        if id2label is not None and len(id2label) != len(bbc_news_classes()):
            raise ConfigError(f"bbc-news has {len(bbc_news_classes())} classes, the model's head {len(id2label)}: "
                              "give labelled data of your own (JSONL or CSV with text and label)")
        pairs = bbc_news_split()["test"][:count]
        where = f"bbc-news test:{len(pairs)}"
        if _adapter_labels(loaded) is None:
            return [t for t, _ in pairs], [y for _, y in pairs], where
        names = bbc_news_classes()  # an adapter's head is indexed by its own (sorted) class names
        return [t for t, _ in pairs], _label_ids([names[y] for _, y in pairs], id2label, where), where
    pairs = read_labelled(data)
    # an adapter's labels are matched by value (its integer labels are names, not output indices)
    labels = [str(y) if _adapter_labels(loaded) is not None else y for _, y in pairs]
    return [t for t, _ in pairs], _label_ids(labels, _id2label(loaded), data), data


def _image_folder(loaded: LoadedModel, data: str) -> tuple[list[Path], list[int]]:
    from edgeslim.data import IMAGE_SUFFIXES

    root = Path(data)
    if not root.is_dir():
        raise ConfigError(f"image classification data must be a folder with one subfolder per class, got {data}")
    files, labels = [], []
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    ids = _label_ids(classes, _id2label(loaded), str(root))
    for cls, y in zip(classes, ids):
        found = [f for f in sorted((root / cls).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        files += found
        labels += [y] * len(found)
    if not files:
        raise SourceError(f"{root}: no images in class subfolders ({', '.join(IMAGE_SUFFIXES)})")
    return files, labels


def evaluate(loaded: LoadedModel, data: str, reference: LoadedModel | None = None, onnx: str | Path | None = None,
             batch_size: int = 8, progress: bool = True) -> EvalResult:
    """The metric of `loaded.task` on `data` (see the module docstring for the forms per task).

    Args:
        loaded: the model (source or artifact); it supplies the task, tokenizer/preprocessing and inputs.
        reference: the original model, for the encoder agreement (default: `loaded` itself).
        onnx: evaluate this exported file (run by ONNX Runtime) in place of `loaded.model`.

    Raises:
        ConfigError: data that does not fit the task, or a task without a metric (generic).
        SourceError: unreadable data files.
    """
    model: Callable[..., torch.Tensor] = OnnxModel(onnx) if onnx else loaded.model.eval()
    name = str(onnx or loaded.source.identifier)
    task = loaded.task
    if task == "causal-lm":
        tokenizer = getattr(loaded.encode, "tokenizer", None)
        if tokenizer is None:
            raise ConfigError("perplexity needs the model's tokenizer (a Hugging Face causal LM)")
        texts = _texts(data)
        ppl, tokens = perplexity(model, tokenizer, texts, int(loaded.dims.get("sequence", 256)), batch_size,
                                 progress)
        return EvalResult(task, data, "perplexity", ppl, len(texts), {"perplexity": ppl, "tokens": tokens}, name)
    if task in ("sequence-classification", "image-classification"):
        if task == "image-classification":
            from edgeslim.data import image_encode
            from edgeslim.images import read_image
            files, truth = _image_folder(loaded, data)
            encode = image_encode(loaded)
            batches = [encode([read_image(f) for f in files[i:i + batch_size]])
                       for i in range(0, len(files), batch_size)]
            where = data
        else:
            texts, truth, where = _labelled_text(loaded, data)
            batches = [loaded.encode(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        metrics = classification_metrics(_classify(model, batches, progress), truth)
        return EvalResult(task, where, "accuracy", metrics["accuracy"], len(truth), metrics, name)
    if task == "feature-extraction":
        texts = _texts(data)
        ref = (reference or loaded).model.eval()
        cos = []
        for i in each(list(range(0, len(texts), batch_size)), "embedding", progress):
            feeds = loaded.encode(texts[i:i + batch_size])
            with torch.inference_mode():
                cos.append(torch.nn.functional.cosine_similarity(model(**feeds).double(), ref(**feeds).double(), dim=1))
        c = torch.cat(cos)
        metrics = {"cosine_mean": float(c.mean()), "cosine_min": float(c.min())}
        against = (reference.source.identifier if reference is not None else
                   f"{loaded.source.identifier} in PyTorch" if onnx else
                   f"itself ({loaded.source.identifier}: the baseline; an artifact is compared with its source)")
        return EvalResult(task, data, "cosine_mean", metrics["cosine_mean"], len(texts), metrics, name, against)
    if task == "super-resolution":
        return _super_resolution(model, loaded, data, name)
    raise ConfigError(f"task {task!r} has no evaluation metric; give a Hugging Face model a --task, "
                      "or evaluate a causal LM, classifier, encoder or super-resolution model")


def _super_resolution(model: Callable[..., torch.Tensor], loaded: LoadedModel, data: str, name: str) -> EvalResult:
    from edgeslim.data import IMAGE_SUFFIXES
    from edgeslim.images import degrade, luma, psnr, read_image, ssim, upscale_luma
    from edgeslim.loaders import sr_scale

    scale = sr_scale(loaded.model)
    path = Path(data)
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise SourceError(f"super-resolution data {data}: no high-resolution images ({', '.join(IMAGE_SUFFIXES)})")
    p, s = [], []
    for f in files:
        hr, lr = degrade(read_image(f), scale)
        sr = np.clip(upscale_luma(model, luma(lr)), 0, 255)
        p.append(psnr(sr, luma(hr), border=scale))
        s.append(ssim(sr, luma(hr), border=scale))
    metrics = {"psnr_y": float(np.mean(p)), "ssim_y": float(np.mean(s))}
    return EvalResult("super-resolution", data, "psnr_y", metrics["psnr_y"], len(files), metrics, name)
