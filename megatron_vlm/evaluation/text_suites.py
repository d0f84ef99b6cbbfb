"""Named suites of lm-eval text tasks, each reported by one metric: the paper's nine 0-shot
tasks and ShapesWorld's three.

``paper`` (lm-eval 0.4.13 task names; all ``multiple_choice``, so only ``loglikelihood`` runs):

=================================  ===========================================  ========
suite entry                        lm-eval task(s)                              metric
=================================  ===========================================  ========
agieval_lsat                       agieval_lsat_ar, agieval_lsat_lr,             acc_norm
                                   agieval_lsat_rc (unweighted mean of the
                                   three; n = their total)
arc_easy                           arc_easy                                     acc_norm
bigbench_conceptual_combinations   bigbench_conceptual_combinations_            acc
                                   multiple_choice
boolq                              boolq                                        acc
copa                               copa                                         acc
hellaswag                          hellaswag                                    acc_norm
mathqa                             mathqa                                       acc_norm
piqa                               piqa                                         acc_norm
pubmedqa                           pubmedqa                                     acc
=================================  ===========================================  ========

Metric choice: ``acc_norm`` (the choice with the highest log-likelihood per character) wherever
lm-eval's task defines it, ``acc`` where it defines only that. DCLM's suite (LLM-Foundry) picks
the choice with the lowest per-token loss, a length-normalised rule too; lm-eval's ``acc_norm``
is its closest counterpart, and unnormalised ``acc`` favours short answer choices on the tasks
whose choices differ in length (ARC, HellaSwag, PIQA, MathQA, LSAT). The four ``acc``-only tasks
have one-word choices (BoolQ, PubMedQA) or lm-eval defines nothing else for them (COPA,
BIG-bench). AGIEval LSAT is one number in the paper: the mean of the three sections' accuracies,
each section counting equally whatever its size (230 / 510 / 269 questions), with the standard
error of that mean (sections independent).

Offline use (``HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1``): the Hugging Face ``datasets`` cache
(``HF_DATASETS_CACHE`` or ``~/.cache/huggingface/datasets``, filled once on a machine with
network, e.g. by running this suite there with ``limit=1``) must hold the datasets lm-eval 0.4.13
names (``dataset_path`` / ``dataset_name``): ``hails/agieval-lsat-ar``, ``hails/agieval-lsat-lr``,
``hails/agieval-lsat-rc``, ``allenai/ai2_arc`` / ``ARC-Easy``, ``hails/bigbench`` /
``conceptual_combinations_zero_shot``, ``aps/super_glue`` / ``boolq`` and ``copa``,
``Rowan/hellaswag``, ``regisss/math_qa``, ``baber/piqa``, ``bigbio/pubmed_qa`` /
``pubmed_qa_labeled_fold0_source``. Other lm-eval versions may name other dataset paths: keep it
pinned.

``shapesworld``: the tasks tagged ``shapesworld`` in ``include_path`` (a ShapesWorld directory's
``text/tasks``, see docs/synthetic.md): ``shapesworld_arith``, ``shapesworld_count``,
``shapesworld_order``, reported by ``acc`` (their choices are one word each). Only local tasks
are indexed for it (``include_defaults=False``), which takes about a second instead of eight.

:func:`run_text_suite` runs a suite (or a list of entry names from any suite) and returns, per
entry: the metric's value under its own name (``"acc"`` or ``"acc_norm"``), ``"metric_used"``
(that name), ``"score"`` (the same value), ``"stderr"``, ``"n"`` (examples scored) and
``"tasks"`` (the lm-eval tasks it came from); every metric lm-eval reported for a single-task
entry is included as well, and ``"parts"`` (each section's value) for AGIEval LSAT. ``"items"``
holds each document's score (:class:`~megatron_vlm.evaluation.items.TaskItems`, from lm-eval's
logged samples; the runner writes it to ``items/TASK.jsonl``, not into the metrics).
:func:`suite_chance_levels` reads the chance levels a ShapesWorld task folder brings (its
``text/tasks.json``); the built-in levels and the stable score are in
:mod:`megatron_vlm.evaluation.stable_score`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence


@dataclass(frozen=True)
class SuiteTask:
    """One reported number: the lm-eval task(s) it averages and the metric it uses."""

    name: str
    lm_eval_tasks: tuple[str, ...]
    metric: str


PAPER_SUITE: tuple[SuiteTask, ...] = (
    SuiteTask("agieval_lsat", ("agieval_lsat_ar", "agieval_lsat_lr", "agieval_lsat_rc"),
              "acc_norm"),
    SuiteTask("arc_easy", ("arc_easy",), "acc_norm"),
    SuiteTask("bigbench_conceptual_combinations",
              ("bigbench_conceptual_combinations_multiple_choice",), "acc"),
    SuiteTask("boolq", ("boolq",), "acc"),
    SuiteTask("copa", ("copa",), "acc"),
    SuiteTask("hellaswag", ("hellaswag",), "acc_norm"),
    SuiteTask("mathqa", ("mathqa",), "acc_norm"),
    SuiteTask("piqa", ("piqa",), "acc_norm"),
    SuiteTask("pubmedqa", ("pubmedqa",), "acc"),
)

SHAPESWORLD_SUITE: tuple[SuiteTask, ...] = tuple(
    SuiteTask(name, (name,), "acc")
    for name in ("shapesworld_arith", "shapesworld_count", "shapesworld_order"))

SUITES: dict[str, tuple[SuiteTask, ...]] = {"paper": PAPER_SUITE,
                                            "shapesworld": SHAPESWORLD_SUITE}


def suite_tasks(suite: str | Sequence[str]) -> tuple[SuiteTask, ...]:
    """The entries of a named suite, or the named entries (of any suite) when ``suite`` is a
    list of entry names; ValueError naming what is known otherwise."""
    if isinstance(suite, str):
        if suite not in SUITES:
            raise ValueError(f"unknown text suite {suite!r} (known: {', '.join(SUITES)})")
        return SUITES[suite]
    known = {entry.name: entry for entries in SUITES.values() for entry in entries}
    unknown = [name for name in suite if name not in known]
    if unknown or not suite:
        raise ValueError(f"unknown text suite task(s) {', '.join(map(repr, unknown)) or '(none)'}"
                         f" (known: {', '.join(known)})")
    return tuple(known[name] for name in suite)


def suite_task_names(suite: str) -> list[str]:
    """The entry names of a named suite (the names results and chance levels are keyed by)."""
    return [entry.name for entry in suite_tasks(suite)]


def suite_chance_levels(include_path: Optional[str]) -> dict[str, float]:
    """The chance levels a local task folder brings: a ShapesWorld ``text/tasks`` folder has
    them in ``text/tasks.json`` next to it (``{"tasks": {name: {"chance": level}}}``); any other
    folder, or none, brings none."""
    if include_path is None:
        return {}
    manifest = Path(include_path).resolve().parent / "tasks.json"
    if not manifest.is_file():
        return {}
    try:
        tasks = json.loads(manifest.read_text())["tasks"]
        return {name: _chance(manifest, name, entry["chance"]) for name, entry in tasks.items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{manifest}: expected {{\"tasks\": {{NAME: {{\"chance\": LEVEL}}}}}} "
                         f"({type(err).__name__}: {err})") from None


def _chance(manifest: Path, name: str, level: Any) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 <= level < 1:
        raise ValueError(f"{manifest}: task {name!r}: field 'chance' = {level!r} is not a "
                         "number in [0, 1)")
    return float(level)


def make_task_manager(entries: Sequence[SuiteTask], include_path: Optional[str]):
    """lm-eval's TaskManager for these entries: local tasks only when all of them are
    ShapesWorld's (fast), the built-in tasks plus ``include_path`` (if given) otherwise."""
    import os

    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise FileNotFoundError(f"lm-eval task folder (include_path) not found: {include_path}")
    if all(entry in SHAPESWORLD_SUITE for entry in entries):
        if include_path is None:
            raise ValueError("the shapesworld suite needs include_path=DIR/text/tasks (a "
                             "ShapesWorld directory's lm-eval tasks; evaluation.text_tasks)")
        return TaskManager(include_path=include_path, include_defaults=False)
    return TaskManager(include_path=include_path)


