"""Running a plan: the local runner (one stage at a time) and the SLURM writer.

**What counts as done** (:func:`stage_done`), checked before each run, so a rerun of a sweep
skips what exists and resumes what was interrupted: a training run whose final checkpoint is
complete (``checkpoints/step_<train_iters>/common.json``); an evaluation whose ``results.json``
holds every task of the suite at the sweep's limit, for that final checkpoint; the data stage
when ``data.creates`` exists (without it the command always runs: make it idempotent). An
interrupted training run resumes from its latest checkpoint (the entry points do that); an
interrupted evaluation keeps the tasks it finished (tools/evaluate_vlm.py skips them). A done
run is reused only when its stage record says it ran with what the sweep gives it now
(:mod:`megatron_vlm.experiments.stage_records`: written when a run completes, checked before
anything runs; a mismatch stops the sweep with one line).

**Local runner** (:class:`LocalRunner`): each run is a subprocess of the real entry point
(``python SCRIPT`` with one process, ``python -m torch.distributed.run --standalone
--nproc_per_node N SCRIPT`` with more), started in the working directory, its output appended to
its log file (``OUTPUT_ROOT/logs/<run>.log``), never to the console. The console gets one line
when a run starts and one when it is done or skipped, with seconds. A failed run stops the
sweep with :class:`StageFailed` (one line: the run, its exit status, its log). Each child runs
in its own process group (its own session); on SIGINT or SIGTERM the runner sends SIGTERM to
that whole group, SIGKILL after a grace period, waits until no process of the group is left,
and raises :class:`Interrupted`. The child also gets SIGTERM if the runner itself dies
(Linux ``PR_SET_PDEATHSIG``), so even a SIGKILLed sweep does not leave training behind.

**Commands that parse** (:func:`check_commands`): before anything runs (and in a dry run),
every run's command is parsed by its entry point's own argument parser, without running it, and
must read what the plan means by it (:attr:`StageRun.parses_to`), so a command that would fail
at its first word, hours into a sweep, stops the sweep before it starts.

**SLURM** (:func:`write_slurm`): one job script per run not yet done, and ``submit.sh``, which
submits them in dependency order, each with ``--dependency=afterok:<the jobs it needs>``
(``--kill-on-invalid-dep=yes``: a failed job cancels what depends on it). Training and
evaluation jobs run ``srun torchrun`` with a c10d rendezvous on the job's first node, as
examples/*/slurm.sbatch do.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional

from megatron_vlm.experiments.plan import ENTRIES, RESULTS_FILE, Plan, StageRun
from megatron_vlm.experiments.stage_records import refuse_stale, write_record
from megatron_vlm.lifecycle import die_with_parent

REPO = Path(__file__).resolve().parents[2]
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_SECONDS = 10.0


# ---------------------------------------------------------------------------------------------
# Done or not


def stage_done(run: StageRun) -> Optional[str]:
    """Why ``run`` needs not run (its results exist), or None."""
    if run.stage == "data":
        return f"{run.creates} exists" if run.creates and run.creates.exists() else None
    if run.stage == "evaluate":
        return _evaluation_done(run)
    if (run.final_checkpoint / "common.json").is_file():
        return f"final checkpoint {run.final_checkpoint.name} exists"
    return None


def _result_path(run: StageRun) -> Optional[Path]:
    """What a finished run leaves behind (what :func:`stage_done` looks for)."""
    if run.stage == "data":
        return run.creates
    if run.stage == "evaluate":
        return run.run_dir / RESULTS_FILE
    return run.final_checkpoint


def _evaluation_done(run: StageRun) -> Optional[str]:
    path = run.run_dir / RESULTS_FILE
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    tasks = results.get("tasks") or {}
    for task in run.tasks:
        entry = tasks.get(task)
        if not isinstance(entry, dict) or (entry.get("settings") or {}).get("limit") != run.limit:
            return None
    scored = Path(str((results.get("checkpoint") or {}).get("path", ""))).name
    if run.final_checkpoint is not None and scored != run.final_checkpoint.name:
        return None  # results of an older checkpoint of the run
    if not results.get("stable_score"):
        return None
    return f"{path} holds all {len(run.tasks)} tasks"


# ---------------------------------------------------------------------------------------------
# Commands that parse


class _Unparsable(Exception):
    """What an entry point's parser would have printed before exiting."""


def _refuse(message: str) -> None:
    raise _Unparsable(message)


@functools.lru_cache(maxsize=None)
def _script(entry: str):
    spec = importlib.util.spec_from_file_location(f"_entry_{Path(entry).stem}", REPO / entry)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entry_parser(entry: str) -> argparse.ArgumentParser:
    """The argument parser of an entry point (a script relative to the repository), built
    without running it: pretrain_vlm.py and finetune_vlm.py are both
    :func:`megatron_vlm.cli.run_training_entry`; a tool has ``build_parser()``."""
    if entry in (ENTRIES["text"], ENTRIES["finetune"]):
        from megatron_vlm.cli import training_parser

        return training_parser(Path(entry).stem)
    return _script(entry).build_parser()


