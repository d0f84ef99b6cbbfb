"""The processes of a run go when the run goes (issue 12, docs/operations.md).

Each test starts the real entry point with a marker in its environment, which every process of
the run inherits (megatron-core's checkpoint writers, its results manager, multiprocessing's
resource tracker, torchrun's workers), kills a process of the run the way a user or the machine
would, and then looks for any process carrying the marker.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from distributed import (MARKER, REPO, marked_processes, run_env, torchrun_command,
                         wait_until_none_marked)

TINY = ["--recipe", "tiny", "data.kind=random"]
GONE_WITHIN = 5.0  # seconds: "no process of the run survives for more than a few seconds"


# What a launcher sets: a lone process must not inherit them from this one (its MASTER_PORT is
# held by the in-process runtime of other tests), and torchrun sets its own.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def start(cmd: list[str], token: str, log: Path, **extra_env: str) -> subprocess.Popen:
    env = {k: v for k, v in run_env(**{MARKER: token}, **extra_env).items()
           if k not in LAUNCHER_VARS}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"), start_new_session=True)


def wait_for(what: str, ready, proc: subprocess.Popen, log: Path, seconds: float = 180):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = ready()
        if result:
            return result
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before {what}:\n"
                        f"{log.read_text()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no {what} within {seconds} s:\n{log.read_text()[-3000:]}")


def saving(out: Path, token: str, helpers: int):
    """True while a checkpoint is being written and at least ``helpers`` processes besides the
    trainers (their writers and results managers) are up."""
    def ready():
        tmp = list((out / "checkpoints").glob("*.tmp")) if (out / "checkpoints").is_dir() else []
        spawned = [c for c in marked_processes(token).values() if "multiprocessing" in c]
        return tmp and len(spawned) >= helpers
    return ready


def sigkill_while_saving(cmd, out, tmp_path):
    """Starts ``cmd`` (a run writing to ``out``), SIGKILLs it once a checkpoint is being
    written (the manager and the resource tracker, both spawned, are up) and returns the
    processes of the run before the kill and those still running ``GONE_WITHIN`` s after."""
    token, log = uuid.uuid4().hex, tmp_path / "stderr"
    proc = start(cmd, token, log)
    try:
        wait_for("a checkpoint being written", saving(out, token, helpers=2), proc, log)
        before = marked_processes(token)
        proc.kill()
        proc.wait()
    finally:
        left = wait_until_none_marked(token, GONE_WITHIN)
    return before, left


def test_sigkill_during_an_async_save_leaves_no_process(tmp_path):
    """A trainer SIGKILLed while megatron-core writes a checkpoint in the background: its
    results manager, resource tracker and writer used to run on for good."""
    out = tmp_path / "run"
    before, left = sigkill_while_saving(
        [sys.executable, "pretrain_vlm.py", *TINY, "train.train_iters=1000", f"output_dir={out}",
         "checkpoint.save_interval=3", "checkpoint.async_save=true"], out, tmp_path)
    assert len(before) >= 3, before  # the trainer and its helpers were there to be killed
    assert left == {}, f"left running {GONE_WITHIN} s after the trainer's SIGKILL: {left}"


def interrupt(cmd, ready, what, tmp_path):
    """Starts ``cmd`` and sends SIGINT to its process group once ``ready(token)()`` holds, as
    Ctrl-C in a terminal does (torchrun passes it on to each worker's group); returns the exit
    status, stderr and the processes of the run still running ``GONE_WITHIN`` s after it
    ended."""
    token, log = uuid.uuid4().hex, tmp_path / "stderr"
    proc = start(cmd, token, log)
    try:
        wait_for(what, ready(token), proc, log)
        os.killpg(proc.pid, signal.SIGINT)
        status = proc.wait(timeout=60)
    finally:
        proc.kill()
        left = wait_until_none_marked(token, GONE_WITHIN)
    return status, log.read_text(), left


@pytest.mark.parametrize("launcher", ["python", pytest.param("torchrun", marks=pytest.mark.slow)])
def test_ctrl_c_ends_a_run_with_one_line_that_says_how_to_go_on(tmp_path, launcher):
    """Ctrl-C used to print a 35-line traceback ending in KeyboardInterrupt per rank (and one
    per helper that got it while starting). Now rank 0 prints one line: the last step, the
    checkpoint to resume from (as a rule none yet, here) and the command to run again (each
    case's wording: test_training.py); a single process exits with status 130, and nothing of
    the run is left. The single process gets it while its first checkpoint is being written
    (its helpers up), the two ranks between steps or in one; torchrun prints its own lines
    after ours (docs/operations.md)."""
    out = tmp_path / "run"
    args = [*TINY, "train.seq_length=32", "train.train_iters=1000", f"output_dir={out}"]
    if launcher == "python":
        cmd = [sys.executable, "pretrain_vlm.py", *args, "checkpoint.save_interval=3"]
        status, stderr, left = interrupt(cmd, lambda token: saving(out, token, helpers=2),
                                         "a checkpoint being written", tmp_path)
    else:
        cmd = torchrun_command("pretrain_vlm.py", args, nproc=2, module=False)
        metrics = out / "metrics.jsonl"
        status, stderr, left = interrupt(
            cmd, lambda token: lambda: metrics.is_file() and metrics.read_text().count("\n") >= 2,
            "two training steps", tmp_path)
    lines = [line for line in stderr.splitlines() if line.startswith("pretrain_vlm:")]
    assert len(lines) == 1, stderr[-3000:]
    # (A save that completes as the signal comes makes it the checkpoint to resume from.)
    assert re.fullmatch(r"pretrain_vlm: interrupted after step \d+ of 1000(, with no checkpoint "
                        r"saved; to start it again|; its last checkpoint is \S+ \(step 3\); to "
                        r"resume from it), run the same command: " + re.escape(shlex.join(cmd)),
                        lines[0]), lines[0]
    assert "KeyboardInterrupt" not in stderr and "[rank" not in stderr, stderr[-3000:]
    if launcher == "python":
        assert status == 130 and "Traceback" not in stderr, stderr[-3000:]
    else:  # torchrun's own traceback, of the signal it got, is the only one
        assert stderr.count("Traceback") <= 1 and "SignalException" in stderr, stderr[-3000:]
    assert left == {}, f"left running {GONE_WITHIN} s after the run ended: {left}"


def _exit_0_if_sigint_is_blocked():
    os._exit(0 if signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []) else 1)


def test_helpers_leave_ctrl_c_to_the_trainer():
    """Ctrl-C reaches every process of the group, and a helper that got it printed a traceback
    of its own: megatron-core's results manager (spawned at each save) while it started, as
    it ignores SIGINT only once up, and a forked helper (megatron-core's writer, a loader
    worker) at any time. The manager now starts with SIGINT blocked; a forked helper leaves
    it to its parent, whose exit ends it. Here the signal at a known moment; the test above
    sends it where it falls."""
    from megatron_vlm.lifecycle import _SpawnContext, forked_children_die_with_parent

    spawned = _SpawnContext().Process(target=_exit_0_if_sigint_is_blocked)
    spawned.start()
    spawned.join(120)
    assert spawned.exitcode == 0
    forked_children_die_with_parent()
    pid = os.fork()
    if pid == 0:  # the child: only os._exit leaves it (never pytest's own code)
        status = 1
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # time for a handler to run
            status = 0
        finally:
            os._exit(status)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


# A process that forks as megatron-core's checkpoint writer does (a multiprocessing "fork"
# child, which forks its own workers), then waits; its children would outlive it forever.
FORKS_WRITERS = """
import multiprocessing, time
from megatron_vlm.lifecycle import forked_children_die_with_parent

def writer():
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,))
    worker.start()
    time.sleep(600)

