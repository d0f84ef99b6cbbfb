"""A GPU check killed mid-stage (megatron_vlm/gpucheck/{check,steps,children,guardian}.py), on
the CPU: the steps that finished are in summary.json, the benchmark's rows reach summary.json
while it runs, and no process the check started outlives it, whether the check is SIGKILLed
alone, its whole process group is SIGKILLed (a machine's time limit), or it gets SIGTERM.

The check runs from a small driver script that replaces the CUDA check and the stages with fake
ones (no CUDA here); everything else is the check's own code: the runner, the log, the
summary, the signals and the guardian.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

DRIVER = r"""
import sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from megatron_vlm.gpucheck import check, steps

SLEEPER = '''
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
Path = __import__("pathlib").Path
Path(sys.argv[1] + ".tmp").write_text("%d %d %d %d" % (os.getpid(), grandchild.pid,
                                       os.getpgid(0), os.getppid()))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
'''
FAKE_BENCH = '''
import json, os, sys, time
path = sys.argv[sys.argv.index("--json") + 1]
rows = []
for variant, speed in (("torch", 1000.0), ("torch+compile", 1500.0)):
    rows.append({{"variant": variant, "tokens_per_s": speed, "note": ""}})
    with open(path + ".tmp", "w") as f:
        json.dump({{"complete": False, "rows": rows}}, f)
    os.replace(path + ".tmp", path)
    time.sleep(0.5)
time.sleep(600)
'''


def fake_cuda(ctx):
    ctx.device = {{"python": "3.12.0", "torch": "2.11.0+cu130", "cuda": "13.0", "name": "fake",
                   "capability": [9, 0], "count": 1, "memory_gib": 80.0}}
    ctx.summary.set("device", ctx.device)
    return "a fake device"


def quick_stage(ctx, slot):
    ctx.step("quick", lambda: "done")


def sleeping_stage(ctx, slot):
    def sleeper():
        ctx.run([sys.executable, "-c", SLEEPER, {pids!r}], ctx.stage_log)
        return "woke up"
    ctx.step("sleeper", sleeper)


bench = Path({tmp!r}) / "fake_bench.py"
bench.write_text(FAKE_BENCH)
steps.cuda_check = fake_cuda
steps.BENCH_SCRIPT = bench
steps.STAGE_RUNNERS["probe"] = quick_stage
steps.STAGE_RUNNERS["test"] = sleeping_stage
sys.exit(check.main(sys.argv[1:]))
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _marked(mark: str) -> list:
    """Running processes whose environment holds ``mark`` (everything the check started)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        if mark.encode() in environ and _running(int(name)):
            found.append(int(name))
    return found


def _wait_for(condition, what: str, proc, limit: float = 120.0) -> None:
    """Polls ``condition`` (no timing is asserted: the limit only ends a broken run)."""
    deadline = time.monotonic() + limit
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the check ended (exit {proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.1)


def _start(tmp_path, *args):
    driver = tmp_path / "driver.py"
    pids = tmp_path / "pids"
    driver.write_text(DRIVER.format(repo=str(REPO), pids=str(pids), tmp=str(tmp_path)))
    mark = f"GPU_CHECK_TEST_MARK={uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(OUT=str(tmp_path / "out"), GPU_CHECK_TEST_MARK=mark.split("=", 1)[1])
    # Its own session, as a check started from a shell would lead its own process group.
    proc = subprocess.Popen([sys.executable, str(driver), "--venv", "none", *args], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    return proc, pids, mark


def _summary(tmp_path) -> dict:
    return json.loads((tmp_path / "out" / "summary.json").read_text())


@pytest.mark.parametrize("how", ["sigkill", "group-sigkill", "sigterm"])
def test_a_killed_check_keeps_its_steps_and_leaves_no_process(tmp_path, how):
    proc, pids, mark = _start(tmp_path, "--stages", "probe,test")
    _wait_for(pids.exists, "the command under test started", proc)
    child, grandchild, child_group, child_parent = map(int, pids.read_text().split())
    # The command runs in the check's process group (no session of its own), as its child.
    assert child_group == os.getpgid(proc.pid) == proc.pid and child_parent == proc.pid
    assert _running(child) and _running(grandchild)
    before = _summary(tmp_path)
    assert before["running"]["step"] == "sleeper"
    if how == "sigkill":
        os.kill(proc.pid, signal.SIGKILL)
    elif how == "group-sigkill":
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    # A process on its way out may no longer show its environment (so it is not marked) while
    # /proc still lists it as running: wait for both, as a busy machine shows that moment.
    _wait_for(lambda: not _marked(mark) and not _running(child) and not _running(grandchild),
              "every process of the check to end", None, limit=30)

    summary = _summary(tmp_path)
    done = [(s["stage"], s["step"], s["status"]) for s in summary["steps"]]
    assert done[:2] == [("cuda", "cuda", "ok"), ("probe", "quick", "ok")]
    if how == "sigterm":
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert summary["state"] == "interrupted" and summary["exit_status"] == 143
        assert done[2] == ("test", "sleeper", "interrupted") and summary["running"] is None
        log = (tmp_path / "out" / "tests.log").read_text()
        assert "interrupted: the check was stopped" in log
        assert "GPU check summary (interrupted)" in out
    else:
        assert proc.returncode == -signal.SIGKILL
        # Killed without a word: the record says which step was running.
        assert summary["state"] == "running" and summary["running"]["step"] == "sleeper"


def test_benchmark_rows_reach_summary_while_it_runs(tmp_path):
    proc, _, mark = _start(tmp_path, "--stages", "bench", "--recipes", "tiny")

    def two_rows() -> bool:
        try:
            record = _summary(tmp_path)["throughput"].get("tiny")
        except (OSError, ValueError):
            return False
        return bool(record) and len(record["rows"]) == 2
    _wait_for(two_rows, "two benchmark rows in summary.json", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    _wait_for(lambda: not _marked(mark), "every process of the check to end", None, limit=30)
    summary = _summary(tmp_path)
    rows = summary["throughput"]["tiny"]["rows"]
    assert [(r["variant"], r["tokens_per_s"]) for r in rows] == [("torch", 1000.0),
                                                                 ("torch+compile", 1500.0)]
    assert summary["running"]["step"] == "bench tiny"
    # The benchmark's own JSON is in OUT too.
    assert json.loads((tmp_path / "out" / "bench_tiny.json").read_text())["rows"] == rows
