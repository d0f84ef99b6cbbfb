"""Evaluates one checkpoint on a suite: vision tasks, text tasks, stable scores, files.

:func:`evaluate` is what ``tools/evaluate_vlm.py`` runs. Output, in ``output_dir`` (by default
:func:`default_output_dir`: ``RUN/eval/step_NNNNNNN`` for a checkpoint of a run, beside
``RUN/metrics.jsonl``; written by global rank 0 only):

* ``results.json``: per task its metrics (per split where a task has splits), example count,
  seconds and the settings it was produced with; the stable scores (vision and text); the chance
  table; the checkpoint (path, step, fingerprint) and the resolved config;
* ``results.md``: the same as a markdown table;
* ``predictions/TASK.jsonl``: one prediction per vision example (``tools/score_predictions.py``
  re-scores it offline);
* ``items/TASK.jsonl``: each example's score (:mod:`.items`), from which results.json's 95%
  intervals (:mod:`.uncertainty`) and ``tools/compare_runs.py``'s paired tests are computed.

The tasks of ``evaluation.custom_tasks`` (:mod:`.custom_task`) run with every suite, after its
vision tasks (``--suite custom``: alone); their results carry ``"custom": true`` and stay out of
the stable scores.

A task already in ``results.json`` for the same checkpoint (its common.json fingerprint) and the
same settings (limit, prompt, generation length, image source) is not run again unless ``redo``;
results.json is rewritten after every task, so an interrupted evaluation keeps what it finished.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from megatron_vlm.evaluation.data_parallel import is_global_rank0
from megatron_vlm.evaluation.stable_score import chance_levels, stable_score
from megatron_vlm.evaluation.uncertainty import CI_KEY, STABLE_CI_KEY, add_intervals, interval_text
from megatron_vlm.progress import interactive

logger = logging.getLogger("megatron_vlm")

RESULTS_NAME = "results.json"
TABLE_NAME = "results.md"
PREDICTIONS_DIR = "predictions"
# Metrics shown beside the accuracy in results.md (all of them are in results.json).
TABLE_DETAILS = ("accuracy/", "unparsable", "invalid", "off_choices", "stderr")
# Bumped when prompts or scoring change, so old results are not reused silently.
EVAL_FORMAT = 1

VISION_SUITES = {
    "paper": ("vqav2", "gqa", "textvqa", "textvqa_ocr", "pope", "refcoco", "refcoco+",
              "refcocog", "ocid_ref", "vizwiz"),
    "shapesworld": ("shapesworld_vqa", "shapesworld_pope", "shapesworld_ref"),
}
SUITES = {
    # name: (vision suite or None, text suite or None)
    "paper": ("paper", "paper"),
    "paper_vision": ("paper", None),
    "paper_text": (None, "paper"),
    "shapesworld": ("shapesworld", "shapesworld"),
    "shapesworld_vision": ("shapesworld", None),
    "shapesworld_text": (None, "shapesworld"),
    "custom": (None, None),  # the tasks of evaluation.custom_tasks only
}


@dataclass
class EvalRequest:
    """What to evaluate (the fields of tools/evaluate_vlm.py)."""

    checkpoint: str
    suite: str
    tasks: Optional[Sequence[str]] = None
    limit: Optional[int] = None
    output_dir: Optional[str] = None
    redo: bool = False
    tokenizer: Optional[str] = None
    overrides: Sequence[str] = ()
    progress: bool = True


def suite_tasks(suite: str) -> tuple[list[str], list[str]]:
    """(vision tasks, text tasks) of a suite."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; suites: {', '.join(SUITES)}")
    from megatron_vlm.evaluation.text_suites import suite_task_names

    vision, text = SUITES[suite]
    return (list(VISION_SUITES[vision]) if vision else [],
            list(suite_task_names(text)) if text else [])


