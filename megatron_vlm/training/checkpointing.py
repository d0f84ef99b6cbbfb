"""Checkpoints: megatron-core distributed checkpoints of the whole training state.

A checkpoint directory ``OUTPUT_DIR/checkpoints/step_0000123`` holds, in one
``dist_checkpointing`` save: the model (resharded on load to any TP/PP/DP layout), the
optimizer state (the plain optimizer's to any layout, the distributed optimizer's to any DP
size), the RNG states of each (pipeline, tensor) rank, and a ``common`` dict with the step, the
schedule metadata, the loader state (global: batches consumed), the resolved config and the
layout it was saved at. Writes are atomic: everything goes to ``NAME.tmp`` and is renamed once
every rank has finished, and the ``latest`` pointer file is replaced atomically after that, so
a crash during a write never leaves a checkpoint that looks complete. :class:`CheckpointWriter`
also writes in the background (megatron-core's asynchronous save) and completes the checkpoint
later.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException

from megatron_vlm.fsutil import fsync_dir, write_text_atomic
from megatron_vlm.lifecycle import start_write_results_manager, stop_write_results_manager
from megatron_vlm.training.checkpoint_checks import check_checkpoint_files, check_loaded_keys
# The names of a checkpoint's files, also read from here (ckpt.COMMON, ckpt.step_dir_name).
from megatron_vlm.training.checkpoint_names import (  # noqa: F401
    COMMON,
    LATEST,
    STEP_DIR,
    step_dir_name,
)

logger = logging.getLogger("megatron_vlm")

KEPT = "kept"  # common.json: a fraction checkpoint, never pruned
LAYOUT = "layout"  # common-dict key: the layout a checkpoint with RNG states was saved at
OPTIMIZER_SHARDING = "optimizer_sharding"  # common-dict key: the distributed optimizer's format
# The distributed optimizer's checkpoint format (megatron-core's `distrib_optim_sharding_type`).
# megatron-core 0.16.1's default, fully_sharded_model_space, refuses to save at all
# ("flattened_range is not supported"); dp_reshardable (Megatron-LM's default) writes each rank's
# buckets in parallel with no gather and loads at any DP size, not at another TP/PP size
# (load_checkpoint says so); fully_reshardable would gather the whole state at every save.
# Recorded with each checkpoint and passed back on load.
DIST_OPTIMIZER_SHARDING = "dp_reshardable"
# The RNG shards' names in a checkpoint's torch_dist metadata: rng_state/shard_<offsets>_<shape>.
_RNG_SHARD = re.compile(r"^rng_state/shard_([\d.]+)_([\d.]+)$")


def unwrap(model):
    """The VLM module inside DDP / Float16 wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def parallel_layout() -> dict:
    """This run's layout as a checkpoint records it."""
    return {"tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
            "data_parallel": parallel_state.get_data_parallel_world_size(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1}


def _describe(layout: dict) -> str:
    world = f", world {layout['world_size']}" if layout.get("world_size") else ""
    return (f"TP={layout['tensor_parallel']} PP={layout['pipeline_parallel']} "
            f"DP={layout['data_parallel']}{world}")


def _rng_sharded_object(keyed_by_dp: bool = False) -> ShardedObject:
    """This rank's RNG states, one element of a (PP, TP) grid.

    Data-parallel ranks hold equal states (the seed depends on the pipeline rank alone, and
    every DP rank draws the same numbers), so they are replicas of one element: DP rank 0
    writes it and any DP size reads it. ``keyed_by_dp`` is the earlier (PP, TP, DP) grid, one
    element per rank, which reads back only at the DP size it was written at.
    """
    from megatron.core import tensor_parallel

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    shape = (parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_tensor_model_parallel_world_size())
    offset = (parallel_state.get_pipeline_model_parallel_rank(),
              parallel_state.get_tensor_model_parallel_rank())
    dp_size, dp_rank = (parallel_state.get_data_parallel_world_size(),
                        parallel_state.get_data_parallel_rank())
    if keyed_by_dp:
        return ShardedObject("rng_state", state, (*shape, dp_size), (*offset, dp_rank),
                             replica_id=0)
    return ShardedObject("rng_state", state, shape, offset, replica_id=dp_rank)


def _set_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return any(isinstance(part, DistributedOptimizer) for part in parts)


def _allocate_distributed_optimizer_state(optimizer) -> None:
    """Gives a fresh distributed optimizer's torch Adam its state tensors before a load.

    Without Transformer Engine or Apex, megatron-core 0.16.1's DistributedOptimizer wraps torch
    Adam and reads a common "step" from its per-parameter state while building the state dict to
    load into; a fresh optimizer has no state, and the read fails. Zero state is what Adam
    starts from; the load overwrites it (the step: :func:`_restore_adam_steps`).
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for part in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(part, "optimizer", None)
        if not isinstance(part, distrib_optimizer.DistributedOptimizer) or inner.state:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param] = {"step": torch.tensor(0.0),
                                      "exp_avg": torch.zeros_like(param),
                                      "exp_avg_sq": torch.zeros_like(param)}


def _restore_adam_steps(optimizer) -> None:
    """Gives each parameter of a loaded distributed optimizer its own, saved Adam step.

    Without Transformer Engine or Apex (torch Adam, a step tensor per parameter), megatron-core
    0.16.1 saves the step with the parameter groups; its load gives every parameter one shared
    step tensor (which Adam then advances once per parameter each step) and copies the load
    template's step (this process's) into it.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for part in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        if not isinstance(part, distrib_optimizer.DistributedOptimizer):
            continue
        for group in part.optimizer.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                part.optimizer.state[param]["step"] = torch.tensor(float(group["step"]))


