"""The whole pipeline on the CPU in about a minute: ShapesWorld data -> tools -> blend -> training.

    python -m megatron_vlm.quickstart [--recipe tiny] [--data shapesworld|random] [key=value ...]
    torchrun --nproc_per_node 2 -m megatron_vlm.quickstart parallel.tensor_parallel=2

With ``--data shapesworld`` (the default) it first runs the data tools on procedurally drawn
ShapesWorld images, captions, conversations and text (megatron_vlm.data.prepare; each command is
printed), then trains the recipe's VLM on the exact token-ratio blend of text, caption and
instruction shards given by ``data.ratios``, printing the loss per step overall and per source.
``--data random`` skips the data tools and trains on deterministic random batches. The model,
DDP, optimizer and schedule are megatron-core's, exactly as on a GPU cluster.
"""

from __future__ import annotations

import sys
import time


def main(argv=None) -> int:
    from megatron_vlm.logs import configure_logging

    logger = configure_logging()
    from megatron_vlm.config import config_arg_parser, dump_config, load_config, non_default_values

    parser = config_arg_parser(__doc__.split("\n\n")[0], default_recipe="tiny",
                               prog="python -m megatron_vlm.quickstart")
    parser.add_argument("--data", choices=("shapesworld", "random"), default="shapesworld",
                        help="ShapesWorld shards made by the data tools (default), or random "
                             "batches")
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    cfg = load_config(args.recipe, overrides)

    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from megatron_vlm.runtime import initialize, shutdown
    from megatron_vlm.runtime.distributed import init_process_group_only

    _, _, rank, world = init_process_group_only(cfg.parallel.backend, cfg.parallel.timeout_minutes)
    if args.data == "shapesworld":
        from megatron_vlm.data.prepare import prepare_shapesworld

        if rank == 0:  # one rank runs the tools; the others wait for the shards
            prepared = prepare_shapesworld(f"{cfg.output_dir}/data", args.recipe, overrides)
        dist.barrier()
        if rank != 0:
            prepared = prepare_shapesworld(f"{cfg.output_dir}/data", args.recipe, overrides,
                                           quiet=True)  # finished already: resumes to a no-op
        cfg = load_config(args.recipe, ["data.kind=blend", *prepared.overrides(), *overrides])
    dp = cfg.validate_parallel(world)
    info = initialize(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                      backend=cfg.parallel.backend, timeout_minutes=cfg.parallel.timeout_minutes,
                      seed=cfg.seed)
    if rank == 0:
        path = dump_config(cfg, f"{cfg.output_dir}/config.yaml")
        logger.info("config: %s (non-default: %s)", path, non_default_values(cfg))

    from megatron.core import parallel_state

    from megatron_vlm.model.build import build_model
    from megatron_vlm.training.step import setup_training, train_step

    model = build_model(cfg)
    state = setup_training(model, cfg)
    logger.info("model: %s parameters on this rank", f"{sum(p.numel() for p in model.parameters()):,}")
    next_step = _batches(cfg, parallel_state.get_data_parallel_rank(), dp)

    history = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.train.train_iters), desc="train", disable=rank != 0, file=sys.stdout)
    for _ in bar:
        microbatches = next_step()
        metrics = train_step(state, iter(microbatches), len(microbatches), cfg)
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", grad_norm=f"{metrics['grad_norm']:.3f}")
    elapsed = time.perf_counter() - start
    if rank == 0:
        _print_table(cfg, info, history, elapsed)
    shutdown()
    return 0 if history[-1]["loss"] < history[0]["loss"] else 1


def _batches(cfg, dp_rank: int, dp: int):
    """A function returning this rank's micro-batches of the next global batch."""
    train, enc = cfg.train, cfg.model.encoder
    if cfg.data.kind == "blend":
        from megatron_vlm.data.loader import BlendLoader, DataSources, build_index

        sources = DataSources(cfg.data, train.seq_length, enc.num_image_tokens, enc.embed_dim,
                              cfg.model.decoder.vocab_size)
        index = build_index(sources, cfg)
        loader = BlendLoader(sources, index, dp_rank, dp, train.micro_batch_size,
                             num_workers=cfg.data.num_workers)
        return loader.next_step

    import torch

    from megatron_vlm.data.batch import random_batch, slice_rows, split_microbatches

    gen = torch.Generator().manual_seed(cfg.seed)
    rows = train.global_batch_size // dp

    def next_random():
        batch = random_batch(gen, train.global_batch_size, train.seq_length,
                             cfg.model.decoder.vocab_size, enc.num_image_tokens, enc.embed_dim,
                             image_size=enc.image_size if enc.mode == "online" else None)
        return split_microbatches(slice_rows(batch, dp_rank * rows, (dp_rank + 1) * rows),
                                  train.micro_batch_size)

    return next_random


def _print_table(cfg, info, history, elapsed: float) -> None:
    from megatron_vlm.config import DATA_SOURCES

    sources = [s for s in DATA_SOURCES if any(f"loss/{s}" in h for h in history)]
    tokens = cfg.train.train_iters * cfg.train.global_batch_size * cfg.train.seq_length
    print(f"\nquickstart: {cfg.name} VLM, TP={info.tensor_parallel} PP={info.pipeline_parallel} "
          f"DP={info.data_parallel}, {'CPU' if info.cpu_mode else 'GPU'}, data: {cfg.data.kind}")
    print(f"{'step':>6} {'loss':>9}" + "".join(f" {s:>13}" for s in sources))
    for i, h in enumerate(history, 1):
        cells = "".join(f" {h[f'loss/{s}']:>13.4f}" if f"loss/{s}" in h else f" {'-':>13}"
                        for s in sources)
        print(f"{i:>6} {h['loss']:>9.4f}{cells}")
    first, last = history[0]["loss"], history[-1]["loss"]
    print(f"loss {first:.4f} -> {last:.4f} in {elapsed:.1f} s ({tokens / elapsed:,.0f} sequence "
          f"positions/s)")


if __name__ == "__main__":
    from megatron_vlm.cli import run_main

    run_main(main, "quickstart")