def select_tasks(suite: str, tasks: Optional[Sequence[str]],
                 custom: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(vision tasks, text tasks) to run: the suite's, ``custom`` tasks after its vision tasks,
    only those named in ``tasks`` when given."""
    from megatron_vlm.evaluation.tasks import VISION_TASKS

    vision, text = suite_tasks(suite)
    clash = [t for t in custom if t in VISION_TASKS or t in text]
    if clash:
        raise ValueError(f"evaluation.custom_tasks.{clash[0]}: the name of a built-in task; "
                         "give your task another name")
    vision += list(custom)
    if not tasks:
        return vision, text
    unknown = [t for t in tasks if t not in vision and t not in text]
    if unknown:
        raise ValueError(f"--tasks names {', '.join(unknown)}, not in suite {suite!r} (its tasks: "
                         f"{', '.join(vision + text)})")
    return [t for t in vision if t in tasks], [t for t in text if t in tasks]


def default_output_dir(checkpoint_dir: Path) -> Path:
    """Where results go without ``--output``: never inside the checkpoint, which is pruned and
    copied around. A checkpoint of a run (``RUN/checkpoints/step_NNNNNNN``) gets
    ``RUN/eval/step_NNNNNNN``, beside the run's metrics.jsonl; any other checkpoint directory
    (a converted DCLM checkpoint, a copy) gets ``eval/NAME`` beside it in its parent folder."""
    from megatron_vlm.training.checkpointing import STEP_DIR

    checkpoint_dir = Path(os.path.abspath(checkpoint_dir))
    if checkpoint_dir.parent.name == "checkpoints" and STEP_DIR.match(checkpoint_dir.name):
        return checkpoint_dir.parent.parent / "eval" / checkpoint_dir.name
    return checkpoint_dir.parent / "eval" / checkpoint_dir.name


def custom_tasks_of(checkpoint: Path, overrides: Sequence[str]) -> dict:
    """The custom tasks of the checkpoint's config with ``overrides`` (read before the model is
    loaded, so that --tasks is checked at once); {} when the checkpoint records no config (the
    engine then says what is wrong)."""
    from megatron_vlm.config import config_from_dict
    from megatron_vlm.evaluation.custom_task import parse_custom_tasks
    from megatron_vlm.training.checkpointing import COMMON, read_common

    saved = read_common(checkpoint).get("config")
    if not isinstance(saved, dict):
        return {}
    cfg = config_from_dict(saved, str(checkpoint / COMMON), overrides)
    return parse_custom_tasks(cfg.evaluation.custom_tasks)


def checkpoint_fingerprint(checkpoint_dir: Path) -> str:
    from megatron_vlm.fsutil import sha256_file

    return sha256_file(checkpoint_dir / "common.json")[:16]


def instruction_system_prompt(cfg) -> str:
    """The system prompt the checkpoint's instruction shards were made with ('' if none)."""
    if cfg.evaluation.system_prompt is not None:
        return cfg.evaluation.system_prompt
    directory = cfg.data.instructions
    index = os.path.join(directory, "index.json") if directory else None
    if not index or not os.path.isfile(index):
        return ""
    with open(index, encoding="utf-8") as f:
        shards = json.load(f).get("shards") or []
    for shard in shards:
        settings = (shard.get("meta") or {}).get("settings") or {}
        if "system_prompt" in settings:
            return settings["system_prompt"] or ""
    return ""


def load_results(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); delete it or pass --redo") from None


def _headline(task: str, metrics: dict) -> float:
    return metrics["accuracy"] if "accuracy" in metrics else metrics.get("acc", float("nan"))


def markdown_table(results: dict) -> str:
    """results.json as markdown: one row per task (split metrics in the last column)."""
    ck = results["checkpoint"]
    lines = [f"# Evaluation of {ck['path']} (step {ck['step']})", "",
             f"suite `{results['suite']}`" + (f", limit {results['limit']} per split"
                                              if results.get("limit") else ""), "",
             "| task | kind | accuracy | chance | n | details |", "|---|---|---|---|---|---|"]
    chance = results.get("chance", {})
    for task, entry in results["tasks"].items():
        metrics = entry["metrics"]
        details = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())
                            if isinstance(v, float) and k.startswith(TABLE_DETAILS))
        level = chance.get(task, 0.0 if entry["kind"] == "vision" else float("nan"))
        kind = entry["kind"] + (" (custom, not in the stable score)" if entry.get("custom")
                                else "")
        lines.append(f"| {task} | {kind} | {_headline(task, metrics):.4f}"
                     f"{interval_text(metrics.get(CI_KEY))} | "
                     f"{level:.3f} | {metrics.get('n', '')} | {details} |")
    lines += ["", "| stable score | value | tasks |", "|---|---|---|"]
    for kind in ("vision", "text"):
        s = results.get("stable_score", {}).get(kind)
        if s and s["score"] is not None:
            lines.append(f"| {kind} | {s['score']:.4f}{interval_text(s.get(STABLE_CI_KEY))} | "
                         f"{s['tasks']} |")
    how = results.get("uncertainty")
    if how:
        lines += ["", f"[lo, hi]: {how['level']:.0%} {how['method']} ({how['resamples']} "
                      f"resamples, seed {how['seed']}; items in items/TASK.jsonl)"]
    return "\n".join(lines) + "\n"


