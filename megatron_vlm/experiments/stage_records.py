"""What each finished stage run of a sweep was run with, so a rerun reuses nothing silently.

A run counts as done by its results (:func:`megatron_vlm.experiments.execute.stage_done`): the
final checkpoint, a complete ``results.json``, the data stage's ``creates``. Those say nothing
about the settings that made them, so editing a stage's config and rerunning a sweep would skip
the stage. When a run completes, the runner therefore writes its **stage record**
(:func:`write_record`), ``sweep_stage.json`` in its run directory (the data stage:
``OUTPUT_ROOT/sweep_stage.data.json``):

* ``settings``: a training run's whole config as loaded with every override (so an edited
  YAML file, an edited override and a changed axis all show), an evaluation's command line,
  the data stage's command and ``creates``;
* ``needs``: the record id of every run it started from, so a run whose input run ran again
  since is noticed too;
* ``record_id``: a digest of the above and the time it finished.

Before anything runs, :func:`check_records` compares every done run with what the sweep gives
it now. A done run is *stale* when its settings differ, when a run it needs ran again since,
or when a run it needs is stale or will run (it would be kept on top of new inputs). Stale runs
stop the sweep with one line naming them and the changed settings (:func:`refuse_stale`);
``tools/sweep.py --rerun-changed`` moves their directories aside instead
(:func:`move_aside`), so they run again and nothing is deleted. A done run without a record
(made before records were kept, by a SLURM job, which writes none, or, for the data stage, by
another sweep sharing its output) is reused with a note.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_vlm.experiments.plan import Plan, StageRun
from megatron_vlm.fsutil import write_json_atomic

RECORD_NAME = "sweep_stage.json"
RECORD_FORMAT = "megatron-vlm-sweep-stage"
_SHOWN = 4  # changed settings / stale runs named in the one-line refusal

Done = Callable[[StageRun], Optional[str]]


def record_path(plan: Plan, run: StageRun) -> Path:
    """Where ``run``'s stage record lives: next to its outputs."""
    if run.run_dir is None:  # the data stage: its 'creates' may be shared by other sweeps
        return plan.spec.output_root / RECORD_NAME.replace(".json", ".data.json")
    return run.run_dir / RECORD_NAME


