"""Runs a module under torchrun in a subprocess, as the distributed tests need.

Each distributed case gets its own processes (forking gloo workers inside pytest can deadlock)
and a hard timeout, so a hung collective fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(module_or_script: str, args: list[str], nproc: int, timeout: int = 300,
             module: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += (["-m", module_or_script] if module else [module_or_script]) + args
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def last_json(stdout: str) -> dict:
    """The last line of ``stdout`` that parses as a JSON object."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in output:\n{stdout[-3000:]}")


def metrics_by_step(run_dir: Path) -> dict:
    """step -> the metrics line of a training run (the last line of a step winning: a resumed
    run appends)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record
    return out