def _sharded_state(model, optimizer, with_optimizer: bool, rng: Optional[str], is_loading: bool,
                   prefix: str = "", optimizer_sharding: str = DIST_OPTIMIZER_SHARDING) -> dict:
    """The state dict to save or load; ``rng`` is None (no RNG states), "current" or "legacy"
    (the (PP, TP, DP)-keyed RNG states of earlier checkpoints)."""
    model_sd = {k: v for k, v in unwrap(model).sharded_state_dict().items() if k.startswith(prefix)}
    state: dict[str, Any] = {"model": model_sd}
    if with_optimizer:
        if is_loading:
            _allocate_distributed_optimizer_state(optimizer)
        # The plain optimizer ignores the metadata; the distributed one reads its format there.
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": optimizer_sharding})
    if rng is not None:
        state["rng_state"] = _rng_sharded_object(keyed_by_dp=rng == "legacy")
    return state


class CheckpointWriter:
    """Writes checkpoints, synchronously or in the background (every rank must call each method
    in the same order).

    ``async_save=False``: :meth:`save` writes the checkpoint, completes it (below) and returns.
    ``async_save=True``: :meth:`save` snapshots the state, starts megatron-core's background
    writer and returns; the checkpoint is completed by a later :meth:`poll` (once every rank's
    writer has finished) or :meth:`finish` (waits). Completing a checkpoint: ``common.json``
    into ``NAME.tmp``, rename to ``NAME``, fsync, point ``latest`` at it, then ``on_done(NAME)``
    on every rank. Until then the checkpoint does not look complete to
    :func:`resolve_checkpoint`. At most one save is in flight: a new :meth:`save` first waits
    for the previous one and completes it.

    megatron-core's write-results manager (:func:`start_write_results_manager`) is started at
    the first save and kept until :meth:`finish` or :meth:`abandon`: a fresh one imports torch
    to read the first result, which made every save of a 4 MB checkpoint take 5 to 15 s on a
    busy 2-core machine (0.2 to 0.6 s with the manager kept), paid again at each interval save.
    """

    def __init__(self, async_save: bool = False):
        self.async_save = async_save
        self._queue = None  # megatron's AsyncCallsQueue, created at the first async save
        self._pending: list[Path] = []  # written in the background, not complete yet
        if async_save:
            atexit.register(self.abandon)

    def save(self, directory: str | Path, model, optimizer, common: dict,
             update_latest: bool = True,
             on_done: Optional[Callable[[Path], None]] = None) -> Path:
        """Saves the training state to ``directory``; returns ``directory``.

        ``optimizer=None`` saves the weights only, without RNG states (e.g. a converted
        checkpoint); ``update_latest`` points the parent directory's ``latest`` file at it.
        """
        self._complete(blocking=True)
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        if is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        full = optimizer is not None
        if full:  # the layout decides how the RNG states load; weights only load anywhere
            common = dict(common, **{LAYOUT: parallel_layout()})
            if _is_distributed_optimizer(optimizer):
                common[OPTIMIZER_SHARDING] = DIST_OPTIMIZER_SHARDING
        # Serialized now: the caller may change its dicts while a background write runs.
        text = json.dumps(common, indent=1, sort_keys=True, default=str) + "\n"
        state = _sharded_state(model, optimizer, full, "current" if full else None, False)
        start_write_results_manager()

        def complete() -> None:  # on every rank, once every rank's data is on disk
            _barrier()
            if is_rank0():
                write_text_atomic(tmp / COMMON, text)
                if directory.exists():  # a checkpoint of the same step from an earlier run
                    shutil.rmtree(directory)
                os.replace(tmp, directory)
                fsync_dir(directory.parent)
                if update_latest:
                    write_text_atomic(directory.parent / LATEST, directory.name)
            _barrier()
            if directory in self._pending:
                self._pending.remove(directory)
            if on_done is not None:
                on_done(directory)

        if not self.async_save:
            dist_checkpointing.save(state, str(tmp))
            complete()
            return directory
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
        # After megatron's own finalization (the torch_dist metadata, metadata.json).
        request.add_finalize_fn(complete)
        if self._queue is None:
            self._queue = AsyncCallsQueue()
        self._pending.append(directory)
        self._queue.schedule_async_request(request)
        return directory

    def poll(self) -> list[Path]:
        """Completes the background saves every rank has finished writing, without waiting;
        returns them. A collective while a save is in flight: call it on every rank, e.g.
        once per step."""
        return self._complete(blocking=False)

    def finish(self) -> list[Path]:
        """Waits for the background saves and completes them; returns them (a collective).
        Call it at the end of training. Leaves no writer process running."""
        try:
            return self._complete(blocking=True)
        finally:  # also when a rank's write failed (raised here on every rank)
            self._stop_writers()

    def abandon(self) -> None:
        """Stops this rank's background writer and leaves its checkpoint incomplete
        (``NAME.tmp``), with no collective: for an error on one rank, whose peers may never
        call :meth:`finish`. Also runs at interpreter exit. The writer is killed, not waited
        for: what it would write can never complete, and after a peer's death the wait only
        delays this rank's report (torchrun may stop it first)."""
        if self._pending:
            logger.warning("checkpoint %s was being written in the background and never "
                           "completed; it stays incomplete as %s", self._pending[0],
                           self._pending[0].name + ".tmp")
        self._stop_writers(abort=True)

    @property
    def pending(self) -> list[Path]:
        """Checkpoints being written in the background (not complete yet)."""
        return list(self._pending)

    def _stop_writers(self, abort: bool = False) -> None:
        """Joins (or with ``abort`` kills) this rank's writer processes, with no collective,
        and stops the results manager."""
        if self._queue is not None:
            for call in list(self._queue.async_calls):
                call.async_caller.close(abort=abort)
            self._queue = None
        self._pending = []
        stop_write_results_manager()

    def _complete(self, blocking: bool) -> list[Path]:
        if self._queue is None or not self._pending:
            return []
        before = list(self._pending)
        self._queue.maybe_finalize_async_calls(blocking=blocking)
        return [p for p in before if p not in self._pending]


