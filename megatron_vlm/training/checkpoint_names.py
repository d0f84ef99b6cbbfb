"""What a run's checkpoint directory holds, by name: readable without torch or megatron-core
(tools that only look at checkpoints, e.g. tools/lineage.py, start in a second).

``OUTPUT_DIR/checkpoints/`` holds one ``step_NNNNNNN`` directory per checkpoint, complete once
its ``common.json`` is there, and a ``latest`` file naming the newest complete one.
"""

from __future__ import annotations

import re

LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d{7})$")
COMMON = "common.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"
