"""A deployable bundle: one folder with the exported model and what a device app needs to feed it.

    NAME.bundle/
      model.onnx (+ model.onnx.data, model.engine + sidecar)  the exported files
      tokenizer.json, vocab.txt, preprocessor_config.json ...  the source's own small files
      bundle.json   input spec (names, dtypes, named dims), outputs, task, precision, preprocessing
                    constants, labels, the source and steps it came from, SHA-256 of every file

A folder rather than an archive: a device app opens the files in place, and `bundle.json` is the one
file to read first (its `files` map is checked like an artifact's manifest).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from edgeslim.core.files import sha256_file

BUNDLE_FORMAT, BUNDLE_VERSION = "edgeslim-bundle", 1


def labels_from_config(files: Mapping[str, bytes]) -> list[str] | None:
    """Class names from a Hugging Face config.json's `id2label`, in index order (None when absent)."""
    raw = files.get("config.json")
    if not raw:
        return None
    id2label = json.loads(raw).get("id2label") or {}
    try:
        return [id2label[k] for k in sorted(id2label, key=int)] or None
    except ValueError:
        return None


def write_bundle(folder: Path, meta: Mapping[str, Any], files: Mapping[str, bytes]) -> dict[str, Any]:
    """Write `files` (name -> bytes) into `folder` (which already holds the exported model) and
    `bundle.json` = `meta` + format, version and the SHA-256 of every file in the folder."""
    for name, data in files.items():
        (folder / name).write_bytes(data)
    listing = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "bundle.json"}
    manifest = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, **meta, "files": listing}
    (folder / "bundle.json").write_text(json.dumps(manifest, indent=2, default=str))
    return manifest