def run_settings(run: StageRun) -> dict[str, Any]:
    """What ``run`` is run with, flattened to ``{"dotted.key": value}`` (JSON values)."""
    if run.stage == "data":
        raw: dict[str, Any] = {"command": list(run.args),
                               "creates": str(run.creates) if run.creates else None}
    elif run.resolved is not None:
        raw = {"entry": run.entry, "config": run.resolved}
    else:
        raw = {"entry": run.entry, "args": [str(a) for a in run.args]}
    return _flatten(json.loads(json.dumps(raw, default=str)))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def read_record(plan: Plan, run: StageRun) -> Optional[dict]:
    """``run``'s stage record, or None when there is none (or it is unreadable: the run's
    results are then treated like those of a run without a record)."""
    try:
        record = json.loads(record_path(plan, run).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def _record_id(plan: Plan, run_id: str) -> Optional[str]:
    record = read_record(plan, plan.run(run_id))
    return record.get("record_id") if record else None


def write_record(plan: Plan, run: StageRun) -> Optional[Path]:
    """Records what ``run`` was run with; called when it has completed. A data command without
    ``creates`` runs every time and gets no record (its reruns must not make later runs look
    started from other data)."""
    if run.stage == "data" and run.creates is None:
        return None
    body = {"format": RECORD_FORMAT, "run": run.id, "stage": run.stage,
            "settings": run_settings(run),
            "needs": {need: _record_id(plan, need) for need in run.needs},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    # The clock in nanoseconds too: a run that completes again with the same settings (a new
    # checkpoint) still gets a new id, which the runs started from it compare with.
    body["record_id"] = hashlib.sha256(
        (json.dumps(body, sort_keys=True) + str(time.time_ns())).encode()).hexdigest()[:16]
    path = record_path(plan, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, body)
    return path


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


# How often a run saves and how many checkpoints it keeps change nothing it produced: a finished
# run whose config differs only there (the quickstart's stages gained save intervals, say) is
# still what the sweep asks for.
RESULT_NEUTRAL = ("config.checkpoint.save_interval", "config.checkpoint.keep_last",
                  "config.checkpoint.async_save")


def setting_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs (``(none)`` where one side lacks it),
    except the :data:`RESULT_NEUTRAL` ones."""
    changes = []
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key, ...) == new.get(key, ...) or key in RESULT_NEUTRAL:
            continue
        a = _short(old[key]) if key in old else "(none)"
        b = _short(new[key]) if key in new else "(none)"
        if isinstance(old.get(key), list) and isinstance(new.get(key), list):
            gone = [x for x in old[key] if x not in new[key]]
            added = [x for x in new[key] if x not in old[key]]
            if gone or added:
                a, b = _short(gone), _short(added)
        changes.append(f"{key}: {a} -> {b}")
    return changes


def check_records(plan: Plan, done: Done) -> tuple[dict[str, str], list[str]]:
    """``({stale run id: why}, [ids of done runs without a record])`` over the plan's runs
    (module docstring); ``done`` tells whether a run's results exist."""
    stale: dict[str, str] = {}
    will_run: set[str] = set()
    unrecorded: list[str] = []
    for run in plan.runs:
        if not done(run):
            # A data command without 'creates' runs every time (it must be idempotent): its
            # rerun gives the same data and makes no later run stale.
            if not (run.stage == "data" and run.creates is None):
                will_run.add(run.id)
            continue
        redone = [need for need in run.needs if need in will_run or need in stale]
        if redone:
            stale[run.id] = f"it started from {redone[0]}, which runs again"
            continue
        record = read_record(plan, run)
        if record is None:
            unrecorded.append(run.id)
            continue
        changes = setting_changes(record.get("settings") or {}, run_settings(run))
        if changes:
            more = f"; {len(changes) - _SHOWN} more" if len(changes) > _SHOWN else ""
            stale[run.id] = "; ".join(changes[:_SHOWN]) + more
            continue
        for need in run.needs:
            if (record.get("needs") or {}).get(need) != _record_id(plan, need):
                stale[run.id] = f"{need} ran again since it finished"
                break
    return stale, unrecorded


def stale_message(plan: Plan, stale: dict[str, str]) -> str:
    """The one line that refuses to reuse ``stale`` runs."""
    items = [f"{run_id} ({why})" for run_id, why in stale.items()]
    more = f", and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    where: list[Path] = []
    for run_id in stale:  # an evaluation inside its training run's directory goes with it
        path = plan.run(run_id).run_dir or plan.run(run_id).creates
        if not any(path.is_relative_to(parent) for parent in where):
            where.append(path)
    dirs = ", ".join(map(str, where[:_SHOWN])) + (" ..." if len(where) > _SHOWN else "")
    return (f"finished runs of sweep {plan.spec.name} do not match what the sweep gives them "
            f"now: {', '.join(items[:_SHOWN])}{more}; to run them again move aside or delete "
            f"{dirs} (tools/sweep.py --rerun-changed moves them aside), or give the sweep "
            f"another output_root")


def refuse_stale(plan: Plan, done: Done) -> list[str]:
    """ValueError (:func:`stale_message`) when a done run is stale; else the console notes to
    print (runs reused without a record)."""
    stale, unrecorded = check_records(plan, done)
    if stale:
        raise ValueError(stale_message(plan, stale))
    if not unrecorded:
        return []
    return [f"note: {len(unrecorded)} finished run(s) have no record of their settings "
            f"({', '.join(unrecorded[:_SHOWN])}{' ...' if len(unrecorded) > _SHOWN else ''}: "
            f"made before records were kept, by a SLURM job, or by another sweep sharing the "
            f"data) and are reused unchecked"]


def move_aside(plan: Plan, stale: dict[str, str]) -> list[tuple[Path, Path]]:
    """Renames the directories of the ``stale`` runs to ``<dir>.replaced-<time>`` so that they
    run again; returns ``(old, new)`` per move. A stale data stage is refused (ValueError):
    its output may be shared with other sweeps, so it is not moved here."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moves: list[tuple[Path, Path]] = []
    for run_id in stale:
        run = plan.run(run_id)
        if run.run_dir is None:
            raise ValueError(f"the data stage of sweep {plan.spec.name} finished with other "
                             f"settings ({stale[run_id]}); --rerun-changed does not redo it: "
                             f"delete {run.creates} (and what its command made) yourself")
        if not run.run_dir.exists() or any(run.run_dir.is_relative_to(old) for old, _ in moves):
            continue  # already moved with the training run it belongs to
        target = run.run_dir.with_name(f"{run.run_dir.name}.replaced-{stamp}")
        run.run_dir.rename(target)
        moves.append((run.run_dir, target))
    return moves