def save_checkpoint(directory: str | Path, model, optimizer, common: dict,
                    update_latest: bool = True) -> Path:
    """Saves the training state to ``directory`` atomically (every rank must call it).

    ``optimizer=None`` saves the weights only, without RNG states (e.g. a converted
    checkpoint); ``update_latest`` points the parent directory's ``latest`` file at it.
    """
    writer = CheckpointWriter(async_save=False)
    try:
        return writer.save(directory, model, optimizer, common, update_latest=update_latest)
    finally:
        writer.finish()  # no write in flight: this only stops the write-results manager


PARTS = {"all": "", "decoder": "language_model."}


def load_checkpoint(directory: str | Path, model, optimizer=None, with_rng: bool = True,
                    parts: str = "all") -> dict:
    """Loads a checkpoint saved at any TP/PP/DP layout; returns its ``common`` dict.

    ``optimizer=None`` loads the weights only (e.g. starting a new stage from a text run);
    ``parts="decoder"`` loads the language model only (the other parts keep their weights).
    RNG states (``with_rng``) are restored when the checkpoint was saved at this run's TP and
    PP sizes (any DP size); at another TP or PP size they are skipped with a warning.
    """
    if parts not in PARTS:
        raise ValueError(f"parts={parts!r} is not one of {', '.join(PARTS)}")
    if parts != "all" and optimizer is not None:
        raise ValueError("a partial load cannot restore the optimizer state")
    directory = resolve_checkpoint(directory)
    common = read_common(directory)
    check_checkpoint_files(directory)
    if optimizer is not None and common.get("contents") == ["model"]:
        raise ValueError(f"checkpoint {directory} holds weights only (e.g. a converted one): set "
                         "checkpoint.load_optimizer=false")
    prefix = PARTS[parts]
    if optimizer is not None:
        check_optimizer_fits(directory, common, _is_distributed_optimizer(optimizer),
                             parallel_layout())
    rng = _rng_to_load(directory, common) if with_rng else None
    sharding = common.get(OPTIMIZER_SHARDING, DIST_OPTIMIZER_SHARDING)
    try:
        state = dist_checkpointing.load(
            _sharded_state(model, optimizer, optimizer is not None, rng, True, prefix, sharding),
            str(directory))
    except (Exception, CheckpointException) as err:
        # torch's CheckpointException (a BaseException) wraps megatron's KeyError naming the
        # first model key the checkpoint lacks.
        absent = re.search(r"([\w./]+) from model not in state dict", str(err))
        mismatch = re.search(r"Global shape mismatch for loaded \((.*?)\) and expected "
                             r"\((.*?)\) tensor for key (\S+)", str(err))
        if mismatch is not None:
            raise ValueError(f"checkpoint {directory} does not fit the model: its "
                             f"{mismatch.group(3)} is {mismatch.group(1)}, the config builds "
                             f"{mismatch.group(2)}") from None
        if absent is None:
            raise
        hint = "" if parts != "all" else " (checkpoint.load_parts=decoder loads the language model only)"
        raise ValueError(f"checkpoint {directory} does not fit the model: it has no "
                         f"{absent.group(1)}{hint}") from None
    check_loaded_keys(directory, *unwrap(model).load_state_dict(state["model"], strict=False),
                      prefix)
    if optimizer is not None:
        # A state copy, not a computation: megatron-core's dp_reshardable load copies into
        # main parameters that may be views of the model's (autograd refuses that in grad mode).
        with torch.no_grad():
            optimizer.load_state_dict(state["optimizer"])
        _restore_adam_steps(optimizer)
    if rng is not None:
        _set_rng(state["rng_state"])
    return common


