"""The check's stages, their time budgets and the plan ``--dry-run`` prints.

A GPU machine runs one command for at most 10 minutes and a session has about 11 minutes of
GPU time, so the check is cut into stages that each fit one command with a margin; a stage's
commands are stopped when its budget is spent and the check goes on with the next stage. The
default plan (probe, install, test, bench 79m) is the first check, 8 minutes in all; ``te``
builds Transformer Engine's torch extension from source and gets a command of its own.
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

STAGES = ("probe", "install", "test", "bench", "te")
DEFAULT_STAGES = ("probe", "install", "test", "bench")
# Seconds. The CUDA check runs first in every plan (a cold `import torch` takes seconds).
CUDA_BUDGET = 30
BUDGETS = {"probe": 40, "install": 120, "test": 120, "te": 480}
# The benchmark's budget per recipe (torch.compile's warmup is most of it).
BENCH_BUDGETS = {"tiny": 60, "79m": 170, "1b": 240}
DEFAULT_RECIPES = ("79m",)
DEFAULT_VARIANTS = "torch,torch+compile,megatron-local"
TESTS = ("all", "sync", "te")
STAGE_LIMIT = 9 * 60  # each stage leaves a margin in one 10-minute command
COMMAND_LIMIT = 10 * 60
WHAT = {
    "cuda": "torch sees a CUDA device (always first; else one line and exit 2)",
    "probe": "the machine: GPUs and driver (nvidia-smi), CPUs, memory, disk, nvcc, torch's "
             "CUDA/cuDNN/NCCL, the installed packages",
    "install": "groups {groups} from the wheelhouse, offline, into {venv}; this checkout "
               "(editable); the imports",
    "test": "pytest -m gpu tests/gpu ({tests})",
    "bench": "bench/train_throughput.py --recipe {recipe} --variants {variants}",
    "te": "Transformer Engine: its core wheel's CUDA checked against torch's, the wheels "
          "installed, its torch extension built here from the sdist, imported",
}
TESTS_WHAT = {
    "all": "every GPU test; the TE tests only where Transformer Engine imports",
    "sync": "the tests whose names mention sync; TE ones only where TE imports",
    "te": "the Transformer Engine tests only",
}


class StepFailed(Exception):
    """A step that failed; the message is its one-line reason."""


class StepSkipped(Exception):
    """A step that did not run; the message says why."""


class BadInput(ValueError):
    """A command line the check cannot run; the message is one line."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``PROG: error: ...; see --help``), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def split_list(text: str, option: str, allowed: Optional[Sequence[str]] = None) -> List[str]:
    """A comma-separated option value as a list, checked against ``allowed`` and for repeats."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise BadInput(f"{option}: give at least one name")
    unknown = [t for t in items if allowed is not None and t not in allowed]
    if unknown:
        raise BadInput(f"{option}: unknown {', '.join(unknown)}; choose from "
                       f"{', '.join(allowed)}")
    repeated = sorted({t for t in items if items.count(t) > 1})
    if repeated:
        raise BadInput(f"{option}: {', '.join(repeated)} given twice")
    return items


def parse_budgets(pairs: Sequence[str]) -> Dict[str, int]:
    """``--budget STAGE=SECONDS`` values (``cuda`` too; ``bench`` sets every recipe's)."""
    budgets = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in ("cuda", *STAGES) or not value.isdigit() or int(value) <= 0:
            raise BadInput(f"--budget {pair}: give STAGE=SECONDS with a stage of cuda, "
                           f"{', '.join(STAGES)} and a whole number of seconds above 0")
        budgets[name] = int(value)
    return budgets


def make_plan(stages: Sequence[str], recipes: Sequence[str], budgets: Dict[str, int],
              groups: Sequence[str], tests: str, variants: str, venv: str) -> List[dict]:
    """The slots the check runs, in order: {"slot", "stage", "budget_s", "what"} (+ "recipe"
    for a benchmark slot)."""
    plan = [{"slot": "cuda", "stage": "cuda", "budget_s": budgets.get("cuda", CUDA_BUDGET),
             "what": WHAT["cuda"]}]
    for stage in stages:
        if stage == "bench":
            for recipe in recipes:
                plan.append({"slot": f"bench {recipe}", "stage": "bench", "recipe": recipe,
                             "budget_s": budgets.get("bench", BENCH_BUDGETS[recipe]),
                             "what": WHAT["bench"].format(recipe=recipe, variants=variants)})
            continue
        what = WHAT[stage].format(groups=", ".join(groups), venv=venv,
                                  tests=f"{tests}: {TESTS_WHAT[tests]}")
        plan.append({"slot": stage, "stage": stage, "budget_s": budgets.get(stage, BUDGETS[stage]),
                     "what": what})
    return plan


def plan_lines(plan: List[dict]) -> List[str]:
    """The plan as ``--dry-run`` prints it: one line per slot, then the total."""
    width = max(len(s["slot"]) for s in plan)
    lines = [f"  {s['slot']:<{width}}  {s['budget_s']:>4} s  {s['what']}" for s in plan]
    total = sum(s["budget_s"] for s in plan)
    lines.append(f"  {'total':<{width}}  {total:>4} s  ({total / 60:.1f} min)")
    over = [s["slot"] for s in plan if s["budget_s"] > STAGE_LIMIT]
    if over:
        lines.append(f"  note: {', '.join(over)} over {STAGE_LIMIT // 60} minutes: no margin "
                     f"in one {COMMAND_LIMIT // 60}-minute command")
    if total > COMMAND_LIMIT:
        lines.append(f"  note: more than one command's {COMMAND_LIMIT // 60} minutes; run the "
                     f"stages in separate commands")
    return lines

