"""The training loop shared by pretrain_vlm.py and finetune_vlm.py, top to bottom.

start: config checks that can fail early -> process groups -> the checkpoint to resume from (the
latest of this run) -> data (paths, manifests, shards, the blend index) -> run directory ->
model, DDP, optimizer -> resume, or start from ``checkpoint.load``
loop:  LR from the schedule -> one train step (megatron schedules) -> log -> maybe save

A start that fails removes what it created in the run directory. tokens/s (and TFLOP/s, MFU)
count the train steps only: checkpoint saves and the loader's start-up are timed apart
(docs/operations.md); real_tokens/s counts the non-padding positions among them, from the
run's token ledger, which the loader counts on the host and every checkpoint saves along with
the checkpoint's lineage (training/ledger.py, training/lineage.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
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
    """(next_step function, loader) for ``data.kind``. The loader has ``state_dict()``,
    ``epoch_tokens`` (real tokens of one epoch per source) and ``last_tally`` (what the global
    batch last returned holds of each source, counted on the host)."""
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
    from megatron_vlm.data.batch_tally import RANDOM_SOURCE, random_batch_tally

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
        next_random.last_tally = random_batch_tally(batch)  # the whole global batch, on the host
        mine = slice_rows(batch, dp_rank * rows, (dp_rank + 1) * rows)
        check_batch(mine, enc.num_image_tokens, where=f"random global batch {consumed - 1}")
        return split_microbatches(mine, train.micro_batch_size)

    next_random.state_dict = lambda: {"consumed_global_batches": consumed}
    next_random.epoch_tokens = {RANDOM_SOURCE: None}  # random batches never run out
    next_random.last_tally = {}
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


class StepClock:
    """Seconds of training between two log steps: the wall time less what the loop spent
    apart from the train steps (waiting for checkpoint saves, the loader's start-up), which is
    counted by kind and reported apart. Steady-state waits for data stay in: a loader that
    cannot keep up is part of what the steps cost."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._last = time.perf_counter()
        self._apart: dict[str, float] = {}

    @contextlib.contextmanager
    def apart(self, what: str, wait_for_device: bool = True):
        # On a GPU the host runs ahead of the device: wait for the queued steps first, so that
        # their time stays theirs (a save waits for them anyway). ``wait_for_device=False``
        # where nothing else would wait: polling an async save in flight happens every step,
        # and a wait there would stall the host's run-ahead for the whole save.
        if self.cuda and wait_for_device:
            torch.cuda.synchronize()
        began = time.perf_counter()
        try:
            yield
        finally:
            self._apart[what] = self._apart.get(what, 0.0) + time.perf_counter() - began

    def lap(self) -> tuple[float, dict[str, float]]:
        """(seconds of training since the last lap, seconds apart by kind); starts the next."""
        now = time.perf_counter()
        apart, self._apart = self._apart, {}
        seconds = now - self._last - sum(apart.values())
        self._last = now
        return seconds, apart


@dataclass
class _Started:
    """What the start of a run hands to its loop."""

    schedule: object
    info: object
    rank: int
    world: int
    state: object
    start: int
    next_step: Callable[[], list]
    loader: object
    sink: object
    features: object  # the model's resolved performance features
    ledger: object
    """The run's token ledger (:class:`~megatron_vlm.training.ledger.TokenLedger`), continued
    from the checkpoint resumed from."""
    lineage: object
    """What every checkpoint of the run records of its lineage
    (:class:`~megatron_vlm.training.lineage.RunLineage`)."""


def train(cfg, on_step: Optional[Callable[[int, dict], None]] = None) -> list[dict]:
    """Runs (or resumes) the training described by ``cfg``; returns the per-step metrics of
    this invocation."""
    out = Path(cfg.output_dir)
    before = set(out.iterdir()) if out.is_dir() else None
    try:
        started = _start(cfg, out)
    except BaseException:
        if int(os.environ.get("RANK", 0)) == 0:
            _remove_what_the_start_made(out, before)
        raise
    return _train_steps(cfg, out, started, on_step)


def _remove_what_the_start_made(out: Path, before: Optional[set]) -> None:
    """After a start that failed (bad input, Ctrl-C): the run directory if the start made it,
    else the entries it added, so that nothing is left to mistake for a run. What was there
    (a resumed run's checkpoints and metrics) stays; ``before`` lists it (None: no directory)."""
    if not out.is_dir():
        return
    for path in [out] if before is None else set(out.iterdir()) - before:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def where_it_stopped(cfg, last_step: Optional[int], command: str) -> str:
    """Where an interrupted run stands and how to go on, for its one line: the last completed
    step (None: during the start), the checkpoint the same ``command`` resumes from, if any."""
    from megatron_vlm.training import checkpointing as ckpt

    at = (f"after step {last_step} of {cfg.train.train_iters}" if last_step is not None
          else "during the start")
    try:  # what a rerun resumes from, found as the rerun will find it
        latest = ckpt.latest_checkpoint(Path(cfg.output_dir) / "checkpoints")
        step = ckpt.read_common(latest)["step"] if latest is not None else None
    except (OSError, ValueError, KeyError):  # none usable: the rerun says why
        latest = None
    if latest is None:
        return f"{at}, with no checkpoint saved; to start it again, run the same command: {command}"
    if not cfg.checkpoint.resume:
        return (f"{at}; its last checkpoint is {latest} (step {step}); to resume from it, run "
                f"the same command with checkpoint.resume=true: {command}")
    return (f"{at}; its last checkpoint is {latest} (step {step}); to resume from it, run the "
            f"same command: {command}")


def _start(cfg, out: Path) -> _Started:
    """Every check that can fail before the first step, cheapest first, then the model."""
    from megatron.core import parallel_state

    from megatron_vlm.config import config_summary, config_to_dict, dump_config
    from megatron_vlm.model.build import build_model
    from megatron_vlm.runtime import initialize
    from megatron_vlm.runtime.distributed import init_process_group_only
    from megatron_vlm.training import checkpointing as ckpt
    from megatron_vlm.training.checkpoint_checks import check_resume_schedule
    from megatron_vlm.training.grad_finalize import GRAD_NORM_PATH
    from megatron_vlm.training.ledger import TokenLedger
    from megatron_vlm.training.lineage import RunLineage
    from megatron_vlm.training.metrics_log import MetricsLog
    from megatron_vlm.training.step import setup_training

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
    ckpt_dir = out / "checkpoints"
    resume = ckpt.latest_checkpoint(ckpt_dir) if cfg.checkpoint.resume else None
    resume_common = None
    if resume is not None:  # before any work: another model or schedule stops here
        resume_common = ckpt.read_common(resume)
        ckpt.check_decoder_matches(resume_common, cfg.model.decoder, resume)
        check_resume_schedule(resume_common, config_to_dict(cfg), resume,
                              cfg.checkpoint.allow_schedule_change)
    # The data before the model: a missing path, manifest or shard stops the run in seconds,
    # not after the model is built (the loader's workers start at the first step).
    next_step, loader = make_batches(cfg, parallel_state.get_data_parallel_rank(), dp,
                                     resume_common["loader"] if resume_common else None)
    ledger = TokenLedger(cfg.train.seq_length, dict(loader.epoch_tokens))
    if resume_common is not None:
        ledger.resume_from(resume_common.get("ledger"), resume_common["step"],
                           str(resume / ckpt.COMMON))
    index = getattr(loader, "index", None)  # the blend index, whose key names the data
    lineage = RunLineage.of_run(cfg, index.cache_path if index is not None else None)
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

    start = 0
    if resume is not None:
        ckpt.load_checkpoint(resume, state.model, state.optimizer)
        start = resume_common["step"]
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
    sink = (MetricsLog(out, config_to_dict(cfg), cfg.name, cfg.train.wandb_project)
            if rank == 0 else None)
    return _Started(schedule, info, rank, world, state, start, next_step, loader, sink,
                    model.features, ledger, lineage)


def _train_steps(cfg, out: Path, run: _Started, on_step) -> list[dict]:
    """The loop: LR from the schedule, one train step, log, maybe save."""
    from megatron_vlm.config import config_to_dict
    from megatron_vlm.progress import Progress
    from megatron_vlm.training import checkpointing as ckpt
    from megatron_vlm.training import flops
    from megatron_vlm.training.schedule import apply_lr, checkpoint_steps
    from megatron_vlm.training.step import summarize_losses, train_step

    schedule, state, rank, start, sink = run.schedule, run.state, run.rank, run.start, run.sink
    ledger = run.ledger
    ckpt_dir = out / "checkpoints"
    saves = checkpoint_steps(cfg.train.train_iters, cfg.checkpoint.save_fractions) \
        if cfg.checkpoint.save_fractions else {}
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
    # MFU against the dense bf16 peak, and for FP8 runs also against the FP8 peak, each named.
    peaks = flops.device_peaks() if run.info.device.type == "cuda" else None
    if peaks is not None and rank == 0:
        logger.info("MFU peaks: %s", peaks.describe())

    history: list[dict] = []
    writer = ckpt.CheckpointWriter(async_save=run.features.async_save)
    keep = {ckpt.step_dir_name(s) for s in saves}

    def saved(path: Path, done: int, began: float) -> None:  # every rank, once complete
        ckpt.prune_checkpoints(ckpt_dir, cfg.checkpoint.keep_last, keep)
        if rank == 0:
            logger.info("saved %s (%.0f%% of the schedule) in %.1f s", path,
                        100 * done / cfg.train.train_iters, time.perf_counter() - began)

    # A bar on a terminal only: each log step's line already says where the run is, so a piped
    # log gets those lines alone, and the loss is printed once, in them.
    bar = Progress(cfg.train.train_iters, "train", "step", enabled=rank == 0, initial=start,
                   lines=False)
    # Losses stay on the device between log steps (summed, so a log line reports the per-token
    # mean over its interval); reading them is the only wait for the GPU the loop adds.
    pending, last_logged, interval_flops = None, start, 0.0
    real_at_last_log = ledger.real_tokens
    clock = StepClock(run.info.device)
    try:
        for step in range(start, cfg.train.train_iters):
            lr = schedule.lr(step)
            apply_lr(state.optimizer, lr)
            # The first batch waits for the loader's start-up (its workers, their first
            # batches): not a step's cost.
            with clock.apart("loader_startup") if step == start else contextlib.nullcontext():
                microbatches = run.next_step()
            ledger.add(run.loader.last_tally)  # counted by the loader on the host
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
                seconds, apart = clock.lap()
                steps = done - last_logged
                flops_per_s_per_gpu = interval_flops / seconds / run.world
                metrics.update(tokens_per_s=tokens_per_step * steps / seconds,
                               real_tokens_per_s=(ledger.real_tokens - real_at_last_log) / seconds,
                               tflops=flops_per_s_per_gpu / 1e12)
                metrics.update(ledger.metrics())
                metrics.update({f"{what}_s": s for what, s in apart.items()})
                if peaks is not None:
                    metrics.update({k: v for k, v in flops.mfu_by_peak(
                        flops_per_s_per_gpu, peaks, fp8=bool(cfg.train.fp8)).items()
                        if v is not None})
                pending, last_logged, interval_flops = None, done, 0.0
                real_at_last_log = ledger.real_tokens
                if sink is not None:
                    sink.log(done, metrics)
                if rank == 0:
                    # Per-source losses when there are several (one source is the loss itself).
                    sources = [k for k in metrics if k.startswith("loss/")]
                    extra = "".join(f" {k}={metrics[k]:.4f}" for k in sources
                                    if len(sources) > 1)
                    logger.info("step %d/%d loss=%.4f%s lr=%.3e grad_norm=%.3f tokens/s=%.0f "
                                "real_tokens/s=%.0f%s",
                                done, cfg.train.train_iters, metrics["loss"], extra, lr,
                                metrics["grad_norm"], metrics["tokens_per_s"],
                                metrics["real_tokens_per_s"],
                                "".join(f" {k}={metrics[k]:.3f}" for k in
                                        ("mfu_bf16_peak", "mfu_fp8_peak") if k in metrics))
            history.append(metrics)
            bar.update(1)
            if on_step is not None:
                on_step(done, metrics)
            interval = cfg.checkpoint.save_interval
            saving = done in saves or (interval and done % interval == 0)
            # Checkpoint work is timed apart from the steps (tokens/s leaves it out).
            checkpointing = (clock.apart("checkpoint", wait_for_device=saving)
                             if saving or writer.pending else contextlib.nullcontext())
            with checkpointing:
                writer.poll()  # completes background saves every rank has written (a collective)
                if saving:
                    meta = schedule.metadata(done, tokens_seen=done * tokens_per_step)
                    common = {"step": done, "schedule": meta.to_dict(),
                              "loader": run.loader.state_dict(),
                              "fraction": done / cfg.train.train_iters, ckpt.KEPT: done in saves,
                              "config": config_to_dict(cfg), "ledger": ledger.state_dict()}
                    # What made this checkpoint, the chain of its parents included.
                    common["lineage"] = run.lineage.record(done, common["fraction"],
                                                           common["ledger"])
                    began = time.perf_counter()
                    with synced_parameters(state.model):
                        writer.save(ckpt_dir / ckpt.step_dir_name(done), state.model,
                                    state.optimizer, common,
                                    on_done=lambda path, done=done, began=began:
                                    saved(path, done, began))
        writer.finish()
    except BaseException:
        writer.abandon()  # this rank only: its peers may never reach a collective finish()
        raise
    finally:
        seconds = bar.close()
        if sink is not None:  # also on Ctrl-C: TensorBoard and W&B keep what was logged
            sink.close()
    if rank == 0 and start < cfg.train.train_iters:
        for line in ledger.table().splitlines():  # each a log line of its own, for piped logs
            logger.info("%s", line)
        logger.info("trained steps %d-%d in %.1f s; metrics in %s", start + 1,
                    cfg.train.train_iters, seconds, out / "metrics.jsonl")
    elif rank == 0:
        logger.info("nothing to train: the run is at step %d of %d", start, cfg.train.train_iters)
    return history
