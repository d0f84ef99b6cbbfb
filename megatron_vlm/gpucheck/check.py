"""The GPU check's command line and its run: the plan, the results folder, the signals, the
guardian, and summary.json's last word.

Results go to the folder named by ``$OUT`` when it is set, else ``--out``. The exit status is
0 when every step passed, 1 when one failed or ran out of its budget, 2 for a command line the
check cannot run or a machine without a usable CUDA torch, and 128 + the signal's number when
SIGTERM, SIGINT or SIGHUP stopped it (the running command is stopped first).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from megatron_vlm.gpucheck import manifest as mf
from megatron_vlm.gpucheck import stages, steps
from megatron_vlm.gpucheck.children import DEFAULT_TAIL_KIB, Runner, become_subreaper
from megatron_vlm.gpucheck.guardian import Guardian
from megatron_vlm.gpucheck.stages import BadInput
from megatron_vlm.gpucheck.summary import SUMMARY, Summary, format_table

REPO = steps.REPO
KEEP_TE_WHEEL_MIB = 15  # a file that size still comes back from a GPU machine (16 MiB each)

DESCRIPTION = "The GPU checks in stages that each fit one command on a GPU machine."
EPILOG = """\
stages (--stages, run in the order given; every plan starts with the CUDA check):
  probe    the machine: GPUs and driver (nvidia-smi), CPUs, memory, disk, nvcc, torch's
           CUDA/cuDNN/NCCL, the installed packages
  install  the --groups from the wheelhouse, offline, into --venv (which sees this machine's
           torch); this checkout, editable; the imports
  test     pytest -m gpu tests/gpu, --tests all | sync | te (the Transformer Engine tests are
           left out where TE does not import: they fail, not skip, without it)
  bench    bench/train_throughput.py for each of --recipes, --variants, its JSON in OUT,
           folded into summary.json after every variant
  te       Transformer Engine built here (its own command: about 8 minutes)

Each stage has a budget (--dry-run prints them); its commands are stopped when it is spent and
the check goes on with the next stage. Results go to $OUT when it is set, else --out:
summary.json (rewritten after every step and benchmark variant), one log per stage (probe.log,
install.log, tests.log, bench.log, te.log: each command's last --log-kib KiB) and
bench_RECIPE.json.

The first light, from the repository root (carry wheelhouse/batch00 and
wheelhouse/manifest.json):
  python tools/gpu_check.py --stages probe,install,test,bench --recipes 79m
  python tools/gpu_check.py --stages install,bench,test --recipes 1b --tests sync
  python tools/gpu_check.py --stages te        # once every copy of group te is there

Exit status: 0 every step passed, 1 a step failed or ran out of its budget, 2 bad input or no
usable CUDA torch, 128+N stopped by signal N."""


class Interrupted(BaseException):
    """SIGTERM, SIGINT or SIGHUP reached the check (raised once, in the main thread)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = stages.OneLineParser(prog="gpu_check.py", description=DESCRIPTION, epilog=EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(stages.DEFAULT_STAGES),
                        help=f"comma-separated, from {', '.join(stages.STAGES)} (default "
                             f"%(default)s)")
    parser.add_argument("--recipes", default=",".join(stages.DEFAULT_RECIPES),
                        help=f"the bench stage's recipes, from {', '.join(stages.BENCH_BUDGETS)} "
                             f"(default %(default)s)")
    parser.add_argument("--variants", default=stages.DEFAULT_VARIANTS,
                        help="the bench stage's --variants (default %(default)s)")
    parser.add_argument("--tests", default="all", choices=stages.TESTS,
                        help="the test stage's selection (default %(default)s)")
    parser.add_argument("--groups", default=",".join(mf.CHECK_GROUPS),
                        help="the wheelhouse groups the install stage installs (default "
                             "%(default)s; also train, extra)")
    parser.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS",
                        help="another budget for a stage (cuda too; bench: per recipe)")
    parser.add_argument("--wheelhouse", default=str(REPO / "wheelhouse"),
                        help="the wheelhouse folder (manifest.json and batchNN/ folders)")
    parser.add_argument("--out", default=str(REPO / "gpu_check_out"),
                        help="where results go when $OUT is not set")
    parser.add_argument("--venv", default=str(REPO / ".gpu_venv"),
                        help="virtual environment to install into, or 'none' for this Python")
    parser.add_argument("--quick", action="store_true", help="short benchmark runs")
    parser.add_argument("--log-kib", type=int, default=DEFAULT_TAIL_KIB,
                        help="KiB of each command's output kept, its last (default %(default)s)")
    parser.add_argument("--keep-te-wheel-mib", type=float, default=KEEP_TE_WHEEL_MIB,
                        help="copy the built transformer_engine_torch wheel to OUT when it is at "
                             "most this size (default %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan with each stage's budget and what to carry; run "
                             "nothing")
    args = parser.parse_args(argv)
    try:
        args.stage_list = stages.split_list(args.stages, "--stages", stages.STAGES)
        args.recipes = stages.split_list(args.recipes, "--recipes", list(stages.BENCH_BUDGETS))
        args.groups = stages.split_list(args.groups, "--groups", [*mf.GROUPS, "extra"])
        args.budgets = stages.parse_budgets(args.budget)
        if args.log_kib <= 0:
            raise BadInput("--log-kib must be positive")
    except BadInput as err:
        parser.error(str(err))
    return args


