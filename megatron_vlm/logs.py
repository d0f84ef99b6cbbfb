"""Logging set-up shared by the entry points.

megatron-core announces each missing optional dependency (Transformer Engine, Apex) with its
own warning and logs whole config objects at INFO; this project prints one line about the
device mode instead (see :mod:`megatron_vlm.runtime.distributed`), so those are quietened here.
Call :func:`configure_logging` before megatron-core is imported.
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


def configure_logging(level: int = logging.INFO) -> logging.Logger:
    """INFO on rank 0 and WARNING elsewhere for this project; WARNING for megatron-core."""
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=level if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    for pattern in _FALLBACK_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logger = logging.getLogger("megatron_vlm")
    logger.setLevel(level if rank == 0 else logging.WARNING)
    return logger
