"""Logging set-up shared by the entry points: what a person reads, on a terminal or in a log.

megatron-core announces each missing optional dependency (Transformer Engine, Apex) with its
own warning and logs whole config objects at INFO; this project prints one line about the
device mode instead (see :mod:`megatron_vlm.runtime.distributed`), so those are quietened here.
Libraries' progress bars are turned off when output is piped (:mod:`megatron_vlm.progress`),
and lm-eval's notice that this project's zero-shot setting overrides a task default (one
warning per task, every run) is dropped. Call :func:`configure_logging` first thing in an
entry point, before megatron-core, tqdm or lm-eval are imported.
"""

from __future__ import annotations

import logging
import os
import warnings

_FALLBACK_WARNINGS = (
    r".*(Transformer Engine|Apex|apex|TE).*(not installed|not available|Falling back|falling back).*",
    r"Apex is not installed.*",
    # Deprecations inside megatron-core's own calls into torch, not actionable here.
    r"full scope is deprecated.*",
    r"`load_state_dict` is deprecated.*",
    r"Please use DTensor instead.*",
)

# (logger, message start) of third-party log records that say nothing a user can act on.
_NOISE_RECORDS = (
    # The evaluation runs text tasks with num_fewshot=0 on purpose (the paper's setting).
    ("lm_eval.evaluator", "Overwriting default num_fewshot"),
)


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


LOG_LEVEL_ENV = "MEGATRON_VLM_LOG_LEVEL"
"""DEBUG shows the project's debug lines too (on rank 0); any level name logging knows."""


def configure_logging(level: int = logging.INFO) -> logging.Logger:
    """INFO on rank 0 and WARNING elsewhere for this project (``MEGATRON_VLM_LOG_LEVEL``
    overrides ``level``); WARNING for megatron-core."""
    from megatron_vlm.progress import quiet_third_party_bars

    asked = os.environ.get(LOG_LEVEL_ENV, "").strip().upper()
    if asked:
        if not isinstance(logging.getLevelName(asked), int):
            raise ValueError(f"{LOG_LEVEL_ENV}={asked} is not a log level (DEBUG, INFO, "
                             "WARNING, ERROR)")
        level = logging.getLevelName(asked)
    rank = int(os.environ.get("RANK", 0))
    # Other libraries' debug lines stay off: DEBUG is for this project's.
    logging.basicConfig(level=max(level, logging.INFO) if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    for pattern in _FALLBACK_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, prefix in _NOISE_RECORDS:
        noisy = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.prefix == prefix for f in noisy.filters):
            noisy.addFilter(_DropMessages(prefix))
    quiet_third_party_bars()
    logger = logging.getLogger("megatron_vlm")
    logger.setLevel(level if rank == 0 else logging.WARNING)
    return logger
