"""The quickstart: the paper in miniature on the CPU, or one training run of a recipe.

    python -m megatron_vlm.quickstart              # the paper in miniature (make quickstart)
    python -m megatron_vlm.quickstart --short      # its shorter version (CI)
    python -m megatron_vlm.quickstart --single [--recipe tiny] [--data shapesworld|random] [key=value ...]
    torchrun --nproc_per_node 2 -m megatron_vlm.quickstart --single parallel.tensor_parallel=2

By default it runs the paper's recipe at CPU size on ShapesWorld
(megatron_vlm/experiments/miniature.py, examples/quickstart/): the data tools, text
pre-training with a checkpoint at 80%, image-text continued pre-training from it (the schedule
continued, 15% captions), instruction fine-tuning, and the evaluation on ShapesWorld's VQA, POPE
and referring boxes and its text tasks, then the same evaluation with every image blank. One
line per stage (each stage's output goes to runs/quickstart/logs/), then a table of the scores
with and without the images, a figure, and what to run next. key=value overrides go to every
training stage. A rerun skips the stages whose results exist and resumes an interrupted one.

With ``--single`` it runs one training of ``--recipe`` instead, on the ShapesWorld blend of
text, caption and instruction shards (``--data shapesworld``; each tool's command is printed)
or on deterministic random batches (``--data random``), printing the loss per step overall and
per source, and evaluates the final checkpoint on ShapesWorld (the first ``--eval-limit``
examples of each task split). The model, DDP, optimizer, schedule and inference are
megatron-core's, exactly as on a GPU cluster.
"""

from __future__ import annotations

import os
import sys
import time


def main(argv=None) -> int:
    from megatron_vlm.logs import configure_logging

    configure_logging()
    from megatron_vlm.config import config_arg_parser, load_config

    parser = config_arg_parser(__doc__.split("\n\n")[0], default_recipe="tiny",
                               prog="python -m megatron_vlm.quickstart")
    parser.add_argument("--short", action="store_true",
                        help="the paper in miniature with fewer steps per stage (what CI runs; "
                             "output under runs/quickstart_short)")
    parser.add_argument("--single", action="store_true",
                        help="one training run of --recipe instead of the paper in miniature")
    parser.add_argument("--data", choices=("shapesworld", "random"), default="shapesworld",
                        help="--single: ShapesWorld shards made by the data tools (default), or "
                             "random batches")
    parser.add_argument("--eval-limit", type=int, default=16,
                        help="--single: examples per evaluation task split after training (0: "
                             "no evaluation; ShapesWorld data only)")
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.single and args.short:
        raise ValueError("--short goes with the paper in miniature, not with --single")
    if not args.single:
        if args.recipe != "tiny" or args.data != "shapesworld":
            raise ValueError("--recipe and --data go with --single; the paper in miniature "
                             "runs examples/quickstart/ on ShapesWorld")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("the paper in miniature starts its stages itself: run it with "
                             "python, not torchrun (torchrun goes with --single)")
        return _paper_in_miniature(args.short, overrides)
    cfg = load_config(args.recipe, overrides)

    import torch.distributed as dist

    from megatron_vlm.runtime import shutdown
    from megatron_vlm.runtime.distributed import init_process_group_only
    from megatron_vlm.training.loop import train

    _, _, rank, world = init_process_group_only(cfg.parallel.backend, cfg.parallel.timeout_minutes,
                                                cfg.parallel.device)
    if args.data == "shapesworld":
        from megatron_vlm.data.prepare import PreparedData, prepare_shapesworld

        root = f"{cfg.output_dir}/data"
        if rank == 0:  # one rank runs the tools; the others wait for the shards
            prepare_shapesworld(root, args.recipe, overrides)
        dist.barrier()
        prepared = PreparedData.at(root)
        # A rerun trains again from scratch (it must not resume at the end of the last run) and
        # replaces the final checkpoint that the evaluation reads.
        evaluate = (["checkpoint.save_fractions=[1.0]", "checkpoint.resume=false"]
                    if args.eval_limit > 0 else [])
        cfg = load_config(args.recipe, ["data.kind=blend", *prepared.overrides(), *evaluate,
                                        *overrides])

    start = time.perf_counter()
    # steps that logged (every step unless train.log_interval says otherwise)
    history = [h for h in train(cfg) if "loss" in h]
    elapsed = time.perf_counter() - start
    if rank == 0:
        _print_table(cfg, world, history, elapsed)
    if args.data == "shapesworld" and args.eval_limit > 0:
        _evaluate(cfg, args.eval_limit, rank)
    shutdown()
    return 0 if history[-1]["loss"] < history[0]["loss"] else 1


