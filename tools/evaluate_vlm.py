#!/usr/bin/env python
"""Evaluates a checkpoint on the paper's vision and text benchmarks (or ShapesWorld's), with
stable scores.

    python tools/evaluate_vlm.py --checkpoint runs/1b-finetune --suite paper \\
        evaluation.data_root=/data/eval evaluation.image_embeddings=/data/eval/emb
    python tools/evaluate_vlm.py --checkpoint runs/tiny --suite shapesworld --limit 32 \\
        evaluation.data_root=data/shapesworld evaluation.text_tasks=data/shapesworld/text/tasks
    torchrun --nproc_per_node 8 tools/evaluate_vlm.py --checkpoint CKPT --suite paper \\
        --tensor-parallel 2 evaluation.data_root=/data/eval      # DP=4 replicas share examples
    python tools/evaluate_vlm.py --checkpoint runs/tiny --suite custom \\
        'evaluation.custom_tasks={mine: my_questions/questions.jsonl}'   # your own questions

CHECKPOINT is a run directory (its latest checkpoint), a checkpoint directory or a converted
DCLM checkpoint. The model is built from the checkpoint's own config (key=value overrides on
top, e.g. evaluation.batch_size=32 or train.params_dtype=bf16) at the given TP/PP; the other
ranks are data-parallel replicas that split the examples. Results go to --output (default:
RUN/eval/step_NNNNNNN for a checkpoint of a run, beside its metrics.jsonl; for any other
checkpoint directory, such as a converted DCLM one, eval/NAME beside it): results.json,
results.md and predictions/TASK.jsonl, and the path is printed last; tasks already scored
there for the same checkpoint and settings are skipped unless --redo. Your own questions:
evaluation.custom_tasks (below; the file format is in docs/evaluation.md).
"""

import os
import sys

# tqdm reads TQDM_DISABLE when it is imported: --no-progress turns lm-eval's and datasets' bars
# off on a terminal too (configure_logging turns them off in piped logs).
if "--no-progress" in sys.argv:
    os.environ.setdefault("TQDM_DISABLE", "1")

from megatron_vlm.logs import configure_logging  # noqa: E402,I001  (before other imports)

import argparse  # noqa: E402
import json  # noqa: E402

from megatron_vlm.cli import OverridesParser, run_main

PROG = "evaluate_vlm"


def build_parser() -> argparse.ArgumentParser:
    from megatron_vlm.config import EvaluationConfig, format_help
    from megatron_vlm.evaluation.runner import SUITES

    parser = OverridesParser(prog="tools/evaluate_vlm.py",
                             description=__doc__.split("\n\n")[0],
                             epilog=format_help(EvaluationConfig, "evaluation"),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="run directory, checkpoint directory or converted DCLM checkpoint")
    parser.add_argument("--suite", required=True, choices=sorted(SUITES),
                        help="task suite: the paper's (vision + text, or one of them), "
                             "ShapesWorld's, or custom (only evaluation.custom_tasks, which "
                             "every suite also runs)")
    parser.add_argument("--tasks", nargs="+", metavar="TASK",
                        help="only these tasks of the suite")
    parser.add_argument("--limit", type=int, help="at most N examples per task split (smoke "
                                                   "runs; results record the limit)")
    parser.add_argument("--output", help="results directory (default: RUN/eval/step_NNNNNNN "
                                          "for a run's checkpoint, else eval/NAME beside the "
                                          "checkpoint directory)")
    parser.add_argument("--redo", action="store_true",
                        help="run tasks again even when already scored for this checkpoint")
    parser.add_argument("--tokenizer", help="tokenizer file (default: the checkpoint's "
                                            "data.tokenizer)")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pipeline-parallel", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    parser.add_argument("--json", action="store_true",
                        help="print the results as one JSON object (stable scores, metrics and "
                             "the results directory as 'output')")
    parser.add_overrides("config overrides on top of the checkpoint's config, e.g. "
                         "evaluation.data_root=DIR (keys below)")
    return parser


def main(argv=None) -> int:
    configure_logging()
    args = build_parser().parse_intermixed_args(argv)
    from megatron_vlm.config import config_from_dict
    from megatron_vlm.evaluation.runner import EvalRequest, evaluate, markdown_table
    from megatron_vlm.runtime import initialize, shutdown
    from megatron_vlm.training.checkpointing import read_common

    common = read_common(args.checkpoint)
    if not isinstance(common.get("config"), dict):
        raise ValueError(f"{args.checkpoint}: common.json has no 'config' (not a checkpoint of "
                         "this project)")
    saved = config_from_dict(common["config"], f"{args.checkpoint}/common.json", args.overrides)
    initialize(args.tensor_parallel, args.pipeline_parallel, saved.parallel.backend,
               saved.parallel.timeout_minutes, seed=saved.seed, device=saved.parallel.device)
    try:
        results = evaluate(EvalRequest(
            checkpoint=args.checkpoint, suite=args.suite, tasks=args.tasks, limit=args.limit,
            output_dir=args.output, redo=args.redo, tokenizer=args.tokenizer,
            overrides=args.overrides, progress=not args.no_progress))
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:  # the process group is shut down by now
        if args.json:
            print(json.dumps({"stable_score": {k: v["score"] for k, v in
                                               results["stable_score"].items()},
                              "tasks": {t: e["metrics"] for t, e in results["tasks"].items()},
                              "output": results["output_dir"]}))
        else:
            sys.stdout.write(markdown_table(results))
            print(f"\nresults in {results['output_dir']}")
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
