"""The whole pipeline on the CPU in about a minute: ShapesWorld data -> tools -> blend ->
training -> evaluation.

    python -m megatron_vlm.quickstart [--recipe tiny] [--data shapesworld|random] [key=value ...]
    torchrun --nproc_per_node 2 -m megatron_vlm.quickstart parallel.tensor_parallel=2

With ``--data shapesworld`` (the default) it first runs the data tools on procedurally drawn
ShapesWorld images, captions, conversations and text (megatron_vlm.data.prepare; each command is
printed), then trains the recipe's VLM on the exact token-ratio blend of text, caption and
instruction shards given by ``data.ratios``, printing the loss per step overall and per source,
and evaluates the final checkpoint on ShapesWorld's vision and text tasks (the first
``--eval-limit`` examples of each; tools/evaluate_vlm.py, results in OUTPUT_DIR/eval), printing
the scores. ``--data random`` skips the data tools and the evaluation and trains on
deterministic random batches. The model, DDP, optimizer, schedule and inference are
megatron-core's, exactly as on a GPU cluster.
"""

from __future__ import annotations

import time


def main(argv=None) -> int:
    from megatron_vlm.logs import configure_logging

    configure_logging()
    from megatron_vlm.config import config_arg_parser, load_config

    parser = config_arg_parser(__doc__.split("\n\n")[0], default_recipe="tiny",
                               prog="python -m megatron_vlm.quickstart")
    parser.add_argument("--data", choices=("shapesworld", "random"), default="shapesworld",
                        help="ShapesWorld shards made by the data tools (default), or random "
                             "batches")
    parser.add_argument("--eval-limit", type=int, default=16,
                        help="examples per evaluation task split after training (0: no "
                             "evaluation; ShapesWorld data only)")
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides)
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