def evaluate(request: EvalRequest) -> dict:
    """Runs the request; returns the results dict (every rank gets it): what results.json
    holds, and ``output_dir``, where it is. Megatron parallel state must be initialized (the
    TP/PP the checkpoint is evaluated at; the rest is data-parallel)."""
    from megatron_vlm.config import config_to_dict
    from megatron_vlm.data.tokenizer import load_tokenizer
    from megatron_vlm.evaluation.engine import EvalModel
    from megatron_vlm.fsutil import write_json_atomic, write_text_atomic
    from megatron_vlm.training.checkpointing import resolve_checkpoint

    if request.limit is not None and request.limit <= 0:
        raise ValueError(f"--limit must be positive, got {request.limit}")
    checkpoint = resolve_checkpoint(request.checkpoint)
    custom = custom_tasks_of(checkpoint, request.overrides)
    vision_tasks, text_tasks = select_tasks(request.suite, request.tasks, list(custom))
    if not vision_tasks and not text_tasks:
        raise ValueError(f"suite {request.suite!r} has no tasks: name your own in "
                         "evaluation.custom_tasks (docs/evaluation.md)")
    eval_model = EvalModel.from_checkpoint(checkpoint, request.overrides)
    cfg = eval_model.cfg
    ev = cfg.evaluation
    tokenizer_path = request.tokenizer or cfg.data.tokenizer
    if tokenizer_path is None:
        raise ValueError(f"checkpoint {checkpoint} records no data.tokenizer: pass --tokenizer")
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > cfg.model.decoder.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens; the "
                         f"checkpoint's model has {cfg.model.decoder.vocab_size} embedding rows")
    output = Path(request.output_dir) if request.output_dir else default_output_dir(checkpoint)
    results_path = output / RESULTS_NAME
    logger.info("results go to %s", output)
    previous = load_results(results_path)
    fingerprint = checkpoint_fingerprint(checkpoint)
    if previous and previous.get("checkpoint", {}).get("fingerprint") != fingerprint:
        logger.info("%s holds results of another checkpoint: starting afresh", results_path)
        previous = {}
    system_prompt = instruction_system_prompt(cfg)
    base_settings = {"format": EVAL_FORMAT, "limit": request.limit, "fingerprint": fingerprint}
    results = {
        "checkpoint": {"path": str(checkpoint), "step": eval_model.common.get("step"),
                       "fingerprint": fingerprint},
        "suite": request.suite, "limit": request.limit,
        "tasks": {}, "config": config_to_dict(cfg),
    }
    from megatron_vlm.training.lineage import checkpoint_lineage

    results["lineage"] = checkpoint_lineage(checkpoint)  # what made the checkpoint scored
    done = {} if request.redo else previous.get("tasks", {})
    # Tasks scored earlier into this directory (e.g. by another suite) at the same limit stay,
    # so one results.json gathers a checkpoint's scores and its stable scores cover them all.
    requested = set(vision_tasks) | set(text_tasks)
    kept = {t: e for t, e in previous.get("tasks", {}).items()
            if t not in requested and e.get("settings", {}).get("limit") == request.limit}
    if kept:
        logger.info("keeping %d earlier results from %s: %s", len(kept), results_path,
                    ", ".join(kept))
    results["tasks"].update(kept)

    def reuse(task: str, settings: dict) -> bool:
        entry = done.get(task)
        if entry is not None and entry.get("settings") == settings:
            results["tasks"][task] = entry
            logger.info("%s: already scored for this checkpoint (accuracy %.4f); --redo runs "
                        "it again", task, _headline(task, entry["metrics"]))
            return True
        return False

    def save() -> None:
        if is_global_rank0():
            output.mkdir(parents=True, exist_ok=True)
            write_json_atomic(results_path, results)

    scored_items: dict = {}  # the items of the tasks scored now (every rank holds them)
    if vision_tasks:
        _run_vision(vision_tasks, custom, eval_model, tokenizer, cfg, request, system_prompt,
                    base_settings, results, reuse, save, output, scored_items)
    suite_levels: dict = {}
    if text_tasks:
        suite_levels = _run_text(text_tasks, eval_model, tokenizer, cfg, request, base_settings,
                                 results, reuse, save, output, scored_items)
    chance = chance_levels(ev.boolq_chance, ev.chance, suite_levels)
    results["chance"] = {t: chance.get(t, 0.0) for t in results["tasks"]}
    accuracies = {"vision": {}, "text": {}}
    for task, entry in results["tasks"].items():
        if not entry.get("custom"):  # one's own questions are reported, not averaged
            accuracies[entry["kind"]][task] = _headline(task, entry["metrics"])
    results["stable_score"] = {kind: stable_score(accs, chance, kind)
                               for kind, accs in accuracies.items() if accs}
    add_intervals(results, output, scored_items, ev.bootstrap_resamples, ev.bootstrap_seed)
    save()
    if is_global_rank0():
        write_text_atomic(output / TABLE_NAME, markdown_table(results))
        logger.info("results: %s and %s", results_path, output / TABLE_NAME)
    return {**results, "output_dir": str(output)}