def check_commands(plan: Plan) -> None:
    """Parses every run's command as its entry point will (module docstring); ValueError, one
    line naming the sweep file, the run and the problem, for the first that does not parse or
    reads something else than the plan means."""
    for run in plan.runs:
        if run.entry is None:
            continue  # the data command is the user's own, run as written
        parser = entry_parser(run.entry)
        parser.error = _refuse  # argparse would print its usage and exit
        try:
            args = parser.parse_intermixed_args([str(a) for a in run.args])
        except _Unparsable as err:
            raise ValueError(f"{plan.spec.path}: run {run.id}: its command does not parse "
                             f"({run.entry}: {err}): {run.command_text()}") from None
        for name, meant in run.parses_to.items():
            if getattr(args, name) != meant:
                raise ValueError(f"{plan.spec.path}: run {run.id}: its command gives {name} "
                                 f"{getattr(args, name)!r} where the sweep means {meant!r}: "
                                 f"{run.command_text()}")


# ---------------------------------------------------------------------------------------------
# Local runs


class StageFailed(RuntimeError):
    """A run exited with an error; the message is the one line the sweep ends with."""


class Interrupted(Exception):
    """The sweep got SIGINT or SIGTERM; the running child and its processes are gone."""

    def __init__(self, signum: int, run: Optional[StageRun] = None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run = run


def local_command(run: StageRun, nproc: int = 1) -> list[str]:
    """The argv that runs ``run`` here (``python`` of the data command is this interpreter)."""
    if run.entry is None:
        argv = list(run.args)
        if argv and argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        return argv
    script = str(REPO / run.entry)
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(nproc), script, *run.args]
    return [sys.executable, script, *run.args]


def _child_setup() -> None:  # runs in the child between fork and exec
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    # SIGTERM, not SIGKILL: a torchrun child then stops its workers itself.
    die_with_parent(signal.SIGTERM)  # best effort (Linux): the child goes when the sweep dies


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(proc: subprocess.Popen, grace: float = GRACE_SECONDS) -> None:
    """SIGTERM to the child's whole process group, SIGKILL after ``grace`` seconds; returns
    once the child is reaped and no process of its group is left."""
    pgid = proc.pid  # the child leads its own session, hence its own group
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()
            if proc.returncode is not None and not _group_alive(pgid):
                return
            time.sleep(0.05)
    proc.wait()


@dataclass
class RunSummary:
    ran: list[str]
    skipped: list[str]
    seconds: float


class LocalRunner:
    """Runs a plan's runs in order, here (see the module docstring)."""

    def __init__(self, plan: Plan, nproc: int = 1, out: Optional[IO[str]] = None,
                 grace: float = GRACE_SECONDS):
        if nproc < 1:
            raise ValueError(f"--nproc must be at least 1, got {nproc}")
        self.plan, self.nproc, self.grace = plan, nproc, grace
        self.out = out or sys.stdout
        self._stopping = False

    def say(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {text}", file=self.out, flush=True)

    def run(self) -> RunSummary:
        plan = self.plan
        runs = plan.runs
        done_before = sum(1 for r in runs if stage_done(r))
        notes = refuse_stale(plan, stage_done)  # a done run with other settings: one line
        self.say(f"sweep {plan.spec.name}: {len(runs)} runs ({done_before} done already) for "
                 f"{len(plan.points)} grid points; output {plan.spec.output_root}, logs in "
                 f"{plan.spec.output_root / 'logs'}")
        for note in notes:
            self.say(note)
        ran, skipped, start = [], [], time.monotonic()
        with self._signals():
            for i, run in enumerate(runs, 1):
                label = f"[{i}/{len(runs)}] {run.id}"
                reason = stage_done(run)
                if reason:
                    self.say(f"{label}: skipped ({reason})")
                    skipped.append(run.id)
                    continue
                self.say(f"{label}: start (log {run.log})")
                began = time.monotonic()
                status = self._spawn(run)
                seconds = time.monotonic() - began
                if status != 0:
                    raise StageFailed(f"run {run.id} failed with exit status {status} after "
                                      f"{seconds:.1f} s; log: {run.log}{_last_line(run.log)}")
                if (run.stage != "data" or run.creates) and not stage_done(run):
                    raise StageFailed(f"run {run.id} exited 0 after {seconds:.1f} s but "
                                      f"{_result_path(run)} is missing or incomplete; log: "
                                      f"{run.log}")
                write_record(plan, run)
                self.say(f"{label}: done in {seconds:.1f} s")
                ran.append(run.id)
        total = time.monotonic() - start
        self.say(f"sweep {plan.spec.name}: all {len(runs)} runs done (ran {len(ran)}, skipped "
                 f"{len(skipped)}) in {total:.1f} s")
        return RunSummary(ran, skipped, total)

    @contextlib.contextmanager
    def _signals(self):
        def stop(signum, _frame):
            if self._stopping:
                return  # already stopping: a second Ctrl-C does not cut the cleanup short
            self._stopping = True
            raise Interrupted(signum)

        previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _spawn(self, run: StageRun) -> int:
        cmd = local_command(run, self.nproc)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        if self.nproc == 1:
            # A lone process binds a free port itself (runtime.distributed); an inherited one
            # could be another run's.
            env.pop("MASTER_PORT", None)
        run.log.parent.mkdir(parents=True, exist_ok=True)
        with open(run.log, "ab") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
            log.flush()
            proc = None
            try:
                # Signals wait until the child exists, so an interrupt always finds it.
                old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
                try:
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env,
                                            start_new_session=True, preexec_fn=_child_setup)
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, old)
                return proc.wait()
            except Interrupted as err:
                if proc is not None:
                    kill_group(proc, self.grace)
                err.run = run
                raise
            except BaseException:
                if proc is not None:
                    kill_group(proc, self.grace)
                raise


