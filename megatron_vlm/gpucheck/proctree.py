"""The processes under a process, read from /proc, and stopping them.

The check's commands run in the check's own process group (so a kill of the group by whoever
started the check reaches them), which rules out stopping a command with a group kill: the
check would stop itself. A command is stopped with everything it started instead: the tree of
its descendants by parent id, each process identified by (pid, start time) so that a recycled
pid is never signalled. Linux only; where /proc cannot be read, the trees are empty and only
the direct child is stopped.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Dict, Iterable, Optional, Tuple

Procs = Dict[int, int]  # pid -> start time (clock ticks since boot), which tells reused pids


def _stat(pid: int) -> Optional[Tuple[int, int, int, str]]:
    """(parent pid, process group, start time, state) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read().decode(errors="replace")
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields follow the last ')'.
    fields = text[text.rfind(")") + 2:].split()
    try:
        return int(fields[1]), int(fields[2]), int(fields[19]), fields[0]
    except (IndexError, ValueError):
        return None


def process_table() -> Dict[int, Tuple[int, int, int]]:
    """pid -> (parent pid, process group, start time) of every process this user can see."""
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if name.isdigit():
            stat = _stat(int(name))
            if stat is not None:
                table[int(name)] = stat[:3]
    return table


def descendants(root: int, table: Optional[Dict[int, Tuple[int, int, int]]] = None) -> Procs:
    """Every process below ``root`` (children, their children, ...), not ``root`` itself."""
    table = process_table() if table is None else table
    children: Dict[int, list] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: Procs = {}
    queue = list(children.get(root, []))
    while queue:
        pid = queue.pop()
        if pid not in found:
            found[pid] = table[pid][2]
            queue.extend(children.get(pid, []))
    return found


def identity(pid: int) -> Optional[int]:
    """The start time of ``pid``, or None when it is gone."""
    stat = _stat(pid)
    return None if stat is None else stat[2]


def running(pid: int, start: int) -> bool:
    """Whether the process ``pid`` that started at ``start`` still runs (a zombie does not)."""
    stat = _stat(pid)
    return stat is not None and stat[2] == start and stat[3] not in ("Z", "X")


def info(pid: int) -> Optional[Tuple[int, int, int]]:
    """(parent pid, process group, start time) of ``pid``, or None when it is gone."""
    stat = _stat(pid)
    return None if stat is None else stat[:3]


def signal_procs(procs: Procs, sig: int) -> None:
    """Sends ``sig`` to each process that is still the one recorded."""
    for pid, start in procs.items():
        if running(pid, start):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def reap(pids: Iterable[int]) -> None:
    """Collects the exit status of those ``pids`` that are this process's children and have
    ended (orphans handed to this process as a subreaper), so none stays a zombie."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            pass


def stop(procs: Procs, grace: float, reapable: Iterable[int] = ()) -> None:
    """SIGTERM to ``procs``, SIGKILL to those still running after ``grace`` seconds, then waits
    (up to 5 s) until none runs. ``reapable``: which of them this process may reap (never the
    child a subprocess.Popen waits for: reaping it would lose its exit status)."""
    reapable = [p for p in reapable if p in procs]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        live = {p: s for p, s in procs.items() if running(p, s)}
        if not live:
            return
        signal_procs(live, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            reap(reapable)
            if not any(running(p, s) for p, s in live.items()):
                break
            time.sleep(0.05)
