"""The guardian: a small process that ends the check's commands if the check is SIGKILLed.

The parent-death signal reaches the check's direct children only; what they started (pip's
build backend, ninja, nvcc, torchrun's workers) would be orphaned and keep running. The guardian
is a child of the check that waits on a pipe only the check holds open. The check writes a byte
before it exits normally (it has stopped its commands itself); end of file without that byte
means the check died, and the guardian then stops:

* every process it last saw under the check (it looks twice a second), with their descendants;
* every orphan in the check's process group that started after the check (a process whose
  parent is outside that group, init or a subreaper, and is not the check's own parent, so a
  pipeline partner such as ``| tee`` is left alone): what was started since its last look.

It ignores SIGINT, SIGTERM and SIGHUP (a Ctrl-C reaches the whole group; the check handles it
and stands the guardian down) and lives no longer than the check and this sweep.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

from megatron_vlm.gpucheck import proctree

STAND_DOWN = b"x"
LOOK_EVERY = 0.5  # seconds between looks at the check's processes
_START = ("import sys; sys.path.insert(0, {root!r}); "
          "from megatron_vlm.gpucheck.guardian import watch; watch(int(sys.argv[1]), "
          "int(sys.argv[2]))")


class Guardian:
    """The check's handle on its guardian process."""

    def __init__(self):
        read_end, self._write_end = os.pipe()  # both ends are not inherited by commands
        root = str(Path(__file__).resolve().parents[2])
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _START.format(root=root), str(read_end), str(os.getpid())],
            pass_fds=(read_end,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        os.close(read_end)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stand_down(self) -> None:
        """Tells the guardian the check ends normally, and waits for it to exit."""
        try:
            os.write(self._write_end, STAND_DOWN)
            os.close(self._write_end)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _victims(check: int, check_info, seen: proctree.Procs) -> proctree.Procs:
    """What to stop once the check is gone (see the module docstring)."""
    me = os.getpid()
    table = proctree.process_table()
    victims = {p: s for p, s in seen.items() if p in table and table[p][2] == s}
    if check_info is not None:
        check_parent, check_group, check_start = check_info
        for pid, (ppid, pgid, start) in table.items():
            # Adopted by init or a subreaper, which live outside the check's group.
            orphan = ppid not in table or table[ppid][1] != check_group
            if pgid == check_group and start >= check_start and pid != check and orphan \
                    and ppid != check_parent:
                victims[pid] = start
    for pid in list(victims):
        victims.update(proctree.descendants(pid, table))
    victims.pop(me, None)
    return victims


def watch(fd: int, check: int) -> None:
    """The guardian's loop (in its own process): look, wait for the pipe, sweep on EOF."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    check_info = proctree.info(check)
    me = os.getpid()
    seen: proctree.Procs = {}
    while True:
        ready, _, _ = select.select([fd], [], [], LOOK_EVERY)
        if ready:
            if os.read(fd, 1) == STAND_DOWN:
                return
            break  # end of file: the check is gone without standing the guardian down
        seen = {p: s for p, s in proctree.descendants(check).items() if p != me}
    victims = _victims(check, check_info, seen)
    if victims:
        proctree.stop(victims, grace=2.0)
        print(f"gpu_check guardian: the check ended without stopping its commands; stopped "
              f"{len(victims)} process{'es' if len(victims) > 1 else ''}", file=sys.stderr)
