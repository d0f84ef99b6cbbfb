"""Where per-step metrics go (rank 0 only): OUTPUT_DIR/metrics.jsonl, TensorBoard, optionally W&B."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

logger = logging.getLogger("megatron_vlm")


class MetricsLog:
    """Appends one JSON line per step (a resumed run appends; the last line of a step wins),
    writes TensorBoard scalars, and logs to Weights & Biases when ``wandb_project`` is set."""

    def __init__(self, out: Path, config: dict, run_name: str, wandb_project: Optional[str] = None):
        self._jsonl = open(out / "metrics.jsonl", "a")
        self._tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # a dependency; a broken install should not stop training
            logger.warning("tensorboard is not importable: no TensorBoard logs")
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ValueError("train.wandb_project is set but wandb is not installed "
                                 "(pip install wandb), or set train.wandb_project=null") from None
            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config,
                                     dir=str(out), resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        self._jsonl.write(json.dumps(metrics) + "\n")
        self._jsonl.flush()
        scalars = {k: v for k, v in metrics.items()
                   if k != "step" and isinstance(v, float) and math.isfinite(v)}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
