"""Runs a module under torchrun in a subprocess, as the distributed tests need.

Each distributed case gets its own processes (forking gloo workers inside pytest can deadlock)
and a hard timeout, so a hung collective fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(module_or_script: str, args: list[str], nproc: int, module: bool = True,
                     launcher: list[str] = ()) -> list[str]:
    """The torchrun argv :func:`torchrun` runs; ``launcher``: more torchrun options."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *launcher]
    return cmd + (["-m", module_or_script] if module else [module_or_script]) + args


def run_env(**extra: str) -> dict:
    """The environment the tests run the entry points in."""
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)


def torchrun(module_or_script: str, args: list[str], nproc: int, timeout: int = 300,
             module: bool = True) -> subprocess.CompletedProcess:
    cmd = torchrun_command(module_or_script, args, nproc, module)
    return subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True,
                          timeout=timeout)


# A process started with MARKER=<token> in its environment passes it to everything it starts
# (forked, spawned or exec'ed), so the processes of one run can be found without knowing them.
MARKER = "MEGATRON_VLM_TEST_RUN"


def marked_processes(token: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment carries ``token``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"{MARKER}={token}".encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
            if stat[stat.rindex(")") + 2] == "Z":  # exited, not yet reaped by its parent
                continue
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):  # gone meanwhile, or not ours to read
            continue
    return found


def wait_until_none_marked(token: str, seconds: float) -> dict[int, str]:
    """Waits up to ``seconds`` for every process carrying ``token`` to exit; returns those left
    (after SIGKILLing them, so that a failing test leaves nothing behind either)."""
    deadline = time.monotonic() + seconds
    while (left := marked_processes(token)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


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
