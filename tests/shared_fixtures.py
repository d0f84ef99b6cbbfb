"""Expensive fixture results built once per test run, not once per pytest-xdist worker.

A module-scoped fixture runs again in every worker that gets one of the module's tests, and an
idle worker takes queued tests from a busy one (``--dist worksteal``), so a minute-long fixture
may run twice. :func:`build_once` builds into a folder every worker of the run shares, under a
file lock: the first worker builds, the others wait and read what it made.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from filelock import FileLock

DONE = "built.json"


def build_once(tmp_path_factory, name: str, build: Callable[[Path], dict]) -> dict:
    """``build(folder)``'s JSON-able result, computed by one worker of this run (the folder is
    shared by all of them; a failed build is not remembered, so each worker fails alike)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's root
    folder = shared / f"shared-{name}"
    with FileLock(str(shared / f"shared-{name}.lock")):
        done = folder / DONE
        if done.is_file():
            return json.loads(done.read_text())
        folder.mkdir(exist_ok=True)
        result = build(folder)
        done.write_text(json.dumps(result))
        return result
