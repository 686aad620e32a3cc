"""Merge a sweep run as several jobs:  python experiments/merge_sweep.py runs/multirun/shakespeare/exhaustive

Each job of ``python experiments/sweep.py -m experiment=exhaustive experiment.num_shards=4
'experiment.shard_index=range(0,4)'`` keeps its own arm log; this writes the table, results.json and
figures over all of them into the given folder (and the Pareto fronts, where the reference ran at several budgets).

With ``--reference ARM`` it pairs every arm of a finished sweep (one folder or its shards) against ARM
instead of the experiment's reference, from the same samples, into ``table_vs_ARM.csv``:
    python experiments/merge_sweep.py runs/sweep/shakespeare/budget_comparison --reference kl_router
"""

import argparse
import sys
from pathlib import Path

from adasched.cli import user_errors_exit
from adasched.jobs.sweep import merge_shards, pair_against


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a sweep's run folder, or the folder holding its shards' run folders")
    parser.add_argument("--reference", default=None, help="an arm to pair every other against (default: merge the shards' report)")
    args = parser.parse_args(argv)
    with user_errors_exit():
        if args.reference is None:
            merge_shards(args.folder)
        else:
            pair_against(args.folder, args.reference)


if __name__ == "__main__":
    main(sys.argv[1:])