def run_text_suite(lm, suite: str | Sequence[str], include_path: Optional[str] = None,
                   limit: Optional[int] = None, num_fewshot: int = 0) -> dict[str, dict]:
    """Runs a named suite (or a list of suite entry names) through ``lm_eval.simple_evaluate``
    on ``lm`` (an lm-eval LM, e.g.
    :class:`~megatron_vlm.evaluation.lm_eval_adapter.MegatronVLMLM`) and returns one record per
    suite entry (see the module docstring). ``limit``: at most this many examples per lm-eval
    task. Every process of a distributed run must call it; all of them get the results."""
    import lm_eval

    entries = suite_tasks(suite)
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
        raise ValueError(f"limit={limit!r} must be a positive integer or None")
    if isinstance(num_fewshot, bool) or int(num_fewshot) != num_fewshot or num_fewshot < 0:
        raise ValueError(f"num_fewshot={num_fewshot!r} must be a non-negative integer")
    task_manager = make_task_manager(entries, include_path)
    names = [t for entry in entries for t in entry.lm_eval_tasks]
    missing = [t for t in names if t not in task_manager.all_tasks]
    if missing:
        where = f" in {include_path}" if include_path else ""
        raise ValueError(f"text suite {_name(suite)}: lm-eval knows no task(s) "
                         f"{', '.join(missing)}{where}")
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=names, num_fewshot=int(num_fewshot),
            limit=None if limit is None else int(limit), task_manager=task_manager,
            log_samples=True)  # the per-document scores become the entries' items
    except ConnectionError as err:  # `datasets` offline without the data set in its cache
        raise FileNotFoundError(
            f"text suite {_name(suite)}: a data set is neither in the local datasets cache nor "
            f"reachable ({err}); fill the cache as megatron_vlm.evaluation.text_suites "
            "describes") from None
    except ValueError as err:  # `datasets`: the data set is cached, but not this config of it
        if not str(err).startswith("Couldn't find cache for"):
            raise
        raise FileNotFoundError(
            f"text suite {_name(suite)}: a data set is not in the local datasets cache "
            f"({' '.join(str(err).split())}); fill the cache as "
            "megatron_vlm.evaluation.text_suites describes") from None
    summary = None if results is None else summarize(results, entries)
    return _share_from_rank0(summary)


