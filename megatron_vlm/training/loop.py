"""The training loop shared by pretrain_vlm.py and finetune_vlm.py, top to bottom.

start: process groups -> config checks that can fail early -> model, DDP, optimizer -> resume
(the latest checkpoint of this run) or start from ``checkpoint.load`` -> data -> schedule
loop:  LR from the schedule -> one train step (megatron schedules) -> log -> maybe save
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import torch

logger = logging.getLogger("megatron_vlm")


def build_schedule(cfg, parent_common: Optional[dict]):
    """The run's LR schedule from ``schedule.*`` (and the parent checkpoint's metadata)."""
    from megatron_vlm.training.schedule import LRSchedule, warmup_steps_from_fraction

    s, t = cfg.schedule, cfg.train
    tokens_per_step = t.global_batch_size * t.seq_length
    if s.mode == "continue":
        parent = (parent_common or {}).get("schedule")
        if parent is None:
            raise ValueError(f"schedule.mode=continue: checkpoint {cfg.checkpoint.load} has no "
                             "schedule metadata to continue (use schedule.mode=rewarmup)")
        return LRSchedule.continue_from(parent, t.train_iters, tokens_per_step=tokens_per_step)
    warmup = (warmup_steps_from_fraction(s.warmup_fraction, t.train_iters)
              if s.warmup_fraction is not None else s.warmup_iters)
    if warmup > t.train_iters:
        raise ValueError(f"schedule.warmup_iters={warmup} is longer than "
                         f"train.train_iters={t.train_iters}")
    if s.mode == "rewarmup":
        return LRSchedule.rewarmup(t.train_iters, warmup, t.lr, t.min_lr, s.decay_style,
                                   tokens_per_step=tokens_per_step,
                                   parent=(parent_common or {}).get("schedule"))
    return LRSchedule.warmup_cosine(t.train_iters, warmup, t.lr, t.min_lr, s.decay_style,
                                    tokens_per_step=tokens_per_step)


def log_trainable(model) -> None:
    """One line per top-level part: trainable or frozen, and its parameter count."""
    from megatron_vlm.training.checkpointing import unwrap

    parts = {"decoder": unwrap(model).language_model, "projector": unwrap(model).projector,
             "vision encoder": unwrap(model).vision_encoder}
    for name, part in parts.items():
        if part is None:
            continue
        params = list(part.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        state = "trainable" if trainable == total else ("frozen" if trainable == 0 else "partly trainable")
        logger.info("  %-14s %s (%s of %s parameters train)", name, state, f"{trainable:,}", f"{total:,}")


def make_batches(cfg, dp_rank: int, dp: int, loader_state: Optional[dict]):
    """(next_step function, loader or None) for ``data.kind``."""
    train, enc = cfg.train, cfg.model.encoder
    if cfg.data.kind == "blend":
        from megatron_vlm.data.loader import BlendLoader, DataSources, LoaderState, build_index

        sources = DataSources(cfg.data, train.seq_length, enc.num_image_tokens, enc.embed_dim,
                              cfg.model.decoder.vocab_size, encoder=enc)
        index = build_index(sources, cfg)
        if index.num_batches < train.train_iters:
            raise ValueError(f"the blend holds {index.num_batches} global batches but "
                             f"train.train_iters={train.train_iters}; raise data.total_tokens")
        loader = BlendLoader(sources, index, dp_rank, dp, train.micro_batch_size,
                             num_workers=cfg.data.num_workers,
                             state=LoaderState(**loader_state) if loader_state else None)
        return loader.next_step, loader

    from megatron_vlm.data.batch import check_batch, random_batch, slice_rows, split_microbatches

    consumed = (loader_state or {}).get("consumed_global_batches", 0)
    rows = train.global_batch_size // dp

    def next_random():
        nonlocal consumed
        # A generator per global batch: resumable from the batch count alone.
        gen = torch.Generator().manual_seed(cfg.data.seed * 1_000_003 + consumed)
        consumed += 1
        batch = random_batch(gen, train.global_batch_size, train.seq_length,
                             cfg.model.decoder.vocab_size, enc.num_image_tokens, enc.embed_dim,
                             image_size=enc.image_size if enc.mode == "online" else None,
                             documents=cfg.data.caption_fill == "text")
        mine = slice_rows(batch, dp_rank * rows, (dp_rank + 1) * rows)
        check_batch(mine, enc.num_image_tokens, where=f"random global batch {consumed - 1}")
        return split_microbatches(mine, train.micro_batch_size)

    next_random.state_dict = lambda: {"consumed_global_batches": consumed}
    return next_random, next_random


@contextlib.contextmanager
def synced_parameters(ddp_model):
    """Parameters up to date for a save: with the parameter gather overlapped into the next
    forward pass, the last optimizer step's all-gather is still pending; force it, and put the
    forward hooks back afterwards (as megatron does around checkpoints)."""
    if not getattr(ddp_model, "use_forward_hook", False):
        yield
        return
    ddp_model.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        ddp_model.enable_forward_pre_hook()


def train(cfg, on_step: Optional[Callable[[int, dict], None]] = None) -> list[dict]:
    """Runs (or resumes) the training described by ``cfg``; returns the per-step metrics of
    this invocation."""
    from megatron.core import parallel_state

    from megatron_vlm.config import config_summary, config_to_dict, dump_config
    from megatron_vlm.model.build import build_model
    from megatron_vlm.progress import Progress
    from megatron_vlm.runtime import initialize
    from megatron_vlm.runtime.distributed import init_process_group_only
    from megatron_vlm.training import checkpointing as ckpt
    from megatron_vlm.training.checkpoint_checks import check_resume_schedule
    from megatron_vlm.training import flops
    from megatron_vlm.training.grad_finalize import GRAD_NORM_PATH
    from megatron_vlm.training.metrics_log import MetricsLog
    from megatron_vlm.training.schedule import apply_lr, checkpoint_steps
    from megatron_vlm.training.step import setup_training, summarize_losses, train_step

    # Checks that need no model: a bad path or schedule stops here, before any work.
    parent_common = ckpt.read_common(cfg.checkpoint.load) if cfg.checkpoint.load else None
    if parent_common is not None:
        ckpt.check_decoder_matches(parent_common, cfg.model.decoder, cfg.checkpoint.load)
    schedule = build_schedule(cfg, parent_common)

    _, _, rank, world = init_process_group_only(cfg.parallel.backend, cfg.parallel.timeout_minutes,
                                                cfg.parallel.device)
    dp = cfg.validate_parallel(world)
    info = initialize(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                      backend=cfg.parallel.backend, timeout_minutes=cfg.parallel.timeout_minutes,
                      seed=cfg.seed, device=cfg.parallel.device)
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    resume = ckpt.latest_checkpoint(ckpt_dir) if cfg.checkpoint.resume else None
    if resume is not None:  # before any work: another model or schedule stops here
        resume_common = ckpt.read_common(resume)
        ckpt.check_decoder_matches(resume_common, cfg.model.decoder, resume)
        check_resume_schedule(resume_common, config_to_dict(cfg), resume,
                              cfg.checkpoint.allow_schedule_change)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        logger.info("%s", config_summary(cfg, dump_config(cfg, out / "config.yaml")))
        logger.info("%s", schedule.describe())

    model = build_model(cfg)
    state = setup_training(model, cfg)
    logger.info("model parts (this rank):")
    log_trainable(model)
    logger.info("%s", model.features.describe())
    logger.info("%s", GRAD_NORM_PATH)
    if cfg.train.fp8:
        logger.info("FP8 (%s) in the decoder's transformer layers; projector, embeddings and "
                    "output layer in %s", cfg.train.fp8, cfg.train.params_dtype)

    start, loader_state = 0, None
    if resume is not None:
        common = ckpt.load_checkpoint(resume, state.model, state.optimizer)
        start, loader_state = common["step"], common["loader"]
        logger.info("resumed from %s at step %d", resume, start)
    elif cfg.checkpoint.load:
        optimizer = state.optimizer if cfg.checkpoint.load_optimizer else None
        ckpt.load_checkpoint(cfg.checkpoint.load, state.model, optimizer, with_rng=False,
                             parts=cfg.checkpoint.load_parts)
        if optimizer is None:
            state.optimizer.reload_model_params()
        what = "decoder weights" if cfg.checkpoint.load_parts == "decoder" else "weights"
        logger.info("started from %s (%s%s)", ckpt.resolve_checkpoint(cfg.checkpoint.load), what,
                    " and optimizer state" if optimizer is not None else " only")
    state.step = start

    next_step, loader = make_batches(cfg, parallel_state.get_data_parallel_rank(), dp, loader_state)
    saves = checkpoint_steps(cfg.train.train_iters, cfg.checkpoint.save_fractions) \
        if cfg.checkpoint.save_fractions else {}
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
    # MFU against the dense bf16 peak, and for FP8 runs also against the FP8 peak, each named.
    peaks = flops.device_peaks() if info.device.type == "cuda" else None
    if peaks is not None and rank == 0:
        logger.info("MFU peaks: %s", peaks.describe())

    history: list[dict] = []
    sink = (MetricsLog(out, config_to_dict(cfg), cfg.name, cfg.train.wandb_project)
            if rank == 0 else None)
    writer = ckpt.CheckpointWriter(async_save=model.features.async_save)
    keep = {ckpt.step_dir_name(s) for s in saves}

    def saved(path: Path, done: int) -> None:  # every rank, once the checkpoint is complete
        ckpt.prune_checkpoints(ckpt_dir, cfg.checkpoint.keep_last, keep)
        if rank == 0:
            logger.info("saved %s (%.0f%% of the schedule)", path, 100 * done / cfg.train.train_iters)

    # A bar on a terminal only: each log step's line already says where the run is, so a piped
    # log gets those lines alone, and the loss is printed once, in them.
    bar = Progress(cfg.train.train_iters, "train", "step", enabled=rank == 0, initial=start,
                   lines=False)
    # Losses stay on the device between log steps (summed, so a log line reports the per-token
    # mean over its interval); reading them is the only wait for the GPU the loop adds.
    pending, last_logged, last_time, interval_flops = None, start, time.perf_counter(), 0.0
    try:
        for step in range(start, cfg.train.train_iters):
            lr = schedule.lr(step)
            apply_lr(state.optimizer, lr)
            microbatches = next_step()
            # Model FLOPs of this step (projector work follows the share of image positions).
            interval_flops += tokens_per_step * flops.flops_per_token(
                cfg, flops.image_positions_fraction(microbatches))
            result = train_step(state, microbatches, len(microbatches), cfg, summarize=False)
            pending = result["loss_sums"] if pending is None else pending + result["loss_sums"]
            done = step + 1
            metrics = {"step": done, "lr": lr}
            if done % cfg.train.log_interval == 0 or done == cfg.train.train_iters:
                metrics.update(summarize_losses(pending))  # waits for the device
                metrics["grad_norm"] = float(result["grad_norm"])  # this step's, before clipping
                now = time.perf_counter()
                steps, seconds = done - last_logged, now - last_time
                flops_per_s_per_gpu = interval_flops / seconds / world
                metrics.update(tokens_per_s=tokens_per_step * steps / seconds,
                               tflops=flops_per_s_per_gpu / 1e12)
                if peaks is not None:
                    metrics.update({k: v for k, v in flops.mfu_by_peak(
                        flops_per_s_per_gpu, peaks, fp8=bool(cfg.train.fp8)).items()
                        if v is not None})
                pending, last_logged, last_time, interval_flops = None, done, now, 0.0
                if sink is not None:
                    sink.log(done, metrics)
                if rank == 0:
                    # Per-source losses when there are several (one source is the loss itself).
                    sources = [k for k in metrics if k.startswith("loss/")]
                    extra = "".join(f" {k}={metrics[k]:.4f}" for k in sources
                                    if len(sources) > 1)
                    logger.info("step %d/%d loss=%.4f%s lr=%.3e grad_norm=%.3f tokens/s=%.0f%s",
                                done, cfg.train.train_iters, metrics["loss"], extra, lr,
                                metrics["grad_norm"], metrics["tokens_per_s"],
                                "".join(f" {k}={metrics[k]:.3f}" for k in
                                        ("mfu_bf16_peak", "mfu_fp8_peak") if k in metrics))
            history.append(metrics)
            bar.update(1)
            if on_step is not None:
                on_step(done, metrics)
            writer.poll()  # completes background saves every rank has written (a collective)
            interval = cfg.checkpoint.save_interval
            if done in saves or (interval and done % interval == 0):
                meta = schedule.metadata(done, tokens_seen=done * tokens_per_step)
                common = {"step": done, "schedule": meta.to_dict(), "loader": loader.state_dict(),
                          "fraction": done / cfg.train.train_iters, ckpt.KEPT: done in saves,
                          "config": config_to_dict(cfg)}
                with synced_parameters(state.model):
                    writer.save(ckpt_dir / ckpt.step_dir_name(done), state.model, state.optimizer,
                                common, on_done=lambda path, done=done: saved(path, done))
        writer.finish()
    except BaseException:
        writer.abandon()  # this rank only: its peers may never reach a collective finish()
        raise
    finally:
        seconds = bar.close()
    if rank == 0 and start < cfg.train.train_iters:
        logger.info("trained steps %d-%d in %.1f s; metrics in %s", start + 1,
                    cfg.train.train_iters, seconds, out / "metrics.jsonl")
    elif rank == 0:
        logger.info("nothing to train: the run is at step %d of %d", start, cfg.train.train_iters)
    if sink is not None:
        sink.close()
    return history
