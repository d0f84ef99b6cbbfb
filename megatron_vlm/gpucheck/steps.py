"""The steps of each stage of the GPU check, and the context they share (the stage's clock and
log, the environment, summary.json).

Every step is recorded in summary.json the moment it ends (and the running step when it
starts), so whatever kills the check, the steps that finished are on record. A step's commands
get what is left of the stage's budget; a step that starts after the budget is spent is
skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

from megatron_vlm.gpucheck import install
from megatron_vlm.gpucheck import manifest as mf
from megatron_vlm.gpucheck.children import TIMEOUT, CappedLog, Runner
from megatron_vlm.gpucheck.stages import StepFailed, StepSkipped
from megatron_vlm.gpucheck.summary import Summary, parse_junit, parse_pytest_output, \
    throughput_rows

REPO = Path(__file__).resolve().parents[2]
BENCH_SCRIPT = REPO / "bench" / "train_throughput.py"
NO_CUDA = "no CUDA device is visible; was the container started with --gpus?"
# The log file of each stage, in OUT: a GPU machine gives back at most 8 files, and a
# first-light command leaves six (summary.json, four logs, one benchmark JSON).
STAGE_LOGS = {"cuda": "probe", "probe": "probe", "install": "install", "test": "tests",
              "bench": "bench", "te": "te"}


class Context:
    """What the steps share: the runner, the results folder, the environment and the clock of
    the running stage."""

    def __init__(self, args, out: Path, work: Path, summary: Summary, runner: Runner):
        self.args, self.out, self.work, self.summary, self.runner = args, out, work, summary, runner
        self.repo = REPO
        self.python = sys.executable
        self.device: dict = {}
        self.manifest: Optional[dict] = None
        self.folders: List[Path] = []
        self.environment_ready = False
        self.deadline = float("inf")
        self.stage = ""
        self._logs: Dict[str, CappedLog] = {}

    @property
    def stage_log(self) -> CappedLog:
        name = STAGE_LOGS[self.stage]
        if name not in self._logs:
            self._logs[name] = CappedLog(self.out / f"{name}.log", self.args.log_kib * 1024)
            self.summary.data["logs"][self.stage] = f"{name}.log"
        return self._logs[name]

    def begin(self, slot: dict) -> None:
        self.stage = slot["stage"]
        self.deadline = time.monotonic() + slot["budget_s"]
        say(f"== {slot['slot']} (budget {slot['budget_s']} s)")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd, log: CappedLog, env: Optional[dict] = None,
            on_tick: Optional[Callable[[], None]] = None) -> int:
        """Runs ``cmd`` from the checkout within what is left of the stage's budget."""
        if self.left() <= 0:
            log.note("not started: the stage's budget is spent")
            return TIMEOUT
        return self.runner.run(cmd, log, self.left(), env=env, cwd=self.repo, on_tick=on_tick)

    def step(self, name: str, action: Callable[[], Optional[str]]) -> str:
        """Runs one step; records ok / failed / timeout / skipped, its seconds and a one-line
        detail in summary.json at once."""
        start = time.monotonic()
        if self.left() <= 0:
            status, detail = "skipped", "the stage's budget is spent"
        else:
            self.summary.begin_step(self.stage, name, self.left())
            try:
                detail, status = action() or "", "ok"
            except StepSkipped as why:
                detail, status = str(why), "skipped"
            except StepFailed as why:
                detail, status = str(why), "timeout" if self.left() <= 0 else "failed"
            except (mf.WheelhouseError, OSError, ValueError, RuntimeError, KeyError,
                    subprocess.SubprocessError) as err:
                first = (str(err).splitlines() or [""])[0]
                detail, status = f"{type(err).__name__}: {first}", "failed"
                self.stage_log.note(traceback.format_exc().rstrip())
        seconds = time.monotonic() - start
        self.summary.end_step(self.stage, name, status, seconds, detail)
        line = f"{name}: {status} ({seconds:.1f} s){': ' + detail if detail else ''}"
        self.stage_log.note(line)
        say(line)
        return status


def say(line: str, stream=None) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", file=stream or sys.stdout, flush=True)


# ---------------------------------------------------------------------------------------------
# The stages
# ---------------------------------------------------------------------------------------------


def cuda_check(ctx: Context) -> str:
    """torch imports and sees a CUDA device (every plan's first step)."""
    device = install.probe(ctx, sys.executable, install.CUDA_PROBE, ctx.stage_log)
    ctx.summary.set("device", device)
    if "error" in device:
        raise StepFailed(f"torch is not importable by {sys.executable} ({device['error']}); "
                         f"this check needs a CUDA build of torch")
    if not device["available"]:
        build = f"built for CUDA {device['cuda']}" if device["cuda"] else "a CPU-only build"
        raise StepFailed(f"{NO_CUDA} (torch {device['torch']} is {build})")
    ctx.device = device
    arch = "".join(map(str, device["capability"]))
    return (f"{device['count']} x {device['name']} (sm_{arch}, {device['memory_gib']} GiB), "
            f"torch {device['torch']}, CUDA {device['cuda']}, Python {device['python']}")


