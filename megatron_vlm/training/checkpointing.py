"""Checkpoints: megatron-core distributed checkpoints of the whole training state.

A checkpoint directory ``OUTPUT_DIR/checkpoints/step_0000123`` holds, in one
``dist_checkpointing`` save: the model (resharded on load to any TP/PP layout), the optimizer
state, every rank's RNG states, and a ``common`` dict with the step, the schedule metadata, the
loader state and the resolved config. Writes are atomic: everything goes to ``NAME.tmp`` and is
renamed once every rank has finished, and the ``latest`` pointer file is replaced atomically
after that, so a crash during a write never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException

from megatron_vlm.fsutil import fsync_dir, write_json_atomic, write_text_atomic

LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d{7})$")
COMMON = "common.json"


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


def _rng_sharded_object() -> ShardedObject:
    """This rank's RNG states, one element of a (PP, TP, DP) grid."""
    from megatron.core import tensor_parallel

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    pp, tp, dp = (parallel_state.get_pipeline_model_parallel_world_size(),
                  parallel_state.get_tensor_model_parallel_world_size(),
                  parallel_state.get_data_parallel_world_size())
    return ShardedObject("rng_state", state, (pp, tp, dp),
                         (parallel_state.get_pipeline_model_parallel_rank(),
                          parallel_state.get_tensor_model_parallel_rank(),
                          parallel_state.get_data_parallel_rank()), replica_id=0)


def _set_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(model, optimizer, with_optimizer: bool, with_rng: bool, is_loading: bool,
                   prefix: str = "") -> dict:
    model_sd = {k: v for k, v in unwrap(model).sharded_state_dict().items() if k.startswith(prefix)}
    state: dict[str, Any] = {"model": model_sd}
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    if with_rng:
        state["rng_state"] = _rng_sharded_object()
    return state


def save_checkpoint(directory: str | Path, model, optimizer, common: dict,
                    update_latest: bool = True) -> Path:
    """Saves the training state to ``directory`` atomically (every rank must call it).

    ``optimizer=None`` saves the weights only, without RNG states (e.g. a converted
    checkpoint); ``update_latest`` points the parent directory's ``latest`` file at it.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    full = optimizer is not None
    dist_checkpointing.save(_sharded_state(model, optimizer, full, full, False), str(tmp))
    _barrier()
    if is_rank0():
        write_json_atomic(tmp / COMMON, common, sort_keys=True, default=str)
        if directory.exists():  # a checkpoint of the same step from an earlier, resumed run
            shutil.rmtree(directory)
        os.replace(tmp, directory)
        fsync_dir(directory.parent)
        if update_latest:
            write_text_atomic(directory.parent / LATEST, directory.name)
    _barrier()
    return directory


PARTS = {"all": "", "decoder": "language_model."}


def load_checkpoint(directory: str | Path, model, optimizer=None, with_rng: bool = True,
                    parts: str = "all") -> dict:
    """Loads a checkpoint saved at any TP/PP layout; returns its ``common`` dict.

    ``optimizer=None`` loads the weights only (e.g. starting a new stage from a text run);
    ``parts="decoder"`` loads the language model only (the other parts keep their weights).
    """
    if parts not in PARTS:
        raise ValueError(f"parts={parts!r} is not one of {', '.join(PARTS)}")
    if parts != "all" and optimizer is not None:
        raise ValueError("a partial load cannot restore the optimizer state")
    directory = resolve_checkpoint(directory)
    common = read_common(directory)
    if optimizer is not None and common.get("contents") == ["model"]:
        raise ValueError(f"checkpoint {directory} holds weights only (e.g. a converted one): set "
                         "checkpoint.load_optimizer=false")
    prefix = PARTS[parts]
    try:
        state = dist_checkpointing.load(
            _sharded_state(model, optimizer, optimizer is not None, with_rng, True, prefix),
            str(directory))
    except (Exception, CheckpointException) as err:
        # torch's CheckpointException (a BaseException) wraps megatron's KeyError naming the
        # first model key the checkpoint lacks.
        absent = re.search(r"([\w./]+) from model not in state dict", str(err))
        if absent is None:
            raise
        hint = "" if parts != "all" else " (checkpoint.load_parts=decoder loads the language model only)"
        raise ValueError(f"checkpoint {directory} does not fit the model: it has no "
                         f"{absent.group(1)}{hint}") from None
    missing, unexpected = unwrap(model).load_state_dict(state["model"], strict=False)
    missing = [k for k in missing if k.startswith(prefix)]
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory} does not fit the model: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if with_rng:
        _set_rng(state["rng_state"])
    return common


DECODER_SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                 "ffn_hidden_size")


def check_decoder_matches(common: dict, decoder_cfg, directory) -> None:
    """Stops when a checkpoint's decoder shape differs from the run's: megatron-core would load
    a different vocabulary size silently (dropping or zero-filling rows)."""
    saved = (common.get("config") or {}).get("model", {}).get("decoder")
    if not saved:
        return
    for key in DECODER_SHAPE:
        if key in saved and saved[key] is not None and saved[key] != getattr(decoder_cfg, key):
            raise ValueError(f"checkpoint {directory} has model.decoder.{key}={saved[key]} but this "
                             f"run has {getattr(decoder_cfg, key)}")


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
    """The newest complete checkpoint under ``directory``, or None."""
    try:
        return resolve_checkpoint(directory)
    except FileNotFoundError:
        return None


def prune_checkpoints(directory: str | Path, keep_last: int, keep: set[str]) -> None:
    """Deletes all but the ``keep_last`` newest step checkpoints, except those named in ``keep``;
    leftovers of interrupted writes (``*.tmp``) go too."""
    if not is_rank0():
        return
    directory = Path(directory)
    steps = sorted(p for p in directory.iterdir() if STEP_DIR.match(p.name))
    for old in steps[:-keep_last] if keep_last else steps:
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in directory.glob("*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


# Kept for the parallel self-check: weights only, no optimizer, no RNG, no common file.
def save_model(model, directory: str | Path) -> None:
    """Saves the model's sharded state dict; every rank of the job must call this."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(unwrap(model).sharded_state_dict(), str(directory))


def load_model(model, directory: str | Path) -> None:
    """Loads weights saved by :func:`save_model` at any TP/PP layout into ``model`` (strict)."""
    directory = Path(directory)
    if not (directory / "metadata.json").exists():
        raise FileNotFoundError(f"no distributed checkpoint at {directory} (metadata.json missing)")
    inner = unwrap(model)
    state = dist_checkpointing.load(inner.sharded_state_dict(), str(directory))
    inner.load_state_dict(state, strict=True)