def results_folder(args) -> Path:
    return Path(os.environ.get("OUT") or args.out).resolve()


def shown_path(path: str) -> str:
    """``path`` relative to the checkout when it is inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return path


def carry_lines(args) -> List[str]:
    """Which wheelhouse paths the plan's install and te stages need, from the manifest."""
    needed = (list(args.groups) if "install" in args.stage_list else []) \
        + (["te"] if "te" in args.stage_list else [])
    if not needed:
        return ["carry: no wheelhouse copy (no install or te stage)"]
    house = Path(args.wheelhouse)
    shown = shown_path(args.wheelhouse)
    try:
        manifest = mf.load_manifest(house)
        dirs = mf.batches_for(manifest, needed)
    except mf.WheelhouseError as err:
        return [f"carry: {shown}/{mf.MANIFEST} and the copies of groups {', '.join(needed)} "
                f"({err})"]
    paths = [f"{shown}/{d}" for d in dirs] + [f"{shown}/{mf.MANIFEST}"]
    lines = [f"carry: {' '.join(paths)}  (groups {', '.join(needed)})"]
    if len(dirs) > 1:
        lines.append(f"  note: {len(dirs)} copies: one command carries one copy with the "
                     f"working tree, so bring the others in earlier commands on the same machine")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    plan = stages.make_plan(args.stage_list, args.recipes, args.budgets, args.groups,
                            args.tests, args.variants, shown_path(args.venv))
    out = results_folder(args)
    if args.dry_run:
        print(f"gpu_check plan (results to {out}):")
        for line in stages.plan_lines(plan) + carry_lines(args):
            print(line)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    subreaper = become_subreaper()
    guardian = Guardian()
    interrupted: List[int] = []

    def on_signal(signum, frame):
        if not interrupted:  # once: a second signal must not cut the cleanup short
            interrupted.append(signum)
            raise Interrupted(signum)

    handlers = {s: signal.signal(s, on_signal)
                for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    state, code = "finished", 0
    summary: Optional[Summary] = None
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
            summary = Summary(out / SUMMARY, plan, argv)
            summary.data["out"] = str(out)
            runner = Runner(sweep_orphans=subreaper, keep=[guardian.pid])
            ctx = steps.Context(args, out, Path(work), summary, runner)
            try:
                code = run_plan(ctx, plan)
            except Interrupted as stop:
                state, code = "interrupted", 128 + stop.signum
                runner.sweep()  # in case the signal came while a command was being stopped
                steps.say(f"interrupted by signal {stop.signum}; the running command was "
                          f"stopped", sys.stderr)
            finally:
                summary.interrupt_running()
                summary.finish(state, code)
    except Interrupted as stop:  # before the summary existed
        state, code = "interrupted", 128 + stop.signum
    finally:
        guardian.stand_down()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if summary is not None:
        for line in format_table(summary.data):
            print(line, flush=True)
    return code


def run_plan(ctx: steps.Context, plan: List[dict]) -> int:
    """The CUDA check, then each slot within its budget; the exit status."""
    ctx.begin(plan[0])
    if ctx.step("cuda", lambda: steps.cuda_check(ctx)) != "ok":
        print(f"gpu_check: {ctx.summary.data['steps'][-1]['detail']}", file=sys.stderr)
        return 2
    for slot in plan[1:]:
        ctx.begin(slot)
        steps.STAGE_RUNNERS[slot["stage"]](ctx, slot)
    return 1 if ctx.summary.failed() else 0
