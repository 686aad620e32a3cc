"""An append-only record of a sweep's finished arms, so a sweep killed at any moment resumes where it stopped.

Each finished arm is one JSON line, written in one ``write`` and fsynced before the next arm starts: a crash
loses at most the arm in progress. A line torn by a crash mid-write is dropped (and cut off the file) on the
next load. The settings every arm must share (seeds, sampler, family, evaluator) are kept beside the lines;
resuming under other settings is refused, since the arms would no longer be comparable. Each line also holds
digests of the files its policy read (``artifact_digests``), so an arm whose router was retrained since is
sampled again; its new line supersedes the old one, which stays in the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from adasched.errors import ConfigError
from adasched.io import write_json_atomic

SETTINGS_FILE = "settings.json"
ARMS_FILE = "arms.jsonl"


def content_digest(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (their relative paths and contents, in sorted order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")  # "." for a lone file
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def artifact_digests(policy_config: dict[str, Any]) -> dict[str, str]:
    """Digests of the files a policy reads (its config's ``path`` or ``*_path`` entries: a trained router, a fitted
    predictor), by key: what tells an arm finished before a retraining from one finished after it."""
    return {
        key: content_digest(Path(value)) for key, value in sorted(policy_config.items())
        if (key == "path" or key.endswith("_path")) and isinstance(value, str) and Path(value).exists()
    }


class ArmLog:
    """``folder/arms.jsonl`` (one finished arm per line, keyed by ``label``) and ``folder/settings.json``."""

    def __init__(self, folder: Path, settings: dict[str, Any]) -> None:
        self.folder = folder
        self.path = folder / ARMS_FILE
        folder.mkdir(parents=True, exist_ok=True)
        settings = json.loads(json.dumps(settings, sort_keys=True, default=str))  # as it will read back
        settings_path = folder / SETTINGS_FILE
        if settings_path.is_file():
            saved = json.loads(settings_path.read_text(encoding="utf-8"))
            changed = sorted(key for key in saved.keys() | settings.keys() if saved.get(key) != settings.get(key))
            if changed:
                raise ConfigError(
                    f"{folder} holds arms run with other settings ({', '.join(changed)}); "
                    "rerun with the same settings to resume, or pass another hydra.run.dir"
                )
        else:
            write_json_atomic(settings_path, settings)

    def load(self) -> dict[str, dict[str, Any]]:
        """Finished arms by label, in the order they finished; a torn last line is removed from the file."""
        if not self.path.is_file():
            return {}
        records: dict[str, dict[str, Any]] = {}
        kept = 0
        with self.path.open("rb") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break
                if not line.endswith(b"\n"):
                    break
                records[record["label"]] = record
                kept += len(line)
        if kept < self.path.stat().st_size:
            with self.path.open("r+b") as handle:
                handle.truncate(kept)
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Add one finished arm durably (flushed and fsynced)."""
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def read_sweep(folder: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[Path]]:
    """The shared settings and the finished arms (by label) of a sweep folder, or of every shard of one sweep
    under a multirun folder, with the folders they came from. Shards run with other settings are refused: their
    arms would not be comparable. An arm found in several shards is counted once."""
    settings_files = sorted(folder.rglob(SETTINGS_FILE))
    if not settings_files:
        raise ConfigError(f"no sweep under {folder} (no {SETTINGS_FILE}); pass the folder of a sweep or of its multirun")
    settings = [json.loads(path.read_text(encoding="utf-8")) for path in settings_files]
    differing = [str(path.parent) for path, s in zip(settings_files, settings) if s != settings[0]]
    if differing:
        raise ConfigError(f"shards {', '.join(differing)} were run with other settings than {settings_files[0].parent}; they cannot be merged")
    folders = [path.parent for path in settings_files]
    records: dict[str, dict[str, Any]] = {}
    for shard in folders:
        records |= ArmLog(shard, settings[0]).load()
    return settings[0], records, folders
