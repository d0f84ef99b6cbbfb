"""Trains the tiny VLM on the CPU and prints its losses: the whole stack in under a minute.

    python -m megatron_vlm.quickstart [--recipe tiny] [key=value ...]
    torchrun --nproc_per_node 2 -m megatron_vlm.quickstart parallel.tensor_parallel=2

The model, DDP, optimizer and schedule are megatron-core's, exactly as on a GPU cluster; the
batches are deterministic random caption-like and text rows (image positions carry no loss),
made learnable so the loss visibly falls. Later stages of the pipeline (data tools, training
entry points, evaluation) extend this run as they land.
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
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.recipe, args.overrides)

    import torch
    from tqdm import tqdm

    from megatron_vlm.data.batch import random_batch, slice_rows, split_microbatches
    from megatron_vlm.model.build import build_model
    from megatron_vlm.runtime import initialize, shutdown
    from megatron_vlm.runtime.distributed import init_process_group_only
    from megatron_vlm.training.step import setup_training, train_step

    _, _, rank, world = init_process_group_only(cfg.parallel.backend, cfg.parallel.timeout_minutes)
    dp = cfg.validate_parallel(world)
    info = initialize(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                      backend=cfg.parallel.backend, timeout_minutes=cfg.parallel.timeout_minutes,
                      seed=cfg.seed)
    if rank == 0:
        path = dump_config(cfg, f"{cfg.output_dir}/config.yaml")
        logger.info("config: %s (non-default: %s)", path, non_default_values(cfg))
    model = build_model(cfg)
    state = setup_training(model, cfg)
    logger.info("model: %s parameters on this rank", f"{sum(p.numel() for p in model.parameters()):,}")

    from megatron.core import parallel_state

    dec, enc, train = cfg.model.decoder, cfg.model.encoder, cfg.train
    gen = torch.Generator().manual_seed(cfg.seed)
    dp_rank = parallel_state.get_data_parallel_rank()
    rows = train.global_batch_size // dp
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(train.train_iters), desc="train", disable=rank != 0, file=sys.stdout)
    for step in bar:
        batch = random_batch(gen, train.global_batch_size, train.seq_length, dec.vocab_size,
                             enc.num_image_tokens, enc.embed_dim,
                             image_size=enc.image_size if enc.mode == "online" else None)
        mine = split_microbatches(slice_rows(batch, dp_rank * rows, (dp_rank + 1) * rows),
                                  train.micro_batch_size)
        metrics = train_step(state, iter(mine), len(mine), cfg)
        losses.append(metrics["loss"])
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", grad_norm=f"{metrics['grad_norm']:.3f}")
    elapsed = time.perf_counter() - start
    tokens = train.train_iters * train.global_batch_size * train.seq_length
    if rank == 0:
        print(f"\nquickstart: {cfg.name} VLM, TP={info.tensor_parallel} PP={info.pipeline_parallel} "
              f"DP={info.data_parallel}, {'CPU' if info.cpu_mode else 'GPU'}")
        print(f"{'step':>6} {'loss':>10}")
        for i, loss in enumerate(losses, 1):
            print(f"{i:>6} {loss:>10.4f}")
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {elapsed:.1f} s "
              f"({tokens / elapsed:,.0f} tokens/s)")
    shutdown()
    return 0 if losses[-1] < losses[0] else 1


if __name__ == "__main__":
    from megatron_vlm.cli import run_main

    run_main(main, "quickstart")