def _paper_in_miniature(short: bool, overrides: list[str]) -> int:
    from megatron_vlm.experiments.execute import Interrupted, LocalRunner, StageFailed
    from megatron_vlm.experiments.miniature import miniature_plan, report

    plan = miniature_plan(short, overrides)
    try:
        LocalRunner(plan).run()
    except StageFailed as err:
        print(f"quickstart: error: {err}", file=sys.stderr, flush=True)
        return 1
    except Interrupted as err:
        where = f" during {err.run.id} (log: {err.run.log})" if err.run else ""
        print(f"quickstart: interrupted by {err}{where}; run the same command again to resume",
              file=sys.stderr, flush=True)
        return 128 + err.signum
    text, _ = report(plan)
    print(text, flush=True)
    return 0


def _evaluate(cfg, limit: int, rank: int) -> None:
    """The final checkpoint on ShapesWorld's suite, as tools/evaluate_vlm.py runs it."""
    from megatron_vlm.evaluation.runner import EvalRequest, evaluate, markdown_table
    from megatron_vlm.runtime import initialize

    initialize(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.backend,
               cfg.parallel.timeout_minutes, seed=cfg.seed, device=cfg.parallel.device)
    start = time.perf_counter()
    results = evaluate(EvalRequest(checkpoint=cfg.output_dir, suite="shapesworld", limit=limit,
                                   output_dir=f"{cfg.output_dir}/eval", redo=True,
                                   progress=False))
    if rank == 0:
        print(f"\nevaluation of the final checkpoint (first {limit} examples per task split, "
              f"{time.perf_counter() - start:.1f} s; tools/evaluate_vlm.py --help):")
        print(markdown_table(results).split("\n\n", 2)[-1], end="")


def _print_table(cfg, world: int, history, elapsed: float) -> None:
    import torch

    from megatron_vlm.config import DATA_SOURCES

    sources = [s for s in DATA_SOURCES if any(f"loss/{s}" in h for h in history)]
    tokens = cfg.train.train_iters * cfg.train.global_batch_size * cfg.train.seq_length
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    print(f"\nquickstart: {cfg.name} VLM, TP={tp} PP={pp} DP={world // (tp * pp)}, "
          f"{'GPU' if torch.cuda.is_available() else 'CPU'}, data: {cfg.data.kind}")
    print(f"{'step':>6} {'loss':>9}" + "".join(f" {s:>13}" for s in sources))
    for h in history:
        cells = "".join(f" {h[f'loss/{s}']:>13.4f}" if f"loss/{s}" in h else f" {'-':>13}"
                        for s in sources)
        print(f"{h['step']:>6} {h['loss']:>9.4f}{cells}")
    first, last = history[0]["loss"], history[-1]["loss"]
    print(f"loss {first:.4f} -> {last:.4f} in {elapsed:.1f} s including start-up "
          f"({tokens / elapsed:,.0f} sequence positions/s); metrics in "
          f"{cfg.output_dir}/metrics.jsonl")


if __name__ == "__main__":
    from megatron_vlm.cli import run_main

    run_main(main, "quickstart")