def check_optimizer_fits(directory, common: dict, distributed: bool, here: dict) -> None:
    """Stops with one clear line when the checkpoint's optimizer state cannot load into this
    run's optimizer (checkpoints that record their layout only)."""
    saved = common.get(LAYOUT)
    if saved is None:
        return
    sharding = common.get(OPTIMIZER_SHARDING)
    if (sharding is not None) != distributed:
        raise ValueError(f"checkpoint {directory} was saved with "
                         f"parallel.use_distributed_optimizer={str(sharding is not None).lower()}; "
                         f"this run has {str(distributed).lower()} (set it as the checkpoint was "
                         "saved)")
    if sharding == "dp_reshardable" and any(
            saved.get(k) != here[k] for k in ("tensor_parallel", "pipeline_parallel")):
        raise ValueError(
            f"checkpoint {directory} holds the distributed optimizer's state in megatron-core's "
            f"dp_reshardable format, which loads at another DP size but not at another TP or PP "
            f"size: it was saved at {_describe(saved)}, this run is {_describe(here)}. Resume at "
            f"its TP and PP, or start from its weights (checkpoint.load={directory} "
            f"checkpoint.load_optimizer=false)")


def _rng_to_load(directory: Path, common: dict) -> Optional[str]:
    """How to read the checkpoint's RNG states at this run's layout: "current", "legacy"
    (keyed by DP rank, written before the layout was recorded) or None (skipped, with one
    warning line naming both layouts)."""
    here = parallel_layout()
    saved = common.get(LAYOUT)
    kind = "current"
    if saved is None:  # written before layouts were recorded: the RNG grid's shape tells
        shape = _legacy_rng_shape(directory)
        if shape is None:
            if is_rank0():
                logger.warning("checkpoint %s holds no RNG states; they are not restored",
                               directory)
            return None
        saved = dict(zip(("pipeline_parallel", "tensor_parallel", "data_parallel"), shape))
        # That grid reads back only at the DP size it was written at.
        kind = "legacy" if saved["data_parallel"] == here["data_parallel"] else None
    same = all(saved.get(k) == here[k] for k in ("tensor_parallel", "pipeline_parallel"))
    if same and kind is not None:
        return kind
    if is_rank0():
        logger.warning("checkpoint %s was saved at %s; this run is %s: its RNG states are not "
                       "restored (the model and optimizer state are resharded)", directory,
                       _describe(saved), _describe(here))
    return None


