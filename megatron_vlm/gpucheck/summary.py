"""summary.json, rewritten after every step (and every benchmark variant), and the table printed
from it; the pytest and throughput results folded into it.

summary.json is the check's record: the plan with each stage's budget, the device, each step
with its status (ok, failed, timeout, skipped), seconds and a one-line detail, the step that is
running (left there when the check is killed), the test counts and failed test ids, and the
throughput rows of each recipe. It is written through a temporary file and os.replace, so a
kill at any moment leaves the previous whole file.
"""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

from megatron_vlm.fsutil import write_json_atomic

SUMMARY = "summary.json"
FORMAT = 1
# Throughput columns, in this order; a key also matches with a suffix (mfu_bf16_peak).
THROUGHPUT_KEYS = ("variant", "precision", "tokens_per_s", "step_s", "tflops", "mfu",
                   "peak_mem_gib", "ratio", "note")
_RESULT = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class Summary:
    """The check's summary.json, rewritten whole after every change."""

    def __init__(self, path: Path, plan: List[dict], argv: List[str]):
        self.path = Path(path)
        self._start = time.monotonic()
        self.data = {"format": FORMAT, "argv": argv, "state": "running", "exit_status": None,
                     "started": _now(), "updated": None, "elapsed_s": 0.0, "plan": plan,
                     "device": None, "machine": None, "steps": [], "running": None,
                     "tests": None, "throughput": {}, "logs": {}}
        self.write()

    def write(self) -> None:
        self.data["updated"] = _now()
        self.data["elapsed_s"] = round(time.monotonic() - self._start, 1)
        write_json_atomic(self.path, self.data)

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.write()

    def begin_step(self, stage: str, name: str, budget_left: float) -> None:
        self.data["running"] = {"stage": stage, "step": name, "started": _now(),
                                "budget_left_s": round(budget_left, 1)}
        self.write()

    def end_step(self, stage: str, name: str, status: str, seconds: float,
                 detail: str) -> None:
        self.data["steps"].append({"stage": stage, "step": name, "status": status,
                                   "seconds": round(seconds, 1), "detail": detail})
        self.data["running"] = None
        self.write()

    def interrupt_running(self) -> None:
        """Records the step in flight, if any, as interrupted (the check was stopped)."""
        running = self.data["running"]
        if running:
            self.data["steps"].append({"stage": running["stage"], "step": running["step"],
                                       "status": "interrupted", "seconds": None,
                                       "detail": "stopped by a signal"})
            self.data["running"] = None
            self.write()

    def finish(self, state: str, exit_status: int) -> None:
        self.data["state"], self.data["exit_status"] = state, exit_status
        self.write()

    def failed(self, *names: str) -> bool:
        """Whether a step (of those named, or any) failed or ran out of time."""
        return any(s["status"] in ("failed", "timeout") for s in self.data["steps"]
                   if not names or s["step"] in names)

    def status_of(self, name: str) -> Optional[str]:
        found = [s["status"] for s in self.data["steps"] if s["step"] == name]
        return found[-1] if found else None


def parse_junit(path: Path) -> Optional[dict]:
    """Passed/failed/skipped counts and failed test ids from a pytest JUnit XML file."""
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failed_tests": []}
    for case in root.iter("testcase"):
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            counts["failed"] += 1
            module = case.get("classname", "").replace(".", "/")
            counts["failed_tests"].append(f"{module}.py::{case.get('name')}")
        elif "skipped" in tags:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def parse_pytest_output(text: str) -> dict:
    """The counts so far from ``pytest -v`` output (the per-test result lines), for a run that
    is still going or was stopped before it wrote its JUnit file."""
    outcome: Dict[str, str] = {}
    for line in text.splitlines():
        match = _RESULT.match(line)
        if match:
            test, word = match.groups()
            kind = {"PASSED": "passed", "XPASS": "passed", "SKIPPED": "skipped",
                    "XFAIL": "skipped"}.get(word, "failed")
            if outcome.get(test) != "failed":  # an error in teardown after a pass still fails
                outcome[test] = kind
    counts = {k: sum(1 for v in outcome.values() if v == k) for k in ("passed", "failed",
                                                                       "skipped")}
    counts["failed_tests"] = [t for t, v in outcome.items() if v == "failed"]
    deselected = re.findall(r"(\d+) deselected", text)
    if deselected:
        counts["deselected"] = int(deselected[-1])
    return counts


def throughput_rows(data) -> List[dict]:
    """The rows of a throughput record: a list of objects, an object holding such a list
    (``{"rows": [...], ...}``, what bench/train_throughput.py writes), or an object of objects
    keyed by variant."""
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list) and v
                 and all(isinstance(r, dict) for r in v)]
        if lists:
            data = lists[0]
        elif data and all(isinstance(v, dict) for v in data.values()):
            data = [dict(r, variant=r.get("variant", k)) for k, r in data.items()]
        else:
            data = [data]
    return [r for r in data if isinstance(r, dict)]


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value[:60]
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def format_table(data: dict) -> List[str]:
    """The table printed at the end: steps, test counts, failed tests, throughput rows."""
    device = data.get("device") or {}
    head = (f"GPU check summary ({data['state']}): {device.get('name', 'no device')}, torch "
            f"{device.get('torch')}, CUDA {device.get('cuda')}, Python {device.get('python')}")
    lines = [head, f"{'stage':<8} {'step':<16} {'status':<8} {'seconds':>8}  detail"]
    for step in data["steps"]:
        seconds = "" if step["seconds"] is None else f"{step['seconds']:.1f}"
        lines.append(f"{step['stage']:<8} {step['step']:<16} {step['status']:<8} "
                     f"{seconds:>8}  {step['detail'][:100]}")
    if data.get("running"):
        lines.append(f"{data['running']['stage']:<8} {data['running']['step']:<16} "
                     f"{'stopped':<8} {'':>8}  still running when the check was stopped")
    tests = data.get("tests")
    if tests:
        extra = f", {tests['deselected']} deselected" if tests.get("deselected") else ""
        lines.append(f"pytest -m gpu ({tests.get('selection', '')}): {tests['passed']} passed, "
                     f"{tests['failed']} failed, {tests['skipped']} skipped{extra}")
        lines += [f"  failed: {name}" for name in tests["failed_tests"]]
    for recipe, record in data.get("throughput", {}).items():
        rows = throughput_rows(record)
        if not rows:
            continue
        present = list(dict.fromkeys(k for r in rows for k in r))
        keys = [k for p in THROUGHPUT_KEYS for k in present if k == p or k.startswith(p + "_")] \
            or [k for k in present if not isinstance(rows[0].get(k), (dict, list))]
        widths = [max(len(k), *(len(_cell(r.get(k, ""))) for r in rows)) for k in keys]
        complete = record.get("complete", True) if isinstance(record, dict) else True
        done = "" if complete else " (incomplete)"
        lines.append(f"throughput {recipe}{done}:")
        lines.append("  " + "  ".join(k.ljust(w) for k, w in zip(keys, widths)))
        for row in rows:
            lines.append("  " + "  ".join(_cell(row.get(k, "")).ljust(w)
                                          for k, w in zip(keys, widths)))
    return [line.rstrip() for line in lines]