def _name(suite: str | Sequence[str]) -> str:
    return repr(suite) if isinstance(suite, str) else ", ".join(suite)


def summarize(results: dict, entries: tuple[SuiteTask, ...]) -> dict[str, dict]:
    """The suite's entries from ``simple_evaluate``'s results."""
    out = {}
    for entry in entries:
        parts = [_task_metrics(results, task, entry.metric) for task in entry.lm_eval_tasks]
        value = sum(p["value"] for p in parts) / len(parts)
        stderrs = [p["stderr"] for p in parts]
        stderr = (math.sqrt(sum(s * s for s in stderrs)) / len(parts)
                  if all(s is not None for s in stderrs) else None)
        record: dict[str, Any] = {}
        if len(parts) == 1:
            record.update(parts[0]["all"])
        else:
            record["parts"] = {task: p["value"] for task, p in zip(entry.lm_eval_tasks, parts)}
        record.update({entry.metric: value, "metric_used": entry.metric, "score": value,
                       "stderr": stderr, "n": sum(p["n"] for p in parts),
                       "tasks": list(entry.lm_eval_tasks)})
        record["items"] = _entry_items(results, entry)
        out[entry.name] = record
    return out


def _entry_items(results: dict, entry: SuiteTask):
    """The entry's per-document scores (lm-eval's logged samples: each document's ``acc`` or
    ``acc_norm``) as :class:`~megatron_vlm.evaluation.items.TaskItems`; None when lm-eval
    logged no samples. An entry made of several lm-eval tasks keys its documents
    ``TASK/DOC_ID`` and groups them by task, as its value is the mean of the tasks' values."""
    from megatron_vlm.evaluation.items import TaskItems

    logged = results.get("samples")
    if not logged:
        return None
    several = len(entry.lm_eval_tasks) > 1
    ids, scores, groups = [], [], []
    for task in entry.lm_eval_tasks:
        samples = [s for s in logged.get(task) or () if s.get("filter", "none") == "none"]
        if not samples:
            raise RuntimeError(f"lm-eval logged no samples for task {task!r}")
        for sample in sorted(samples, key=lambda s: s["doc_id"]):
            ids.append(f"{task}/{sample['doc_id']}" if several else str(sample["doc_id"]))
            scores.append(float(sample[entry.metric]))
            groups.append(task)
    return TaskItems(ids, scores, groups if several else None)


def _task_metrics(results: dict, task: str, metric: str) -> dict:
    """One lm-eval task's ``metric`` (value, stderr, n) and all its plain metrics."""
    reported = results.get("results", {}).get(task)
    if reported is None:
        raise ValueError(f"lm-eval returned no results for task {task!r}")
    key = f"{metric},none"
    if key not in reported:
        raise ValueError(f"lm-eval task {task!r} reports no {metric!r} (it has "
                         f"{', '.join(sorted(k for k in reported if ',' in k))})")
    stderr = reported.get(f"{metric}_stderr,none")
    stderr = float(stderr) if isinstance(stderr, (int, float)) else None
    n = results.get("n-samples", {}).get(task, {}).get("effective")
    plain = {k.split(",")[0]: float(v) for k, v in reported.items()
             if k.endswith(",none") and "_stderr" not in k and isinstance(v, (int, float))}
    return {"value": float(reported[key]), "stderr": stderr, "n": int(n or 0), "all": plain}


def _share_from_rank0(summary: Optional[dict]) -> dict:
    """lm-eval returns results on LOCAL_RANK 0 only; every process gets global rank 0's."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if summary is None:
            raise RuntimeError("lm-eval returned no results (LOCAL_RANK is not 0 in a "
                               "single-process run?)")
        return summary
    box = [summary]
    dist.broadcast_object_list(box, src=0)
    return box[0]
