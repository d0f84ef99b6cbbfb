#!/usr/bin/env python
"""Compares two evaluations of the same items, task by task and stable score by stable score:
B - A with its paired bootstrap 95% interval, a p-value and its Holm adjustment.

    python tools/compare_runs.py runs/a/eval/step_0001000 runs/b/eval/step_0001000
    python tools/compare_runs.py RUN_A RUN_B --tasks shapesworld_vqa shapesworld_pope \\
        --output /tmp/a_vs_b                     # runs: their latest checkpoint's evaluation
    python tools/compare_runs.py runs/quickstart/finetune/ckpt80_ft12/eval_blank \\
        runs/quickstart/finetune/ckpt80_ft12/eval          # what the images are worth

A and B are evaluation folders holding results.json (tools/evaluate_vlm.py's --output), a
results.json, or a run or checkpoint whose default evaluation folder holds one. Items are
matched by example id through the items/TASK.jsonl files beside results.json: only ids both
scored count (a differing set is noted with its counts). The p-value is McNemar's exact test
for right/wrong items (exact match, POPE, grounding), else the paired bootstrap's; Holm's
adjustment runs over every row of the table. Prints the table and writes comparison.md,
comparison.json and comparison.png (a forest plot) to --output. docs/evaluation.md has the
details.
"""

from megatron_vlm.logs import configure_logging  # noqa: I001  (first, before other imports)

import argparse
import sys

from megatron_vlm.cli import run_main

PROG = "compare_runs"
DEFAULT_OUTPUT = "comparison"


def build_parser() -> argparse.ArgumentParser:
    from megatron_vlm.evaluation.statistics import RESAMPLES, SEED

    parser = argparse.ArgumentParser(prog="tools/compare_runs.py",
                                     description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", metavar="A", help="the baseline: an evaluation folder, a "
                                               "results.json, or a run or checkpoint")
    parser.add_argument("b", metavar="B", help="the one compared with it (differences are "
                                               "B - A)")
    parser.add_argument("--tasks", nargs="+", metavar="TASK",
                        help="only these tasks (default: every task both evaluated)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, metavar="DIR",
                        help="where comparison.md, comparison.json and comparison.png go "
                             "(default: %(default)s)")
    parser.add_argument("--resamples", type=int, default=RESAMPLES, metavar="N",
                        help="bootstrap resamples (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="bootstrap seed (default: %(default)s)")
    return parser


def main(argv=None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    from megatron_vlm.evaluation.compare import compare, load_arm, markdown, write_comparison

    if args.resamples < 1 or args.seed < 0:
        raise ValueError(f"--resamples must be positive and --seed 0 or more, got "
                         f"{args.resamples} and {args.seed}")
    comparison = compare(load_arm(args.a), load_arm(args.b), args.tasks,
                         resamples=args.resamples, seed=args.seed)
    title = "Paired comparison of two evaluations"
    files = write_comparison([comparison], args.output, title)
    sys.stdout.write(markdown([comparison], title))
    print(f"\nwritten: {', '.join(map(str, files))}")
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