def _legacy_rng_shape(directory: Path) -> Optional[tuple[int, ...]]:
    """The (PP, TP, DP) shape of the RNG grid in a checkpoint's torch_dist metadata, or None
    when it holds no RNG states."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        keys = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    except (OSError, ValueError) as err:
        raise ValueError(f"checkpoint {directory}: cannot read its torch_dist metadata "
                         f"({err})") from None
    for key in keys:
        match = _RNG_SHARD.match(key)
        if match:
            return tuple(int(n) for n in match.group(2).split("."))
    return None


# qk_norm: without it the checkpoint's q/k gains would be dropped silently (no shape differs).
DECODER_SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                 "ffn_hidden_size", "qk_norm")


def check_decoder_matches(common: dict, decoder_cfg, directory) -> None:
    """Stops when a checkpoint's decoder shape differs from the run's, with one line listing
    every field that differs (the checkpoint's value, then this run's): megatron-core would load
    a different vocabulary size silently (dropping or zero-filling rows), and another width
    fails deep inside its loader. ``ffn_hidden_size`` is compared resolved (null: the SwiGLU
    rule from hidden_size), so null on one side and the same width on the other match."""
    saved = (common.get("config") or {}).get("model", {}).get("decoder")
    if not saved:
        return
    differ = []
    for key in DECODER_SHAPE:
        theirs, ours = saved.get(key), getattr(decoder_cfg, key)
        if key == "ffn_hidden_size":
            if theirs is None and isinstance(saved.get("hidden_size"), int):
                theirs = type(decoder_cfg).resolved_ffn_hidden_size(
                    SimpleNamespace(ffn_hidden_size=None, hidden_size=saved["hidden_size"]))
            ours = decoder_cfg.resolved_ffn_hidden_size()
        if theirs is not None and theirs != ours:
            differ.append(f"model.decoder.{key}={theirs} but this run has {ours}")
    if differ:
        raise ValueError(f"checkpoint {directory} was saved with another model shape: "
                         f"{'; '.join(differ)}")


def read_common(directory: str | Path) -> dict:
    """The step, schedule metadata, loader state and config stored with a checkpoint."""
    directory = resolve_checkpoint(directory)
    path = directory / COMMON
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a complete checkpoint ({COMMON} missing)")
    return json.loads(path.read_text())


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint path or a directory of checkpoints (its
    ``latest``); FileNotFoundError naming the path when there is none."""
    path = Path(path)
    if (path / COMMON).is_file():
        return path
    if (path / LATEST).is_file():
        return resolve_checkpoint(path / (path / LATEST).read_text().strip())
    if (path / "checkpoints").is_dir():
        return resolve_checkpoint(path / "checkpoints")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    raise FileNotFoundError(f"{path} holds no complete checkpoint (no {COMMON} and no {LATEST})")


