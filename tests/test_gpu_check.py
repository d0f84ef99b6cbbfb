"""The staged GPU check (tools/gpu_check.py, megatron_vlm/gpucheck/) on the CPU.

Covered here: the command line and its one-line errors, the plan's budgets (each stage fits one
command; the default plan fits a session), the no-CUDA exit, the results folder, summary.json
rewritten after every step, the table, the pytest and JUnit counts, the runner (a time limit
stops a command and what it started; a command dies with a SIGKILLed parent; logs keep their
tail), the plugin that selects the Transformer Engine tests, the refusals of a torchvision or a
TE core wheel built for another torch, and that the training path imports none of what the
wheelhouse leaves out. tests/test_gpu_check_kill.py kills whole checks; the slow test here
builds a wheelhouse for this machine and installs from it offline with the check's own code.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from megatron_vlm.gpucheck import check, install, stages, steps
from megatron_vlm.gpucheck import manifest as mf
from megatron_vlm.gpucheck.children import TIMEOUT, CappedLog, Runner
from megatron_vlm.gpucheck.summary import Summary, format_table, parse_junit, \
    parse_pytest_output, throughput_rows

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "gpu_check.py"


def _run_tool(*args, timeout=120, env=None):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


def _plan(*args) -> dict:
    """slot -> budget seconds, from --dry-run's output (and its total)."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = _run_tool("--dry-run", *args, env=env)
    assert done.returncode == 0, done.stderr
    found = dict(re.findall(r"^  (\S+(?: \S+)?)\s+(\d+) s  ", done.stdout, re.M))
    return {slot: int(seconds) for slot, seconds in found.items()}


def test_help_names_the_stages_and_the_first_light():
    done = _run_tool("--help")
    assert done.returncode == 0, done.stderr
    for option in ("--stages", "--recipes", "--tests", "--groups", "--budget", "--out",
                   "--wheelhouse", "--dry-run", "--log-kib"):
        assert option in done.stdout
    for stage in stages.STAGES:
        assert f"\n  {stage} " in done.stdout
    assert "pytest -m gpu tests/gpu" in done.stdout
    assert "--stages probe,install,test,bench --recipes 79m" in done.stdout
    assert "--stages install,bench,test --recipes 1b --tests sync" in done.stdout


def test_dry_run_budgets_fit_one_command_each_and_a_session_in_all():
    default = _plan()
    total = default.pop("total")
    assert list(default) == ["cuda", "probe", "install", "test", "bench 79m"]  # no te
    assert total == sum(default.values()) <= 8 * 60  # the first check: at most 8 minutes
    assert total <= 11 * 60 and all(b < 9 * 60 for b in default.values())
    te = _plan("--stages", "te")
    assert set(te) == {"cuda", "te", "total"} and te["total"] < 9 * 60
    second = _plan("--stages", "install,bench,test", "--recipes", "1b", "--tests", "sync")
    assert list(second) == ["cuda", "install", "bench 1b", "test", "total"]
    assert second["total"] < 9 * 60
    assert _plan("--budget", "test=200", "--budget", "bench=99")["bench 79m"] == 99