forked_children_die_with_parent()
multiprocessing.get_context("fork").Process(target=writer).start()
time.sleep(600)
"""


def test_forked_helpers_and_their_children_die_with_the_trainer(tmp_path):
    """megatron-core's background writer can hang after its trainer died (and keep the port
    the trainer listened on); a tiny checkpoint's writer is done before that shows, so this
    stands in for it."""
    token, log = uuid.uuid4().hex, tmp_path / "stderr"
    proc = start([sys.executable, "-c", FORKS_WRITERS], token, log)
    try:
        wait_for("the writer and its worker", lambda: len(marked_processes(token)) == 3, proc,
                 log, seconds=60)
        proc.kill()
        proc.wait()
    finally:
        left = wait_until_none_marked(token, GONE_WITHIN)
    assert left == {}, f"left running {GONE_WITHIN} s after their parent's SIGKILL: {left}"


@pytest.mark.slow  # whole runs killed; the async-save kill and Ctrl-C tests stay in the default tier
def test_sigkill_of_torchrun_during_a_save_leaves_no_process(tmp_path):
    """torchrun's workers run in sessions of their own: a SIGKILL of torchrun (or of its
    process group) used to leave both workers training, each with its helpers."""
    out = tmp_path / "run"
    before, left = sigkill_while_saving(
        torchrun_command("pretrain_vlm.py", [*TINY, "train.train_iters=1000", f"output_dir={out}",
                                             "checkpoint.save_interval=3"], nproc=2, module=False),
        out, tmp_path)
    assert len(before) >= 5, before  # torchrun, two workers and their helpers
    assert left == {}, f"left running {GONE_WITHIN} s after torchrun's SIGKILL: {left}"


# A lone process as pretrain_vlm.py starts it, holding its process group until the other one
# holds its own: the two certainly overlap (two real training runs only probably would). It
# writes the port it took into its file.
LONE_PROCESS = """
import os, sys, time
from pathlib import Path
from megatron_vlm.logs import configure_logging
from megatron_vlm.runtime.distributed import init_process_group_only, shutdown
configure_logging()
init_process_group_only(device="cpu")
Path(sys.argv[1]).write_text(os.environ["MASTER_PORT"])
deadline = time.monotonic() + 120
while not Path(sys.argv[2]).exists() and time.monotonic() < deadline:
    time.sleep(0.05)
