#!/usr/bin/env python
"""Scores a vision predictions file offline against the benchmark's annotation files, by the
task's official rule (megatron_vlm/evaluation/scorers.py), and prints the metrics.

    python tools/score_predictions.py --task vqav2 --predictions preds.jsonl \\
        --annotations questions.json annotations.json [--json] [--allow-missing]

The annotation files are the ones the task loader reads (VQAv2: questions then annotations;
POPE: one JSONL per split; RefCOCO: the JSONL of expressions). Every metric is a fraction in
[0, 1]; ``n`` counts the examples, ``missing`` those without a prediction (an error unless
--allow-missing, which scores them wrong).
"""

from megatron_vlm.logs import configure_logging  # noqa: I001  (first, before other imports)

import argparse
import json
import sys

from megatron_vlm.cli import run_main

PROG = "score_predictions"


def build_parser() -> argparse.ArgumentParser:
    from megatron_vlm.evaluation.scorers import TASK_SCORING

    parser = argparse.ArgumentParser(prog="tools/score_predictions.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, choices=list(TASK_SCORING), metavar="TASK",
                        help=f"the benchmark: {', '.join(TASK_SCORING)}")
    parser.add_argument("--predictions", required=True, metavar="FILE",
                        help='predictions: JSON Lines {"question_id", "answer"[, "box", '
                             '"yes_prob", "no_prob"]} or one JSON list of such objects')
    parser.add_argument("--annotations", required=True, nargs="+", metavar="FILE",
                        help="the task's annotation files, as its loader takes them")
    parser.add_argument("--json", action="store_true",
                        help="print the metrics as one JSON object instead of a table")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score examples without a prediction as wrong instead of failing")
    return parser


def format_table(task: str, metrics: dict) -> str:
    """The metrics as aligned ``name  value`` lines under a title line."""
    width = max(len(name) for name in metrics)
    lines = [f"{task}:"]
    for name, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"  {name:<{width}}  {shown:>8}")
    return "\n".join(lines)


def main(argv=None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    from megatron_vlm.evaluation.scorers import read_predictions, score
    from megatron_vlm.evaluation.tasks import load_examples

    predictions = read_predictions(args.predictions)
    examples = load_examples(args.task, list(args.annotations))
    metrics = score(args.task, examples, predictions, allow_missing=args.allow_missing,
                    source=args.predictions)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(format_table(args.task, metrics), file=sys.stdout)
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