def _run_vision(tasks, custom, eval_model, tokenizer, cfg, request, system_prompt,
                base_settings, results, reuse, save, output: Path, scored_items: dict) -> None:
    from megatron_vlm.data.samples import resolve_separator
    from megatron_vlm.evaluation import custom_task
    from megatron_vlm.evaluation import prompts as prompt_lib
    from megatron_vlm.evaluation.eval_images import ImageSource
    from megatron_vlm.evaluation.items import TaskItems
    from megatron_vlm.evaluation.scorers import (TaskScoring, item_groups, score_items,
                                                 write_predictions)
    from megatron_vlm.evaluation.tasks import VISION_TASKS, load_task
    from megatron_vlm.evaluation.vision import predict

    ev = cfg.evaluation
    if ev.data_root is None and any(t not in custom for t in tasks):
        raise ValueError("evaluation.data_root is not set: give the folder holding the vision "
                         "benchmarks (docs/evaluation_data.md), e.g. evaluation.data_root=DIR")
    separator_id = resolve_separator(tokenizer, cfg.data.separator_token)
    images = ImageSource(cfg, ev.image_embeddings, blank=ev.blank_images)
    logger.info("vision tasks %s: images from %s; prompts end with %r (id %d); system prompt "
                "%r", ", ".join(tasks), images.describe(), cfg.data.separator_token,
                separator_id, system_prompt)
    for task in tasks:
        mine = custom.get(task)
        pope = mine is None and VISION_TASKS[task].kind == "pope"
        yes_no = pope_token_ids(tokenizer, task) if pope else None
        settings = {**base_settings, "max_new_tokens": ev.max_new_tokens,
                    "system_prompt": system_prompt, "images": images.describe()}
        if mine is None:
            settings["data_root"] = str(ev.data_root)
        else:
            settings.update(custom_settings(mine))
        if pope:
            settings["pope_scoring"] = "probabilities" if yes_no else "text"
        if reuse(task, settings):
            continue
        if mine is None:
            examples = load_task(task, ev.data_root, limit=request.limit)
            if not examples:
                raise ValueError(f"task {task}: no examples under {ev.data_root}")
            prompt_tokens = prompt_lib.prompt_tokens
        else:
            examples = custom_task.load_custom_task(mine, limit=request.limit)
            prompt_tokens = functools.partial(custom_task.prompt_tokens, mine)
        start = time.perf_counter()
        predictions = predict(
            eval_model, examples,
            lambda ex: prompt_tokens(ex, tokenizer, separator_id, system_prompt or None),
            images, stop_ids=(separator_id, tokenizer.eos_id), decode=tokenizer.decode,
            batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens, yes_no=yes_no,
            progress=request.progress and is_global_rank0(), desc=task)
        scoring = None if mine is None else TaskScoring(mine.scoring)
        metrics, per_item = score_items(task, examples, {p.example_id: p for p in predictions},
                                        scoring=scoring)
        path = output / PREDICTIONS_DIR / f"{task}.jsonl"
        if is_global_rank0():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_predictions(path, predictions)
        groups = item_groups(task, examples, scoring)
        results["tasks"][task] = {"kind": "vision", "metrics": metrics, "settings": settings,
                                  "predictions": str(path.relative_to(output)),
                                  "items": _keep_items(output, task, TaskItems(
                                      list(per_item), list(per_item.values()),
                                      None if groups is None else list(groups.values())),
                                      scored_items),
                                  "seconds": round(time.perf_counter() - start, 2)}
        if mine is not None:
            results["tasks"][task]["custom"] = True
        logger.info("%s: accuracy %.4f over %d examples", task, metrics["accuracy"], len(examples))
        save()