def probe_stage(ctx: Context, slot: dict) -> None:
    def machine() -> str:
        found = install.probe(ctx, sys.executable, install.MACHINE_PROBE, ctx.stage_log)
        ctx.summary.set("machine", found)
        nvcc = (found.get("nvcc") or ["none"])[-1]
        return (f"{found.get('cpus')} CPUs, {found.get('memory_gib')} GiB, "
                f"{found.get('disk_free_gib')} GiB free disk, nvcc: {nvcc}, "
                f"{len(found.get('packages', {}))} packages installed")
    ctx.step("machine", machine)


def _load_manifest(ctx: Context) -> dict:
    if ctx.manifest is None:
        manifest = mf.load_manifest(Path(ctx.args.wheelhouse))
        want = manifest["python_version"]
        if not ctx.device["python"].startswith(want + "."):
            raise StepFailed(f"the wheelhouse is for Python {want}, this machine runs "
                             f"{ctx.device['python']}: rebuild it with WHEEL_PYTHON=...")
        ctx.manifest = manifest
    return ctx.manifest


def _make_environment(ctx: Context) -> bool:
    """The "venv" step: the environment to install into; whether there is one."""
    def venv() -> str:
        ctx.python = install.environment(ctx, ctx.args.venv, create=True)
        return ctx.python
    return ctx.step("venv", venv) == "ok"


def install_stage(ctx: Context, slot: dict) -> None:
    groups = ctx.args.groups

    def wheelhouse() -> str:
        manifest = _load_manifest(ctx)
        ctx.folders = mf.verify_groups(Path(ctx.args.wheelhouse), manifest, groups)
        count = len(mf.files_for(manifest, groups))
        torch_note = ("" if ctx.device["torch"].split("+")[0] == manifest["torch"] else
                      f"; resolved for torch {manifest['torch']}, this machine has "
                      f"{ctx.device['torch']}")
        return (f"groups {', '.join(groups)}: {count} files verified in "
                f"{', '.join(mf.batches_for(manifest, groups))}{torch_note}")

    if not _make_environment(ctx) or ctx.step("wheelhouse", wheelhouse) != "ok":
        return
    for name in groups:
        if ctx.step(f"install {name}", lambda name=name: install.install_group(
                ctx, ctx.manifest, name, ctx.folders)) != "ok":
            return
    if ctx.step("project", lambda: install.install_project(ctx, ctx.folders)) != "ok":
        return

    def imports() -> str:
        versions = install.check_imports(ctx, groups)
        ctx.summary.set("versions", versions)
        return ", ".join(f"{k} {v}" for k, v in versions.items())
    ctx.environment_ready = ctx.step("imports", imports) == "ok"


def _with_checkout() -> dict:
    """The environment with this checkout first on PYTHONPATH, so the tests and the benchmark
    import it where the install stage did not run (a machine with everything installed)."""
    paths = [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def _environment_broken(ctx: Context) -> bool:
    """True when this run's install stage ran and did not end with working imports."""
    ran = any(s["stage"] == "install" for s in ctx.summary.data["steps"])
    return ran and not ctx.environment_ready


def _test_python(ctx: Context) -> str:
    if not ctx.environment_ready and ctx.python == sys.executable:
        ctx.python = install.environment(ctx, ctx.args.venv, create=False)
    return ctx.python


def test_stage(ctx: Context, slot: dict) -> None:
    selection = ctx.args.tests

    def pytest() -> str:
        if _environment_broken(ctx):
            raise StepSkipped("the install stage failed")
        python = _test_python(ctx)
        xml = ctx.work / "tests.xml"
        xml.unlink(missing_ok=True)
        log = ctx.stage_log
        cmd = [python, "-m", "pytest", "-m", "gpu", "tests/gpu", "-v", "-rfE",
               "-p", "no:cacheprovider", "-p", "megatron_vlm.gpucheck.pytest_te",
               "--te-tests", "only" if selection == "te" else "auto", "--junitxml", xml]
        if selection == "sync":
            cmd += ["-k", "sync"]
        env = dict(_with_checkout(), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        last: List[dict] = [{}]

        def fold(final: bool = False) -> dict:
            counts = parse_pytest_output(log.output())
            if final:
                counts = dict(parse_junit(xml) or counts,
                              **{k: v for k, v in counts.items() if k == "deselected"})
            counts.update(selection=selection, complete=final and xml.is_file())
            if counts != last[0]:
                last[0] = counts
                ctx.summary.set("tests", counts)
            return counts

        status = ctx.run(cmd, log, env=env, on_tick=fold)
        counts = fold(final=True)
        done = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} "
                f"skipped" + (f", {counts['deselected']} deselected"
                              if counts.get("deselected") else ""))
        if status == TIMEOUT:
            raise StepFailed(f"stopped at the stage's budget after {done}; see {log.path.name}")
        if status == 5:
            raise StepFailed(f"pytest selected no tests ({selection}); see {log.path.name}")
        if status != 0:
            raise StepFailed(f"{done}; see {log.path.name}")
        return done
    ctx.step("pytest", pytest)


