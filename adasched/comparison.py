"""Compare finished runs: collect their results.json, tabulate, and plot quality against compute."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adasched.errors import ConfigError

COLUMNS = ("label", "gen_ppl", "ci95", "paired_diff", "entropy", "saved_nominal_%", "saved_executed_%", "wall_s", "speedup")


def find_results(paths: Sequence[str | Path]) -> list[Path]:
    """Every results.json under the given run or sweep folders, in a stable order."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise ConfigError(f"no such run folder: {path}")
        found += [path] if path.is_file() else sorted(path.rglob("results.json"))
    if not found:
        raise ConfigError(f"no results.json under {', '.join(map(str, paths))}")
    return found


def load_rows(files: Sequence[Path]) -> list[dict[str, Any]]:
    rows = []
    for file in files:
        result = json.loads(file.read_text(encoding="utf-8"))
        settings = {k: v for k, v in result.get("policy_config", {}).items() if k != "name"}
        suffix = ",".join(f"{k}={v}" for k, v in settings.items() if k not in ("light", "letters"))
        result["label"] = f"{result['policy']}({suffix})" if suffix else result["policy"]
        result["file"] = str(file)
        rows.append(result)
    return sorted(rows, key=lambda row: row["flops"]["saved_executed"])


def table_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "label": row["label"],
            "gen_ppl": round(row["gen_ppl"]["mean"], 3),
            "ci95": round(row["gen_ppl"]["ci95"], 3),
            "paired_diff": round(row["gen_ppl_paired_diff"]["mean"], 3) if "gen_ppl_paired_diff" in row else "",
            "entropy": round(row["entropy"]["mean"], 4),
            "saved_nominal_%": round(100 * row["flops"]["saved_nominal"], 2),
            "saved_executed_%": round(100 * row["flops"]["saved_executed"], 2),
            "wall_s": round(row["wall_s"]["sampling"], 2),
            "speedup": round(row["speedup_vs_all_heavy"], 3) if "speedup_vs_all_heavy" in row else "",
        }
        for row in rows
    ]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
