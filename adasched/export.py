"""Write a trained model as a shippable folder: 16-bit safetensors, config JSON and a metadata file.

Folders are written next to their target and renamed into place, so a crash never leaves half a model.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

METADATA_FILE = "metadata.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and an atomic rename: readers never see half a file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def export_model(
    model: nn.Module, directory: str | Path, dtype: str, metadata: dict[str, Any], tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """Save ``model`` (cast to ``dtype``) with ``save_pretrained``, ``metadata.json`` and the tokenizer (so the
    folder loads on its own, e.g. as an evaluator by path) into ``directory``."""
    if dtype not in DTYPES:
        raise ValueError(f"export dtype {dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = directory.with_name(f".{directory.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    copy.deepcopy(model).to(DTYPES[dtype]).save_pretrained(str(partial))
    write_json_atomic(partial / METADATA_FILE, metadata)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(partial))
    if directory.exists():
        retired = directory.with_name(f".{directory.name}.{os.getpid()}.old")
        directory.rename(retired)
        partial.rename(directory)
        shutil.rmtree(retired)
    else:
        partial.rename(directory)
    return directory


def read_metadata(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / METADATA_FILE).read_text(encoding="utf-8"))