shutdown()
"""


@pytest.mark.slow  # whole runs killed; the async-save kill and Ctrl-C tests stay in the default tier
def test_two_single_process_runs_at_once_pick_their_own_ports(tmp_path):
    """Without MASTER_PORT a lone process used the same fixed port every time: a second run on
    the machine died with EADDRINUSE. Each now takes a free port, and says which only when
    asked (MEGATRON_VLM_LOG_LEVEL=DEBUG): every single-process run used to print it."""
    from megatron_vlm.logs import LOG_LEVEL_ENV

    procs, logs = [], []
    token = uuid.uuid4().hex
    try:
        for me, other, level in (("a", "b", "DEBUG"), ("b", "a", "")):
            logs.append(tmp_path / f"{me}.stderr")
            procs.append(start([sys.executable, "-c", LONE_PROCESS, str(tmp_path / me),
                                str(tmp_path / other)], token, logs[-1], **{LOG_LEVEL_ENV: level}))
        statuses = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
        wait_until_none_marked(token, GONE_WITHIN)
    texts = [log.read_text() for log in logs]
    assert statuses == [0, 0], "\n\n".join(t[-2000:] for t in texts)
    ports = [(tmp_path / me).read_text() for me in ("a", "b")]
    assert ports[0] != ports[1]
    said = [re.findall(r"MASTER_PORT not set; this process uses free port (\d+)", t)
            for t in texts]
    assert said == [[ports[0]], []], texts


@pytest.mark.slow  # whole runs killed; the async-save kill and Ctrl-C tests stay in the default tier
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_rank_killed_mid_step_ends_the_job_with_one_line(tmp_path):
    """A dead rank used to end the job with about ninety lines of gloo tracebacks. Now the
    surviving rank says which rank stopped and where, in one line, with the traceback in a
    file, and every process of the job is gone. torchrun polls its workers every
    ``--monitor-interval`` seconds and then stops the survivors: at its default (0.1 s) it may
    stop rank 0 before gloo tells rank 0 anything (then torchrun's summary alone names the
    dead rank); 5 s leaves the survivor the time to report."""
    token, out, log = uuid.uuid4().hex, tmp_path / "run", tmp_path / "stderr"
    cmd = torchrun_command("pretrain_vlm.py", [*TINY, "train.train_iters=100000",
                                               f"output_dir={out}", "parallel.timeout_minutes=1"],
                           nproc=2, module=False, launcher=["--monitor-interval", "5"])
    proc = start(cmd, token, log)
    try:
        metrics = out / "metrics.jsonl"
        wait_for("five training steps",
                 lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 5,
                 proc, log)
        rank1 = [pid for pid in marked_processes(token) if _rank_of(pid) == "1"]
        assert len(rank1) == 1, rank1  # no helper yet: no checkpoint is saved
        killed = time.monotonic()
        os.kill(rank1[0], signal.SIGKILL)
        status = proc.wait(timeout=60)  # parallel.timeout_minutes=1
        took = time.monotonic() - killed
    finally:
        left = wait_until_none_marked(token, GONE_WITHIN)
    stderr = log.read_text()
    assert status != 0 and took < 60
    assert left == {}, left
    lines = [line for line in stderr.splitlines() if line.startswith("pretrain_vlm: error:")]
    assert len(lines) == 1, stderr[-3000:]
    details = out / "logs" / "rank0.err"
    assert re.fullmatch(r"pretrain_vlm: error: rank 1 stopped: rank 0 lost its connection to "
                        r"it during .+ after step \d+; details in " + re.escape(str(details)),
                        lines[0]), lines[0]
    assert "[rank0]:" not in stderr and "pair.cc" not in stderr  # no gloo traceback on screen
    assert "Traceback" in details.read_text() and "gloo" in details.read_text()


def _rank_of(pid: int) -> str | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [item[5:].decode() for item in env if item.startswith(b"RANK=")]
    return ranks[0] if ranks else None