def test_dry_run_names_what_to_carry(tmp_path):
    house = tmp_path / "wh"
    house.mkdir()
    manifest = {"format": mf.FORMAT, "python_version": "3.12", "torch": "2.11.0", "files": [],
                "batches": [{"dir": f"batch{i:02d}", "size": 1, "files": []} for i in range(3)],
                "groups": [{"name": "core", "packages": [], "batches": ["batch00"]},
                           {"name": "encoder", "packages": [], "batches": ["batch00"]},
                           {"name": "te", "packages": [], "batches": ["batch00", "batch02"]}]}
    (house / mf.MANIFEST).write_text(json.dumps(manifest))
    done = _run_tool("--dry-run", "--wheelhouse", house)
    assert f"carry: {house}/batch00 {house}/manifest.json  (groups core, encoder)" in done.stdout
    done = _run_tool("--dry-run", "--wheelhouse", house, "--stages", "te")
    assert f"carry: {house}/batch00 {house}/batch02 {house}/manifest.json" in done.stdout
    assert "bring the others in earlier commands" in done.stdout
    done = _run_tool("--dry-run", "--wheelhouse", tmp_path / "none")
    assert "carry: " in done.stdout and "manifest.json not found" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--stages", "probe,foo"], "--stages: unknown foo; choose from probe, install, test, "
                                "bench, te"),
    (["--stages", "test,test"], "--stages: test given twice"),
    (["--recipes", "7b"], "--recipes: unknown 7b"),
    (["--groups", "core,gpu"], "--groups: unknown gpu"),
    (["--budget", "test=soon"], "--budget test=soon: give STAGE=SECONDS"),
    (["--tests", "fast"], "--tests: invalid choice: 'fast'"),
])
def test_bad_input_is_one_line(args, message):
    done = _run_tool(*args, "--dry-run")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check.py: error: ")
    assert message in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_no_cuda_is_one_line_and_exit_2(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    done = _run_tool("--out", tmp_path / "ignored", "--wheelhouse", tmp_path / "absent", env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("gpu_check: no CUDA device is visible; was the container "
                               "started with --gpus?")
    assert not (tmp_path / "ignored").exists()  # $OUT wins over --out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["state"] == "finished" and summary["exit_status"] == 2
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [("cuda", "failed")]
    assert summary["device"]["available"] is False  # the probe's record is kept
    assert "exit status 0" in (tmp_path / "out" / "probe.log").read_text()


def test_the_tools_import_the_standard_library_alone():
    """Both run on a bare GPU machine before anything is installed."""
    script = ("import sys; sys.path.insert(0, sys.argv[1]); "
              "import megatron_vlm.gpucheck.check, megatron_vlm.gpucheck.build; "
              "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)"
              " - {'__main__', 'megatron_vlm'}))")
    done = subprocess.run([sys.executable, "-S", "-I", "-c", script, str(REPO)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_results_go_to_OUT_when_set(monkeypatch, tmp_path):
    args = check.parse_args(["--out", str(tmp_path / "mine")])
    monkeypatch.delenv("OUT", raising=False)
    assert check.results_folder(args) == tmp_path / "mine"
    monkeypatch.setenv("OUT", str(tmp_path / "theirs"))
    assert check.results_folder(args) == tmp_path / "theirs"


# ---------------------------------------------------------------------------------------------
# summary.json and the table
# ---------------------------------------------------------------------------------------------


def test_summary_is_rewritten_after_each_step(tmp_path):
    path = tmp_path / "summary.json"
    summary = Summary(path, [{"slot": "cuda", "budget_s": 30}], ["--x"])
    assert json.loads(path.read_text())["state"] == "running"
    summary.begin_step("install", "venv", 100.0)
    assert json.loads(path.read_text())["running"]["step"] == "venv"
    summary.end_step("install", "venv", "ok", 1.25, "made")
    on_disk = json.loads(path.read_text())
    assert on_disk["running"] is None
    assert on_disk["steps"] == [{"stage": "install", "step": "venv", "status": "ok",
                                 "seconds": 1.2, "detail": "made"}]
    summary.finish("finished", 0)
    assert json.loads(path.read_text())["exit_status"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary left


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.gpu.test_a" name="test_ok" time="1"/>
<testcase classname="tests.gpu.test_a" name="test_ok2" time="1"/>
<testcase classname="tests.gpu.test_b" name="test_bad" time="1"><failure message="x"/></testcase>
<testcase classname="tests.gpu.test_b" name="test_err" time="1"><error message="y"/></testcase>
<testcase classname="tests.gpu.test_c" name="test_skip" time="0"><skipped message="z"/></testcase>
</testsuite></testsuites>"""

PYTEST_V = """\
tests/gpu/test_a.py::test_ok[local] PASSED                                  [ 20%]
tests/gpu/test_a.py::test_bad FAILED                                        [ 40%]
tests/gpu/test_b.py::test_skip SKIPPED (needs 2 GPUs)                       [ 60%]
tests/gpu/test_b.py::test_teardown PASSED                                   [ 80%]
tests/gpu/test_b.py::test_teardown ERROR                                    [ 80%]
=========== 2 failed, 1 passed, 1 skipped, 6 deselected in 12.00s ===========
"""


def test_pytest_counts_from_junit_and_from_its_output(tmp_path):
    (tmp_path / "t.xml").write_text(JUNIT)
    counts = parse_junit(tmp_path / "t.xml")
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (2, 2, 1)
    assert counts["failed_tests"] == ["tests/gpu/test_b.py::test_bad",
                                      "tests/gpu/test_b.py::test_err"]
    assert parse_junit(tmp_path / "absent.xml") is None
    counts = parse_pytest_output(PYTEST_V)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 2, 1)
    assert counts["failed_tests"] == ["tests/gpu/test_a.py::test_bad",
                                      "tests/gpu/test_b.py::test_teardown"]
    assert counts["deselected"] == 6


def test_summary_table(tmp_path):
    # The shape bench/train_throughput.py writes: {"rows": [...], ...}, None for n/a.
    rows = [{"variant": "torch", "tokens_per_s": 12345.6, "mfu_bf16_peak": 0.41,
             "ratio_vs_torch": 1.0, "loss": 5.5, "note": ""},
            {"variant": "megatron-local", "tokens_per_s": 23456.7, "mfu_bf16_peak": None,
             "ratio_vs_torch": 1.9, "loss": 5.6, "note": "n/a: no CUDA device"}]
    for form in (rows, {"rows": rows, "recipe": "79m"},
                 {r["variant"]: {k: v for k, v in r.items() if k != "variant"} for r in rows}):
        got = throughput_rows(form)
        assert [r["variant"] for r in got] == ["torch", "megatron-local"]
    summary = Summary(tmp_path / "summary.json", [], [])
    summary.data["device"] = {"name": "H200", "torch": "2.11.0", "cuda": "13.0", "python": "3.12"}
    summary.end_step("cuda", "cuda", "ok", 2.0, "1 x H200")
    summary.end_step("te", "te build", "failed", 3.0, "nvcc not found")
    summary.begin_step("test", "pytest", 100.0)
    summary.interrupt_running()
    summary.data["tests"] = dict(parse_junit_counts(), selection="all", deselected=3)
    summary.data["throughput"]["79m"] = {"complete": False, "rows": rows}
    table = format_table(summary.data)
    text = "\n".join(table)
    assert table[0].startswith("GPU check summary (running): H200, torch 2.11.0")
    assert [line.split()[:3] for line in table[2:5]] == [
        ["cuda", "cuda", "ok"], ["te", "te", "build"], ["test", "pytest", "interrupted"]]
    assert "pytest -m gpu (all): 2 passed, 1 failed, 0 skipped, 3 deselected" in text
    assert "  failed: tests/gpu/test_b.py::test_bad" in text
    assert "throughput 79m (incomplete):" in text
    header = next(line for line in table if "tokens_per_s" in line).split()
    # The known keys (a suffix matches too), in their order; others (loss) left out.
    assert header == ["variant", "tokens_per_s", "mfu_bf16_peak", "ratio_vs_torch", "note"]
    assert any(line.split()[:5] == ["megatron-local", "23,457", "n/a", "1.9", "n/a:"]
               for line in table)
    assert summary.failed() and summary.failed("te build") and not summary.failed("cuda")


def parse_junit_counts() -> dict:
    return {"passed": 2, "failed": 1, "skipped": 0,
            "failed_tests": ["tests/gpu/test_b.py::test_bad"]}


# ---------------------------------------------------------------------------------------------
# Commands: time limit, parent death, the log's tail
# ---------------------------------------------------------------------------------------------

SPAWNER = """
import subprocess, sys, time
p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])
open(sys.argv[1], 'w').write(str(p.pid))
time.sleep(300)
"""


def _wait_gone(pid: int, limit: float = 30.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


def test_a_command_past_its_limit_is_stopped_with_its_children(tmp_path):
    marker = tmp_path / "child.pid"
    log = CappedLog(tmp_path / "x.log")
    status = Runner(grace=2.0).run([sys.executable, "-c", SPAWNER, marker], log, timeout=3)
    assert status == TIMEOUT
    assert _wait_gone(int(marker.read_text())), "the grandchild is still running"
    assert "stopped after its 3 s limit" in (tmp_path / "x.log").read_text()


def test_a_command_dies_with_its_killed_parent(tmp_path):
    """The parent-death signal alone (no guardian): SIGKILL the process that ran the command."""
    pid_file = tmp_path / "command.pid"
    parent = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from megatron_vlm.gpucheck.children import CappedLog, Runner
        Runner().run([sys.executable, "-c", "import os, sys, time; "
                      "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(300)",
                      {str(pid_file)!r}], CappedLog({str(tmp_path / 'p.log')!r}), 300)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], start_new_session=True)
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert _wait_gone(int(pid_file.read_text())), "the command outlived its killed parent"


def test_logs_keep_the_tail_of_each_command(tmp_path):
    log = CappedLog(tmp_path / "x.log", tail_bytes=2000)
    log.note("before")
    script = "import sys\nfor i in range(20000): print('line', i)\nsys.exit(3)\n"
    assert Runner().run([sys.executable, "-c", script], log, timeout=120) == 3
    text = (tmp_path / "x.log").read_text()
    assert text.startswith("[gpu_check] before\n$ ")
    assert "bytes of earlier output dropped; the last 1 KiB are kept" in text
    assert "line 19999\n[gpu_check] exit status 3\n" in text and "line 0\n" not in text
    assert len(text) < 2600


# ---------------------------------------------------------------------------------------------
# The Transformer Engine test selection
# ---------------------------------------------------------------------------------------------

TE_TESTS = '''
import pytest

@pytest.fixture
def transformer_engine():
    return True

@pytest.mark.parametrize("te", [False, True], ids=["local", "te"])
def test_steps(te):
    pass

def test_te_spec(transformer_engine):
    pass

def test_no_sync(tmp_path):
    pass
'''


@pytest.mark.parametrize("mode, expected", [
    ("exclude", ["test_no_sync", "test_steps[local]"]),
    ("auto", ["test_no_sync", "test_steps[local]"]),  # no TE on this machine
    ("only", ["test_steps[te]", "test_te_spec"]),
    ("include", ["test_no_sync", "test_steps[local]", "test_steps[te]", "test_te_spec"]),
])
def test_te_tests_are_selected_by_fixture_and_parameter(tmp_path, mode, expected):
    (tmp_path / "test_fake_gpu.py").write_text(TE_TESTS)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "-p", "megatron_vlm.gpucheck.pytest_te",
                           "--te-tests", mode, "test_fake_gpu.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    ids = sorted(line.split("::")[1] for line in done.stdout.splitlines() if "::" in line)
    assert ids == expected


# ---------------------------------------------------------------------------------------------
# Refusals before installing or building
# ---------------------------------------------------------------------------------------------

DEVICE = {"torch": "2.11.0+cu130", "cuda": "13.0", "python": "3.12.3"}
TORCHVISION = {"requirement": "torchvision==0.26.0", "version": "0.26.0", "torch": "==2.11.0",
               "cuda": "13.0"}


def test_torchvision_for_another_torch_is_refused_in_one_line():
    assert install.torchvision_refusal(TORCHVISION, DEVICE) is None
    other_torch = install.torchvision_refusal(TORCHVISION, dict(DEVICE, torch="2.10.0+cu130"))
    assert other_torch == ("the wheelhouse's torchvision==0.26.0 is built for torch 2.11.0, this "
                           "machine has torch 2.10.0+cu130: rebuild the wheelhouse with "
                           "WHEEL_TORCH=2.10.0")
    other_cuda = install.torchvision_refusal(TORCHVISION, dict(DEVICE, cuda="12.8"))
    assert other_cuda.startswith("the wheelhouse's torchvision==0.26.0 is built for CUDA 13.0, "
                                 "this machine's torch for CUDA 12.8")
    assert "\n" not in other_cuda


def test_te_core_for_another_cuda_is_refused_in_one_line():
    te = {"version": "2.11.0", "cuda": "13"}
    assert install.te_cuda_refusal(te, DEVICE) is None
    assert install.te_cuda_refusal(te, dict(DEVICE, cuda="12.8")) == (
        "the wheelhouse's Transformer Engine core is transformer_engine_cu13, this machine's "
        "torch is built for CUDA 12.8: rebuild the wheelhouse with TE_CUDA=12")


# ---------------------------------------------------------------------------------------------
# The training path imports none of what the wheelhouse leaves out
# ---------------------------------------------------------------------------------------------

TRAIN_AND_LIST_MODULES = """
import json, sys
from megatron_vlm.config import load_config
from megatron_vlm.runtime import shutdown
from megatron_vlm.training.loop import train
train(load_config("tiny", ["data.kind=random", "train.train_iters=2", "output_dir=" + sys.argv[1]]))
shutdown()
print("MODULES " + json.dumps(sorted(sys.modules)))
"""


def test_tiny_training_path_imports_no_dali_open_clip_or_lm_eval(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), MASTER_PORT=str(_free_port()))
    done = subprocess.run([sys.executable, "-c", TRAIN_AND_LIST_MODULES, str(tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in reversed(done.stdout.splitlines()) if x.startswith("MODULES "))
    modules = json.loads(line[len("MODULES "):])
    assert "megatron_vlm.training.loop" in modules and "megatron.core" in modules  # it ran
    leaked = [m for m in modules if m.split(".")[0] in ("open_clip", "lm_eval")
              or m == "nvidia.dali" or m.startswith("nvidia.dali.")]
    assert leaked == [], leaked


def _free_port() -> int:
    from distributed import free_port

    return free_port()


# ---------------------------------------------------------------------------------------------
# The closest CPU proof of the install: a wheelhouse for this machine, installed offline
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wheelhouse_for_this_machine_installs_offline(tmp_path, monkeypatch):
    if sys.version_info[:2] != (3, 11) or shutil.which("make") is None:
        pytest.skip("builds for this machine's Python 3.11 with make")
    house = tmp_path / "wheelhouse"
    done = subprocess.run(["make", "wheelhouse", "WHEEL_PYTHON=3.11", "TE=none",
                           f"WHEEL_TORCH={torch.__version__.split('+')[0]}",
                           f"WHEELHOUSE={house}"], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "copy 1/" in done.stdout and "of 64 with the working tree" in done.stdout
    manifest = mf.load_manifest(house)
    assert manifest["te"] is None and "torch" not in manifest["packages"]
    assert not any(name.startswith("nvidia-") for name in manifest["packages"])
    groups = list(mf.CHECK_GROUPS)
    assert mf.batches_for(manifest, groups) == ["batch00"]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    # torch from this machine's local disk first, as the GPU machine has its own.
    done = subprocess.run([python, "-m", "pip", "install", "--quiet",
                           f"torch=={torch.__version__}"],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    # A copy of the project, so the editable install writes nothing into this checkout.
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    shutil.copytree(REPO / "megatron_vlm", project / "megatron_vlm",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))

    # Only the first copy is there: the first check's groups install from it alone.
    for batch in manifest["batches"][1:]:
        shutil.rmtree(house / batch["dir"])
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    # Offline from the wheelhouse alone: no pip configuration's find-links or indexes.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    args = check.parse_args(["--wheelhouse", str(house), "--out", str(out)])
    summary = Summary(out / "summary.json", [], [])
    ctx = steps.Context(args, out, work, summary, Runner())
    ctx.repo, ctx.python = project, python
    ctx.device = {"python": platform.python_version(), "torch": torch.__version__,
                  "cuda": torch.version.cuda}
    ctx.begin({"slot": "install", "stage": "install", "budget_s": 1500})
    folders = mf.verify_groups(house, manifest, groups)
    for name in groups:
        install.install_group(ctx, manifest, name, folders)
    install.install_project(ctx, folders)
    versions = install.check_imports(ctx, groups)
    assert versions["megatron-core"] == "0.16.1" and versions["open_clip_torch"] == "3.3.0"
    assert versions["transformer-engine"] is None
    log = (out / "install.log").read_text()
    assert "--no-index" in log
    assert f"torch=={torch.__version__}" in (work / "constraints.txt").read_text()