def _keep_items(output: Path, task: str, items, scored_items: dict) -> str:
    """Writes a task's items file (global rank 0) and keeps the items for the intervals;
    returns the file's path relative to ``output``, as results.json names it."""
    from megatron_vlm.evaluation.items import items_path, write_items

    path = items_path(output, task)
    if is_global_rank0():
        write_items(path, items)
    scored_items[task] = items
    return str(path.relative_to(output))


def custom_settings(task) -> dict:
    """What a custom task's result depends on besides the common settings: its file (by
    content: an edited file is scored again), scoring and prompt template."""
    from megatron_vlm.fsutil import sha256_file

    if not os.path.isfile(task.file):
        raise FileNotFoundError(f"evaluation.custom_tasks.{task.name}: {task.file} not found")
    return {"file": os.path.abspath(task.file), "sha256": sha256_file(task.file)[:16],
            "scoring": task.scoring, "prompt": task.prompt}


def pope_token_ids(tokenizer, task: str) -> Optional[tuple[list[int], list[int]]]:
    """The "Yes"/"No" token ids that decide POPE by probability, or None (with a warning) when
    the tokenizer has no usable single-token spelling: POPE is then scored from the generated
    text, as POPE's own evaluation does."""
    from megatron_vlm.evaluation.prompts import yes_no_token_ids

    try:
        return yes_no_token_ids(tokenizer)
    except ValueError as err:
        logger.warning("%s: %s; scoring POPE from the generated text instead", task, err)
        return None


@contextlib.contextmanager
def _lm_eval_output(interactive: bool):
    """lm-eval's info lines on a terminal only; piped logs keep this project's lines (one per
    task) and lm-eval's warnings. (Its progress bars follow TQDM_DISABLE, which
    :func:`megatron_vlm.logs.configure_logging` sets when output is piped.)"""
    lm_eval_logger = logging.getLogger("lm_eval")
    level = lm_eval_logger.level
    if not interactive:
        lm_eval_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lm_eval_logger.setLevel(level)


def _run_text(tasks, eval_model, tokenizer, cfg, request, base_settings, results, reuse,
              save, output: Path, scored_items: dict) -> dict:
    from megatron_vlm.evaluation.lm_eval_adapter import MegatronVLMLM
    from megatron_vlm.evaluation.text_suites import run_text_suite, suite_chance_levels

    ev = cfg.evaluation
    settings = {**base_settings, "text_tasks": ev.text_tasks}
    todo = [t for t in tasks if not reuse(t, settings)]
    levels = suite_chance_levels(ev.text_tasks)
    if not todo:
        return levels
    lm = MegatronVLMLM(eval_model, tokenizer, batch_size=ev.batch_size)
    start = time.perf_counter()
    with _lm_eval_output(request.progress and is_global_rank0() and interactive()):
        scored = run_text_suite(lm, todo, include_path=ev.text_tasks, limit=request.limit)
    seconds = round(time.perf_counter() - start, 2)
    for task in todo:
        metrics = dict(scored[task])
        items = metrics.pop("items", None)
        metrics["accuracy"] = metrics[metrics["metric_used"]]
        results["tasks"][task] = {"kind": "text", "metrics": metrics, "settings": settings,
                                  "seconds": seconds}
        if items is not None:
            results["tasks"][task]["items"] = _keep_items(output, task, items, scored_items)
        logger.info("%s: %s %.4f over %s examples", task, metrics["metric_used"],
                    metrics["accuracy"], metrics.get("n"))
    save()
    return levels
