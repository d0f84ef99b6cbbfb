"""Checks made before a checkpoint is loaded or a run resumed, each one clear line instead of a
failure deep inside torch or a silently changed run:

* :func:`check_checkpoint_files`: every data file the checkpoint's index names is there and
  long enough;
* :func:`check_resume_schedule`: a resumed run keeps the settings that fix its LR schedule and
  data order (:data:`RESUME_SCHEDULE_KEYS`), unless ``checkpoint.allow_schedule_change``;
* :func:`check_loaded_keys` (after the load): the checkpoint held every key of the model but
  Transformer Engine's ``_extra_state``, and nothing else.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("megatron_vlm")


def check_checkpoint_files(directory: Path) -> None:
    """One clear line (ValueError) when a data file the checkpoint's index (``.metadata``) names
    is missing or shorter than the data the index places in it: a copy cut short, a disk that
    filled up. Without this the load dies deep in torch with a long traceback."""
    from torch.distributed.checkpoint import FileSystemReader

    index = directory / ".metadata"
    if not index.is_file():
        raise ValueError(f"checkpoint {directory} is incomplete: its index {index.name} is "
                         "missing")
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as err:  # a truncated or overwritten pickle: any unpickling error
        raise ValueError(f"checkpoint {directory}: its index {index.name} cannot be read "
                         f"({type(err).__name__}: {err})") from None
    ends: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        path = directory / name
        if not path.is_file():
            raise ValueError(f"checkpoint {directory} is incomplete: {name} is missing")
        size = path.stat().st_size
        if size < end:
            raise ValueError(f"checkpoint {directory} is incomplete: {name} has {size:,} bytes, "
                             f"its index places data up to byte {end:,}")


RESUME_SCHEDULE_KEYS = ("train.train_iters", "train.lr", "train.min_lr",
                        "train.global_batch_size", "train.seq_length", "schedule.mode",
                        "schedule.warmup_iters", "schedule.warmup_fraction",
                        "schedule.decay_style", "data.ratios", "data.total_tokens", "data.seed")
"""Settings a resumed run must share with its checkpoint: they fix the LR at every step, the
fraction checkpoints' steps, or which sequences each step reads."""


def check_resume_schedule(common: dict, cfg_dict: dict, directory: Path, allow: bool) -> None:
    """ValueError listing every :data:`RESUME_SCHEDULE_KEYS` setting that differs between the
    checkpoint being resumed and this run, unless ``allow`` (then a warning lists them)."""
    saved = common.get("config")
    if not isinstance(saved, dict):
        return  # a checkpoint that records no config (older or converted): nothing to compare

    def value(tree: dict, key: str):
        for part in key.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        return tree

    differ = [f"{key}: checkpoint {value(saved, key)!r}, this run {value(cfg_dict, key)!r}"
              for key in RESUME_SCHEDULE_KEYS if value(saved, key) != value(cfg_dict, key)]
    if not differ:
        return
    if allow:
        logger.warning("resuming from %s with schedule settings changed "
                       "(checkpoint.allow_schedule_change=true): %s", directory, "; ".join(differ))
        return
    raise ValueError(f"cannot resume from {directory}: {'; '.join(differ)}. Set them back, use "
                     f"another output_dir, or set checkpoint.allow_schedule_change=true")


EXTRA_STATE = "_extra_state"


def check_loaded_keys(directory, missing: list, unexpected: list, prefix: str = "") -> None:
    """ValueError unless the model's keys under ``prefix`` were all loaded and nothing else was.

    Transformer Engine modules keep FP8 metadata as ``_extra_state`` entries, which
    megatron-core does not write for the attention (TE's own load hook for them is documented
    as temporary), and a local-spec checkpoint has none at all: a missing ``_extra_state``
    leaves the module's fresh metadata in place, so those keys, and only those, may be absent.
    """
    missing = [k for k in missing if k.startswith(prefix) and not k.endswith(EXTRA_STATE)]
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory} does not fit the model: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
