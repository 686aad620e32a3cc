"""Write a trained model as a shippable folder: 16-bit safetensors, config JSON and a metadata file.

Folders are written next to their target and renamed into place, so a crash never leaves half a model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from adasched.io import atomic_path, write_json_atomic

METADATA_FILE = "metadata.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def export_model(
    model: nn.Module, directory: str | Path, dtype: str, metadata: dict[str, Any], tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """Save ``model`` (cast to ``dtype``) with ``save_pretrained``, ``metadata.json`` and the tokenizer (so the
    folder loads on its own, e.g. as an evaluator by path) into ``directory``."""
    if dtype not in DTYPES:
        raise ValueError(f"export dtype {dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory) as partial:
        copy.deepcopy(model).to(DTYPES[dtype]).save_pretrained(str(partial))
        write_json_atomic(partial / METADATA_FILE, metadata)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(partial))
    return directory


def read_metadata(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / METADATA_FILE).read_text(encoding="utf-8"))