def _last_line(log: Path) -> str:
    """`` (last line: ...)`` from the end of a log, when it is short enough to help."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [part.strip() for line in tail.splitlines() for part in line.split("\r")]
    lines = [line for line in lines if line]
    if not lines or len(lines[-1]) > 240:
        return ""
    return f" (last line: {lines[-1]})"


# ---------------------------------------------------------------------------------------------
# SLURM


def _job_name(plan: Plan, run: StageRun) -> str:
    return f"{plan.spec.name}-{run.id.replace('/', '-')}"


def job_script(plan: Plan, run: StageRun, workdir: Path) -> str:
    """The sbatch script of one run."""
    slurm = plan.spec.slurm
    logs = (workdir / plan.spec.output_root / "logs").resolve()
    lines = ["#!/bin/bash",
             f"# Sweep {plan.spec.name}, run {run.id} (written by tools/sweep.py --slurm; "
             "submit.sh submits it after the runs it needs).",
             f"#SBATCH --job-name={_job_name(plan, run)}",
             f"#SBATCH --nodes={slurm.nodes_for(run.stage)}",
             "#SBATCH --ntasks-per-node=1"]
    if run.stage != "data":
        lines.append(f"#SBATCH --gpus-per-node={slurm.gpus_per_node}")
    lines.append(f"#SBATCH --output={logs}/{run.id.replace('/', '-')}-%j.out")
    lines += [f"#SBATCH {arg}" for arg in slurm.sbatch_args]
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(workdir))}",
              'if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then',
              "  source .venv/bin/activate", "fi", *slurm.setup]
    if run.entry is None:
        lines.append(shlex.join(run.args))
        return "\n".join(lines) + "\n"
    srun = " ".join(["srun", "--kill-on-bad-exit=1", *map(shlex.quote, slurm.srun_args)])
    lines += ['MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              f"{srun} \\",
              f'  torchrun --nnodes "$SLURM_NNODES" --nproc_per_node {slurm.gpus_per_node} \\',
              '    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d '
              '--rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" \\',
              f"    {shlex.join([run.entry, *map(str, run.args)])}"]
    return "\n".join(lines) + "\n"


def write_slurm(plan: Plan, out_dir: Path, workdir: Optional[Path] = None) -> list[Path]:
    """Job scripts for the runs not done yet plus ``submit.sh``; returns the files written.
    Dependencies on runs already done are dropped (their results exist)."""
    workdir = (workdir or Path.cwd()).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs: dict[str, str] = {}
    written: list[Path] = []
    submit = ["#!/bin/bash",
              f"# Submits the jobs of sweep {plan.spec.name} in dependency order: each waits for "
              "the jobs it needs",
              "# (sbatch --dependency=afterok; a failed job cancels its dependents). Written by "
              "tools/sweep.py --slurm.",
              "set -euo pipefail", 'cd "$(dirname "${BASH_SOURCE[0]}")"']
    for run in plan.runs:
        if stage_done(run):
            submit.append(f"# {run.id}: done already ({stage_done(run)})")
            continue
        var = f"job_{len(jobs) + 1}"
        script = out_dir / f"{len(jobs) + 1:03d}_{run.id.replace('/', '_')}.sbatch"
        script.write_text(job_script(plan, run, workdir))
        script.chmod(0o755)
        written.append(script)
        deps = [jobs[need] for need in run.needs if need in jobs]
        dep = (" --kill-on-invalid-dep=yes --dependency=afterok:"
               + ":".join(f"${{{d}}}" for d in deps)) if deps else ""
        submit += [f"{var}=$(sbatch --parsable{dep} {script.name})", f"{var}=${{{var}%%;*}}",
                   f'echo "{run.id}: job ${{{var}}}"']
        jobs[run.id] = var
    path = out_dir / "submit.sh"
    path.write_text("\n".join(submit) + "\n")
    path.chmod(0o755)
    return [*written, path]
