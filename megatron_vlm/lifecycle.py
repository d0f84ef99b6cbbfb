"""Every process of a run dies with the run.

A training process starts helpers it never names: megatron-core's checkpoint writer forks a
writer (and that one forks more), spawns a multiprocessing manager for the write results, and
multiprocessing spawns its resource tracker. Nothing ties them to the trainer, so a SIGKILL of
the trainer (or of the torchrun agent above it) used to leave them running for good, one of
them holding the rendezvous port.

The mechanism is the kernel's parent-death signal (``prctl(PR_SET_PDEATHSIG)``, Linux): a
process asks for a signal when its parent exits, and the kernel delivers it however the parent
died, SIGKILL included. No watchdog process or thread is needed, and nothing else in the run
changes: :func:`tie_to_the_run` sets it for every process the trainer forks (an ``os.fork`` hook,
inherited by grandchildren, so megatron-core's writers are covered without touching its code),
for the trainer itself when torchrun started it (its agent is its parent), and
:func:`start_write_results_manager` starts megatron-core's results manager with it (a spawned
process, which fork hooks never see). The resource tracker needs nothing: it exits once the
last process holding its pipe is gone.

Ctrl-C (SIGINT) reaches a whole process group, and torchrun passes it on to each worker's
group: the helpers leave it to the trainer (they die when it exits), so the trainer's one line
(:func:`megatron_vlm.cli.run_main`) is all that is printed, not a traceback per helper.

Limits: the signal follows the parent *thread*, so a child forked from a thread other than the
main one is left alone (that thread may end long before the process); a process that detaches
on purpose by forking twice would be killed, and none in this stack does. On other systems
nothing is set.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import shlex
import signal
import sys
import threading
from typing import Optional

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_prctl = None  # libc's prctl, loaded before any fork (no dlopen in a freshly forked child)
_fork_hook_installed = False
_forking_pid: Optional[int] = None  # set just before a fork; read in the child
_forking_from_main_thread = False


def _load_prctl():
    global _prctl
    if _prctl is None and sys.platform.startswith("linux"):
        try:
            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            return None
    return _prctl


def die_with_parent(sig: int = signal.SIGKILL, parent: Optional[int] = None) -> bool:
    """Has the kernel send ``sig`` to this process when its parent exits; False where that is
    not available. ``parent`` is the parent's pid when the caller knows it: had the parent died
    before this call, the signal comes at once (the kernel only watches from now on)."""
    prctl = _load_prctl()
    if prctl is None or prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True


def _before_fork() -> None:
    global _forking_pid, _forking_from_main_thread
    _forking_pid = os.getpid()
    _forking_from_main_thread = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    if _forking_from_main_thread:
        die_with_parent(signal.SIGKILL, _forking_pid)
        # Ctrl-C reaches the whole process group (torchrun passes it on to each worker's):
        # a helper leaves it to its parent, whose exit ends it, instead of printing a
        # KeyboardInterrupt traceback of its own. A handler, not SIG_IGN, which exec keeps:
        # a program started with preexec_fn gets Ctrl-C as usual.
        signal.signal(signal.SIGINT, _leave_sigint_to_the_parent)


def _leave_sigint_to_the_parent(signum, frame) -> None:
    pass


def forked_children_die_with_parent() -> None:
    """From now on every process this one forks (and each of those forks) is SIGKILLed when its
    parent dies. Helpers hold nothing that needs a clean stop: an interrupted checkpoint write
    stays an incomplete ``NAME.tmp``. Idempotent."""
    global _fork_hook_installed
    if not _fork_hook_installed and _load_prctl() is not None:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _fork_hook_installed = True


def under_torchrun() -> bool:
    """Whether torchrun's agent started this process (it sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def launch_command() -> str:
    """The command that started this run, as typed, for a line that says to run it again:
    under torchrun torchrun's (its agent is this process's parent), else this process's own.
    A script run through its ``#!`` line shows as the interpreter and the script's path, so
    ``python .../bin/torchrun ...`` is given back as ``torchrun ...``."""
    argv = list(sys.orig_argv)
    if under_torchrun():
        try:
            with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
                argv = f.read().decode().split("\0")[:-1]
        except OSError:  # not Linux
            return "the same torchrun command"
        if len(argv) > 1 and os.path.basename(argv[1]) == "torchrun":
            argv = ["torchrun", *argv[2:]]
    return shlex.join(argv)


def tie_to_the_run() -> None:
    """The first thing every entry point does (:func:`megatron_vlm.cli.run_main`): its helpers
    die with it, and under torchrun it dies with the agent. torchrun starts each worker in a session of its own, so a
    SIGKILL of torchrun (or a ``kill -- -PGID`` of its group) never reaches the workers
    otherwise. A process started from a shell is not tied to the shell: ``nohup`` and
    closing the terminal keep working as before."""
    forked_children_die_with_parent()
    if under_torchrun():
        die_with_parent(signal.SIGKILL)


class _SpawnedWithSigintBlocked(multiprocessing.context.SpawnProcess):
    """A spawned process that starts with SIGINT blocked (the mask survives exec), as
    multiprocessing starts its resource tracker: a Ctrl-C (which reaches the process group)
    during its start-up would print a traceback of its own. The manager ignores SIGINT once
    it is up. This process blocks it only while it starts the child, a few milliseconds; a
    Ctrl-C then waits for the mask to be restored."""

    @staticmethod
    def _Popen(process_obj):
        # Started first: starting it (in the spawn, at most once) unblocks SIGINT on its way out.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            # Kept on the process before the mask is restored, which raises a Ctrl-C that came
            # meanwhile: its caller can still stop the child.
            process_obj._popen = multiprocessing.context.SpawnProcess._Popen(process_obj)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return process_obj._popen


class _SpawnContext(multiprocessing.context.SpawnContext):
    Process = _SpawnedWithSigintBlocked


def start_write_results_manager() -> None:
    """Starts the process megatron-core's checkpoint writer collects its results in, tied to
    this process; the checkpoint code calls it before each save.

    megatron-core spawns a multiprocessing manager for them at the first save (sync or async)
    and nothing ties it to its parent: a trainer killed during a save left it running for good
    (about 300 MB each), and with it multiprocessing's resource tracker. Started here instead,
    in the module global where megatron-core looks first, with :func:`die_with_parent` as its
    initializer.
    """
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=_SpawnContext())  # spawned, as megatron-core does
    try:
        manager.start(initializer=die_with_parent, initargs=(signal.SIGKILL, os.getpid()))
    except BaseException:  # Ctrl-C while it starts: it would report to a closed pipe
        started = getattr(manager, "_process", None)  # set by start() before it waits
        if started is not None and started.pid is not None:
            started.kill()
        raise
    filesystem_async._results_queue = manager.Queue()


def stop_write_results_manager() -> None:
    """Stops the write-results manager: a training run's checkpoint writer keeps it from its
    first save to the end of training (starting one costs seconds, as it imports torch), a
    one-off save stops it once its save is complete."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = getattr(filesystem_async, "_results_queue", None)
    manager = getattr(queue, "_manager", None)
    if manager is not None:
        manager.shutdown()
    if queue is not None:
        filesystem_async._results_queue = None
