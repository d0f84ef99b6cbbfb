"""Running one command of the check: in the check's process group, with the parent-death
signal, a time limit, and its output kept in a log capped to its tail.

* Process group: a command stays in the check's group (no new session), so a kill of the group
  by whoever started the check (a time limit that SIGKILLs the group) reaches every command.
* Parent-death signal: each command gets ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` in its
  ``preexec_fn``, so it dies when the check is SIGKILLed alone. The signal follows the thread
  that started the command, so commands are only started from the check's main thread.
* Stopping: when a command ends, runs past its limit, or the check is interrupted, the command
  and every process under it are stopped (proctree.py); with ``sweep_orphans`` (the check is a
  subreaper, see :func:`become_subreaper`) so are processes it left behind.
* Logs: only the last ``tail_bytes`` of each command's output are kept (the log says how many
  bytes were dropped); the log file is rewritten at most once per ``tick`` while the command
  runs, and when it ends, through a temporary file, so a kill leaves a whole file.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from megatron_vlm.fsutil import write_text_atomic
from megatron_vlm.gpucheck import proctree

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
TIMEOUT = 124  # the exit status reported for a command stopped at its limit
DEFAULT_TAIL_KIB = 256


def _prctl():
    """libc's prctl, or None where it cannot be loaded (not Linux)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def become_subreaper() -> bool:
    """Makes processes orphaned under this one its children instead of init's, so that what a
    finished command left running can still be found and stopped. True when it worked."""
    prctl = _prctl()
    return bool(prctl) and prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def die_with_parent(parent: int) -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` that gives the child SIGKILL when ``parent`` dies (prctl resolved here,
    before the fork)."""
    prctl = _prctl()
    if prctl is None:
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class CappedLog:
    """A log file of commands: each command's line, then the last ``tail_bytes`` of its output,
    then how it ended; notes of the check between them."""

    def __init__(self, path: Path, tail_bytes: int = DEFAULT_TAIL_KIB * 1024):
        self.path = Path(path)
        self.tail_bytes = tail_bytes
        self._lock = threading.Lock()
        self._done: List[str] = []  # finished entries, as text
        self._header: Optional[str] = None  # the running command's line
        self._chunks: collections.deque = collections.deque()
        self._kept = 0
        self._dropped = 0
        self._dirty = False

    def note(self, line: str) -> None:
        with self._lock:
            self._done.append(f"[gpu_check] {line}\n")
            self._dirty = True
        self.flush()

    def begin(self, header: str) -> None:
        with self._lock:
            self._header = f"$ {header}\n"
            self._chunks.clear()
            self._kept = self._dropped = 0
            self._dirty = True

    def feed(self, data: bytes) -> None:
        """Output of the running command: kept up to the last ``tail_bytes``."""
        with self._lock:
            self._chunks.append(data)
            self._kept += len(data)
            while self._kept > self.tail_bytes:
                excess = self._kept - self.tail_bytes
                first = self._chunks[0]
                if len(first) <= excess:
                    self._chunks.popleft()
                    cut = len(first)
                else:
                    self._chunks[0] = first[excess:]
                    cut = excess
                self._kept -= cut
                self._dropped += cut
            self._dirty = True

    def _running_text(self) -> str:
        if self._header is None:
            return ""
        dropped = (f"[gpu_check] {self._dropped} bytes of earlier output dropped; the last "
                   f"{self.tail_bytes // 1024} KiB are kept\n" if self._dropped else "")
        return self._header + dropped + b"".join(self._chunks).decode(errors="replace")

    def output(self) -> str:
        """The kept output of the running (or last) command."""
        with self._lock:
            return b"".join(self._chunks).decode(errors="replace")

    def end(self, footer: str) -> None:
        with self._lock:
            text = self._running_text()
            if text and not text.endswith("\n"):
                text += "\n"
            self._done.append(text + f"[gpu_check] {footer}\n")
            self._header = None
            self._dirty = True
        self.flush()

    def flush(self) -> None:
        """Rewrites the file (through a temporary file) if anything changed."""
        with self._lock:
            if not self._dirty:
                return
            text = "".join(self._done) + self._running_text()
            self._dirty = False
        write_text_atomic(self.path, text)


def _pump(stream, log: CappedLog) -> None:
    fd = stream.fileno()
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except OSError:
            break
        if not data:
            break
        log.feed(data)
    stream.close()


def shown(cmd: Sequence) -> str:
    """The command as logged: inline scripts (``-c`` with newlines) as <script>."""
    return " ".join("<script>" if "\n" in str(c) else str(c) for c in cmd)


class Runner:
    """Runs the check's commands one at a time. ``keep``: pids a sweep never stops (the
    guardian). ``grace``: seconds between SIGTERM and SIGKILL when stopping a command."""

    def __init__(self, sweep_orphans: bool = False, keep: Sequence[int] = (),
                 grace: float = 5.0, tick: float = 1.0):
        self.sweep_orphans = sweep_orphans
        self.keep = set(keep)
        self.grace = grace
        self.tick = tick

    def run(self, cmd: Sequence, log: CappedLog, timeout: float, env: Optional[dict] = None,
            cwd: Optional[Path] = None, on_tick: Optional[Callable[[], None]] = None) -> int:
        """Runs ``cmd`` with its output going to ``log``; calls ``on_tick`` about once per
        tick while it runs. Returns its exit status, or TIMEOUT when it was stopped after
        ``timeout`` seconds. Whatever ends the wait (an exception too: an interrupted check),
        the command and the processes under it are stopped before this returns."""
        log.begin(shown(cmd))
        try:
            proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                    env=env, preexec_fn=die_with_parent(os.getpid()))
        except OSError as err:
            log.end(f"did not start: {err}")
            raise
        reader = threading.Thread(target=_pump, args=(proc.stdout, log), daemon=True)
        reader.start()
        status: Optional[int] = None
        footer = "interrupted: the check was stopped"
        try:
            deadline = time.monotonic() + max(timeout, 0)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    status, footer = TIMEOUT, f"stopped after its {timeout:.0f} s limit"
                    break
                try:
                    status = proc.wait(timeout=min(self.tick, left))
                    footer = f"exit status {status}"
                    break
                except subprocess.TimeoutExpired:
                    pass
                if on_tick is not None:
                    on_tick()
                log.flush()
        finally:
            self.stop(proc)
            reader.join(timeout=5)
            log.end(footer)
        return status

    def sweep(self) -> None:
        """Stops every process left under this one but those in ``keep`` (with
        ``sweep_orphans``): the last act of a check that was interrupted."""
        if self.sweep_orphans:
            left = {p: s for p, s in proctree.descendants(os.getpid()).items()
                    if p not in self.keep}
            proctree.stop(left, self.grace, reapable=left)

    def stop(self, proc: subprocess.Popen) -> None:
        """Stops ``proc`` and every process under it, then (with ``sweep_orphans``) whatever
        it left under this process, twice, for processes started while the first round ran."""
        for _ in range(2):
            tree = proctree.descendants(proc.pid)
            start = proctree.identity(proc.pid)
            if start is not None and proc.poll() is None:
                tree[proc.pid] = start
            if self.sweep_orphans:
                orphans = proctree.descendants(os.getpid())
                tree.update({p: s for p, s in orphans.items() if p not in self.keep})
            # Only the Popen child is left for Popen to reap: reaping it here loses its status.
            proctree.stop(tree, self.grace, reapable=[p for p in tree if p != proc.pid])
            if proc.poll() is None:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            if not tree:
                break