def latest_checkpoint(directory: str | Path) -> Optional[Path]:
    """The checkpoint a run in ``directory`` resumes from: the one ``latest`` names, or None
    when there is none at all. Should ``latest`` be missing, or name a checkpoint that is
    missing or incomplete, the newest complete step checkpoint instead, with a warning naming
    both (starting again from step 0 would overwrite it); with no complete checkpoint left but
    a ``latest``, FileNotFoundError naming it."""
    directory = Path(directory)
    try:
        return resolve_checkpoint(directory)
    except FileNotFoundError:
        pass
    complete = sorted(p for p in directory.iterdir() if STEP_DIR.match(p.name)
                      and (p / COMMON).is_file()) if directory.is_dir() else []
    pointer = directory / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else None
    if complete:
        why = (f"{pointer} names {named!r}, which is missing or incomplete" if named is not None
               else f"{pointer} is missing")
        logger.warning("checkpoint: %s; resuming from the newest complete checkpoint, %s", why,
                       complete[-1])
        return complete[-1]
    if named is not None:
        raise FileNotFoundError(f"{pointer} names {named!r}, which is missing or incomplete, and "
                                f"{directory} holds no complete checkpoint to resume from; "
                                f"remove {pointer} to start again from step 0")
    return None


def prune_checkpoints(directory: str | Path, keep_last: int, keep: set[str]) -> None:
    """Keeps every fraction checkpoint and the ``keep_last`` newest interval checkpoints, and
    deletes the other step checkpoints and the leftovers of interrupted writes (``*.tmp``).

    A fraction checkpoint is one named in ``keep`` (this run's fraction steps) or saved as one
    (``"kept": true`` in its common.json: a run with other fractions, e.g. another
    train.train_iters, never deletes them); every other step checkpoint is an interval one.
    Fraction checkpoints never count against ``keep_last``: a run saving every 10 steps with a
    fraction at step 24 keeps 20 and 30 with keep_last=2, and 24."""
    if not is_rank0():
        return
    directory = Path(directory)
    interval = [p for p in sorted(directory.iterdir()) if STEP_DIR.match(p.name)
                and p.name not in keep and not _saved_to_keep(p)]
    for old in interval[:max(len(interval) - keep_last, 0)]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in directory.glob("*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def _saved_to_keep(directory: Path) -> bool:
    try:
        return bool(json.loads((directory / COMMON).read_text()).get(KEPT))
    except (OSError, ValueError):
        return False  # incomplete or unreadable: an ordinary candidate


# Kept for the parallel self-check: weights only, no optimizer, no RNG, no common file.
def save_model(model, directory: str | Path) -> None:
    """Saves the model's sharded state dict; every rank of the job must call this."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    start_write_results_manager()
    dist_checkpointing.save(unwrap(model).sharded_state_dict(), str(directory))
    stop_write_results_manager()


def load_model(model, directory: str | Path) -> None:
    """Loads weights saved by :func:`save_model` at any TP/PP layout into ``model`` (every key
    but TE's ``_extra_state``, see :func:`check_loaded_keys`)."""
    directory = Path(directory)
    if not (directory / "metadata.json").exists():
        raise FileNotFoundError(f"no distributed checkpoint at {directory} (metadata.json missing)")
    inner = unwrap(model)
    state = dist_checkpointing.load(inner.sharded_state_dict(), str(directory))
    check_loaded_keys(directory, *inner.load_state_dict(state, strict=False))
