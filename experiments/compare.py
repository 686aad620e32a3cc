"""Compare runs:  python experiments/compare.py runs/multirun/shakespeare/<date>  [more run folders ...]

Prints a table (gen PPL, paired difference vs all-heavy, path KL with its seed floor and the excess over it,
diversity, FLOPs saved, wall clock) and writes comparison.csv and comparison.png (gen PPL, path KL and its
excess against executed FLOPs saved) into --out (default: the first folder).
"""

import argparse
import sys
from pathlib import Path

from adasched.analysis.comparison import (
    find_results,
    format_table,
    load_rows,
    table_rows,
    to_csv,
)
from adasched.analysis.plots import plot_quality_vs_compute
from adasched.cli import user_errors_exit
from adasched.io import write_text_atomic


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders, sweep folders or results.json files")
    parser.add_argument("--out", type=Path, default=None, help="where to write comparison.csv/.png")
    args = parser.parse_args(argv)
    with user_errors_exit():
        rows = load_rows(find_results(args.runs))
        table = table_rows(rows)
        out = args.out or Path(args.runs[0])
        out = out if out.is_dir() else out.parent
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "comparison.csv", to_csv(table))
        plot_quality_vs_compute(rows, out / "comparison.png")
        print(format_table(table))
        print(f"\nwrote {out / 'comparison.csv'} and {out / 'comparison.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