def bench_stage(ctx: Context, slot: dict) -> None:
    recipe = slot["recipe"]

    def bench() -> str:
        if _environment_broken(ctx):
            raise StepSkipped("the install stage failed")
        script = BENCH_SCRIPT
        if not script.is_file():
            raise StepSkipped("bench not found")
        python = _test_python(ctx)
        target = ctx.out / f"bench_{recipe}.json"
        target.unlink(missing_ok=True)
        seen: List[Optional[tuple]] = [None]

        def fold() -> None:
            """Folds the benchmark's JSON (rewritten after each variant) into summary.json."""
            try:
                stat = target.stat()
                if (stat.st_mtime_ns, stat.st_size) == seen[0]:
                    return
                record = json.loads(target.read_text())
            except (OSError, ValueError):  # not there yet
                return
            seen[0] = (stat.st_mtime_ns, stat.st_size)
            ctx.summary.data["throughput"][recipe] = record
            ctx.summary.write()

        cmd = [python, script, "--recipe", recipe, "--variants", ctx.args.variants,
               "--json", target] + (["--quick"] if ctx.args.quick else [])
        status = ctx.run(cmd, ctx.stage_log, env=_with_checkout(), on_tick=fold)
        fold()
        record = ctx.summary.data["throughput"].get(recipe)
        rows = throughput_rows(record) if record else []
        measured = [r for r in rows if r.get("tokens_per_s") is not None]
        done = ", ".join(f"{r['variant']} {r['tokens_per_s']:,.0f} tok/s" for r in measured)
        if status == TIMEOUT:
            raise StepFailed(f"stopped at its budget after {len(rows)} variants"
                             f"{': ' + done if done else ''}")
        if not rows:
            raise StepFailed(f"exit {status}, no rows in {target.name}; see bench.log")
        if status != 0:
            errors = [f"{r['variant']}: {r.get('note')}" for r in rows
                      if str(r.get("note", "")).startswith("error")]
            raise StepFailed(f"exit {status}; {'; '.join(errors) or done}; see bench.log")
        return done or f"{len(rows)} variants, none measured"
    ctx.step(f"bench {recipe}", bench)


def te_stage(ctx: Context, slot: dict) -> None:
    def check() -> str:
        te = _load_manifest(ctx).get("te")
        if not te:
            raise StepFailed("the wheelhouse has no Transformer Engine (built with TE=none)")
        refusal = install.te_cuda_refusal(te, ctx.device)
        if refusal:
            raise StepFailed(refusal)
        return f"transformer_engine_cu{te['cuda']} {te['version']} for torch's CUDA " \
               f"{ctx.device['cuda']}"

    def wheelhouse() -> str:
        ctx.folders = mf.verify_groups(Path(ctx.args.wheelhouse), ctx.manifest, ["te"])
        return (f"{len(mf.files_for(ctx.manifest, ['te']))} files verified in "
                f"{', '.join(mf.batches_for(ctx.manifest, ['te']))}")

    def imports() -> str:
        return f"transformer_engine {install.te_version(ctx)} imports"

    if not ctx.environment_ready and not _make_environment(ctx):
        return
    if ctx.device.get("transformer_engine_dist"):
        ctx.step("te import", imports)  # this machine's own
        return
    if ctx.step("te check", check) != "ok" or ctx.step("te wheelhouse", wheelhouse) != "ok":
        return
    if ctx.step("te build", lambda: install.build_te(ctx, ctx.manifest, ctx.folders,
                                                     ctx.args.keep_te_wheel_mib)) == "ok":
        ctx.step("te import", imports)


# Which function runs each stage (a test replaces entries to run fake stages on a CPU).
STAGE_RUNNERS: Dict[str, Callable[[Context, dict], None]] = {
    "probe": probe_stage, "install": install_stage, "test": test_stage, "bench": bench_stage,
    "te": te_stage,
}
