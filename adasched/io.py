"""Atomic writes: a file or folder appears whole at its path or not at all, so a crash never leaves half a result."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (a file or a folder); on success it replaces ``path``.

    The sibling keeps ``path``'s suffix, so writers that infer a format from it (matplotlib) still work.
    A folder that already exists is swapped out whole; on an error the partial write is removed.
    """
    path = Path(path)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    _remove(partial)
    try:
        yield partial
    except BaseException:
        _remove(partial)
        raise
    if partial.is_dir() and path.exists():
        retired = path.with_name(f".{path.name}.{os.getpid()}.old")
        path.rename(retired)
        partial.rename(path)
        _remove(retired)
    else:
        os.replace(partial, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, payload: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
