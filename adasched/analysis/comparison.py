"""Compare finished runs: collect their results.json, tabulate, and plot quality against compute."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from adasched.analysis.evaluation import paired_difference
from adasched.errors import ConfigError

PATH_KL_COLUMNS = (
    "path_kl", "path_kl_ci95", "path_kl_floor", "path_kl_floor_ci95", "path_kl_excess", "path_kl_excess_ci95", "floor_share_%",
)
COLUMNS = ("label", "gen_ppl", "ci95", "paired_diff", *PATH_KL_COLUMNS, "entropy", "saved_nominal_%", "saved_executed_%", "wall_s", "speedup")


def analysis_label(record: dict[str, Any]) -> str | None:
    """What a table shows instead of an analysis-only policy's wall clock and speedup (the oracle's sampling runs its
    own evaluation forwards: timing it says nothing of a sampler), e.g. "analysis (oracle)"; None for the rest."""
    return f"analysis ({record['policy']})" if record.get("analysis_only") else None


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
            **path_kl_cells(row),
            "entropy": round(row["entropy"]["mean"], 4),
            "saved_nominal_%": round(100 * row["flops"]["saved_nominal"], 2),
            "saved_executed_%": round(100 * row["flops"]["saved_executed"], 2),
            "wall_s": analysis_label(row) or round(row["wall_s"]["sampling"], 2),
            "speedup": analysis_label(row) or (round(row["speedup_vs_all_heavy"], 3) if "speedup_vs_all_heavy" in row else ""),
        }
        for row in rows
    ]


def path_kl_cells(record: dict[str, Any]) -> dict[str, Any]:
    """Mean per sequence and 95% half-width of path KL, of its seed floor and of the excess over the floor, and the
    share of the path KL that is floor (what any equally good network would have cost); blank where a run did
    not measure them (path KL: eval.path_kl=false; the floor: eval.seed_baseline=null, or runs from before it
    was measured)."""
    path_kl = record.get("path_kl", {})
    cells: dict[str, Any] = {}
    for column, measured in (("path_kl", path_kl), ("path_kl_floor", path_kl.get("floor", {})), ("path_kl_excess", path_kl.get("excess", {}))):
        value = measured.get("per_sequence")
        cells[column], cells[f"{column}_ci95"] = ("", "") if value is None else (round(value["mean"], 4), round(value["ci95"], 4))
    measured_both = cells["path_kl_floor"] != "" and cells["path_kl"]
    cells["floor_share_%"] = round(100 * cells["path_kl_floor"] / cells["path_kl"], 1) if measured_both else ""
    return cells


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


PAIRED_PATH_KL_COLUMNS = (
    "path_kl_diff", "path_kl_diff_ci95", "path_kl_verdict", "path_kl_excess_diff", "path_kl_excess_diff_ci95", "path_kl_excess_verdict",
)
SWEEP_COLUMNS = (
    "label", "budget", "gen_ppl", "ci95", "diff_vs_reference", "diff_ci95", "verdict", *PATH_KL_COLUMNS, *PAIRED_PATH_KL_COLUMNS,
    "entropy", "distinct_2", "saved_executed_%", "saved_nominal_%", "knob", "wall_s", "speedup_vs_reference",
)


def reference_for(record: dict[str, Any], records: Sequence[dict[str, Any]], reference: str | None) -> dict[str, Any] | None:
    """The arm ``reference`` at the record's budget, else its budget-free run (e.g. all-heavy), else None."""
    candidates = [r for r in records if r["arm"] == reference]
    same_budget = [r for r in candidates if r["budget"] == record["budget"]]
    unbudgeted = [r for r in candidates if r["budget"] is None]
    return (same_budget or unbudgeted or [None])[0]


def verdict(difference: float, half_width: float) -> str:
    """Lower is better (perplexity, path KL); a 95% interval of the paired difference that holds 0 decides nothing."""
    if difference + half_width < 0:
        return "better"
    if difference - half_width > 0:
        return "worse"
    return "tie"


def seed_baseline_of(record: dict[str, Any]) -> str | None:
    """The model a record's path-KL floor was measured with; None where it measured none."""
    return record.get("path_kl", {}).get("floor", {}).get("seed_baseline")


def paired_cells(column: str, values: list[float], reference_values: list[float]) -> dict[str, Any]:
    """``column``'s paired difference to the reference arm on the same seeds, its 95% half-width and verdict."""
    difference, half_width = paired_difference(torch.tensor(values), torch.tensor(reference_values))
    return {f"{column}_diff": round(difference, 4), f"{column}_diff_ci95": round(half_width, 4), f"{column}_verdict": verdict(difference, half_width)}


def sweep_rows(records: Sequence[dict[str, Any]], reference: str | None) -> list[dict[str, Any]]:
    """One row per arm: quality, cost, and the paired differences of perplexity, path KL and its excess over the
    seed floor to ``reference`` on the same seeds (excess only where both floors came from the same seed baseline)."""
    rows = []
    for record in records:
        row = {
            "label": record["label"],
            "budget": "" if record["budget"] is None else record["budget"],
            "gen_ppl": round(record["gen_ppl"]["mean"], 2),
            "ci95": round(record["gen_ppl"]["ci95"], 2),
            "diff_vs_reference": "", "diff_ci95": "", "verdict": "",
            **path_kl_cells(record), **dict.fromkeys(PAIRED_PATH_KL_COLUMNS, ""),
            "entropy": round(record["entropy"]["mean"], 4),
            "distinct_2": round(record["distinct"]["2"], 4),
            "saved_executed_%": round(100 * record["flops"]["saved_executed"], 2),
            "saved_nominal_%": round(100 * record["flops"]["saved_nominal"], 2),
            "knob": round(record["calibration"]["knob"], 4) if record.get("calibration") else "",
            "wall_s": analysis_label(record) or round(record["wall_s"]["sampling"], 1),
            "speedup_vs_reference": "",
        }
        baseline = reference_for(record, records, reference)
        if baseline is record:
            row["verdict"] = "reference"
        elif baseline is not None:
            if baseline["seeds"] != record["seeds"]:
                raise ConfigError(f"arms {record['label']} and {baseline['label']} were sampled on different seeds; they cannot be paired")
            difference, half_width = paired_difference(torch.tensor(record["nll"]).exp(), torch.tensor(baseline["nll"]).exp())
            row |= {
                "diff_vs_reference": round(difference, 2), "diff_ci95": round(half_width, 2), "verdict": verdict(difference, half_width),
                "speedup_vs_reference": (
                    analysis_label(record) or analysis_label(baseline) or round(baseline["wall_s"]["sampling"] / record["wall_s"]["sampling"], 3)
                ),
            }
            if "path_kl_per_sample" in record and "path_kl_per_sample" in baseline:
                row |= paired_cells("path_kl", record["path_kl_per_sample"], baseline["path_kl_per_sample"])
            if "path_kl_excess_per_sample" in record and "path_kl_excess_per_sample" in baseline and seed_baseline_of(record) == seed_baseline_of(baseline):
                row |= paired_cells("path_kl_excess", record["path_kl_excess_per_sample"], baseline["path_kl_excess_per_sample"])
        rows.append(row)
    return rows
