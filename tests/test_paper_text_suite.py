"""The paper's text suite (``run_text_suite(lm, "paper")`` and ``tools/evaluate_vlm.py --suite
paper_text``) run end to end with no network, from a fake Hugging Face datasets cache
(tests/fake_hf_cache.py) holding a few rows of each of the nine tasks' data sets.

    .venv/bin/python -m pytest tests/test_paper_text_suite.py -q      # about 40 s on 2 cores

The cache's environment variables are read when ``datasets`` / ``huggingface_hub`` are
imported, so everything that loads data runs in a subprocess with them set, never the pytest
process. This file run as a script (``python tests/test_paper_text_suite.py OUT CACHE_ROOT``)
builds a tiny random checkpoint, runs the suite at ``limit=3``, then removes data sets from the
cache and records the errors, and prints one JSON line; a second subprocess runs the evaluation
tool on that checkpoint with a fresh cache. Each subprocess indexes lm-eval's tasks (about 8 s)
once per ``run_text_suite`` call.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import REPO, free_port, last_json
from shared_fixtures import build_once
from fake_hf_cache import (
    FAKE_DATASETS,
    FIXED_SCORES,
    dataset_cache_dir,
    fake_dataset,
    scored_rows,
    write_fake_cache,
)

LIMIT = 3
# The suite as the paper reports it (text_suites' table, written out again here so that a
# change there has to be made twice): entry -> (lm-eval tasks, metric, answer choices per row).
PAPER_ENTRIES = {
    "agieval_lsat": (("agieval_lsat_ar", "agieval_lsat_lr", "agieval_lsat_rc"), "acc_norm", 5),
    "arc_easy": (("arc_easy",), "acc_norm", 4),
    "bigbench_conceptual_combinations": (("bigbench_conceptual_combinations_multiple_choice",),
                                         "acc", 4),
    "boolq": (("boolq",), "acc", 2),
    "copa": (("copa",), "acc", 2),
    "hellaswag": (("hellaswag",), "acc_norm", 4),
    "mathqa": (("mathqa",), "acc_norm", 5),
    "piqa": (("piqa",), "acc_norm", 2),
    "pubmedqa": (("pubmedqa",), "acc", 3),
}
# Removed from the cache after the full run: a whole data set (datasets: ConnectionError) and
# one config of a data set whose other config stays (datasets: ValueError).
MISSING_DATASET = ("Rowan/hellaswag", "hellaswag")
MISSING_CONFIG = ("aps/super_glue", "copa", "copa")


def _subprocess_env(fake_env: dict[str, str]) -> dict[str, str]:
    return dict(os.environ, **fake_env, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
                TQDM_DISABLE="1", MASTER_PORT=str(free_port()))


def _fraction_of(value: float, n: int) -> bool:
    """Whether ``value`` is an accuracy over ``n`` rows (a multiple of 1 / n)."""
    return abs(value * n - round(value * n)) < 1e-9


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    """The child's report: the suite's results, the checkpoint and tokenizer it made, and the
    errors for the removed data sets."""
    def build(root):
        env = write_fake_cache(root / "cache")
        done = subprocess.run([sys.executable, __file__, str(root / "run"), str(root / "cache")],
                              cwd=REPO, env=_subprocess_env(env), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        return last_json(done.stdout)

    # over a minute: one worker builds it, the others read it
    return build_once(tmp_path_factory, "paper_text", build)


def test_fake_cache_covers_the_suite():
    from megatron_vlm.evaluation.text_suites import PAPER_SUITE

    suite_tasks = [t for entry in PAPER_SUITE for t in entry.lm_eval_tasks]
    assert sorted(d.task for d in FAKE_DATASETS) == sorted(suite_tasks)
    assert {e.name: (e.lm_eval_tasks, e.metric) for e in PAPER_SUITE} == {
        name: (tasks, metric) for name, (tasks, metric, _) in PAPER_ENTRIES.items()}
    for dataset in FAKE_DATASETS:  # the rows the test relies on: at most 5, some under LIMIT
        assert 2 <= dataset.eval_rows() <= 5, dataset.task
    assert scored_rows("agieval_lsat_rc", LIMIT) == 2
    assert scored_rows("bigbench_conceptual_combinations_multiple_choice", LIMIT) == 2
    assert scored_rows("arc_easy", LIMIT) == 3 and scored_rows("arc_easy", None) == 4


@pytest.mark.slow  # the paper_run fixture trains and runs the whole suite (over a minute)
def test_paper_suite_runs_offline(paper_run):
    results = paper_run["suite"]
    assert list(results) == list(PAPER_ENTRIES)
    for name, (tasks, metric, _) in PAPER_ENTRIES.items():
        record = results[name]
        assert record["metric_used"] == metric, name
        assert record["tasks"] == list(tasks), name
        value = record["score"]
        assert record[metric] == value and 0.0 <= value <= 1.0, (name, record)
        n = sum(scored_rows(task, LIMIT) for task in tasks)
        assert record["n"] == n, (name, record["n"], n)
        # one score per document, distinct ids, averaging to the reported value (LSAT: the
        # mean of its sections' means)
        items = record["items"]
        assert items["n"] == items["distinct_ids"] == n, (name, items)
        assert math.isclose(items["value"], value, abs_tol=1e-12), (name, items, value)
        if len(tasks) == 1:
            assert _fraction_of(value, n), (name, value, n)


@pytest.mark.slow  # the paper_run fixture trains and runs the whole suite (over a minute)
def test_agieval_lsat_is_the_unweighted_mean_of_its_sections(paper_run):
    lsat = paper_run["suite"]["agieval_lsat"]
    parts = lsat["parts"]
    assert list(parts) == list(PAPER_ENTRIES["agieval_lsat"][0])
    for task, fixed in FIXED_SCORES.items():  # rows whose score does not depend on the model
        assert parts[task] == fixed, (task, parts)
    assert _fraction_of(parts["agieval_lsat_lr"], scored_rows("agieval_lsat_lr", LIMIT)), parts
    # Sections count 3, 3 and 2 questions here: weighting by size would give another number.
    assert math.isclose(lsat["score"], sum(parts.values()) / 3, abs_tol=1e-12), lsat
    assert lsat["n"] == 3 + 3 + 2


@pytest.mark.slow  # the paper_run fixture trains and runs the whole suite (over a minute)
def test_missing_dataset_is_one_clear_error(paper_run):
    error = paper_run["missing"]["dataset"]
    path, entry = MISSING_DATASET
    assert error["type"] == "FileNotFoundError", error
    message = error["message"]
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"text suite {entry}: a data set is neither in the local "
                              "datasets cache nor reachable"), message
    assert path in message and "fill the cache" in message, message


@pytest.mark.slow  # the paper_run fixture trains and runs the whole suite (over a minute)
def test_missing_config_is_the_same_clear_error_naming_the_config(paper_run):
    """A data set whose other config is cached: datasets raises a ValueError, which the suite
    turns into the same one-line FileNotFoundError as a missing data set."""
    error = paper_run["missing"]["config"]
    path, config, entry = MISSING_CONFIG
    assert error["type"] == "FileNotFoundError" and "\n" not in error["message"], error
    assert error["message"].startswith(f"text suite {entry}: "), error
    assert path in error["message"] and repr(config) in error["message"], error


@pytest.mark.slow  # the paper_run fixture trains and runs the whole suite (over a minute)
def test_evaluate_vlm_paper_text_offline(paper_run, tmp_path):
    env = write_fake_cache(tmp_path / "cache")  # a full cache: the child removed data sets
    done = subprocess.run(
        [sys.executable, "tools/evaluate_vlm.py", "--checkpoint", paper_run["checkpoint"],
         "--tokenizer", paper_run["tokenizer"], "--suite", "paper_text",
         "--limit", str(LIMIT), "--json", "--output", str(tmp_path / "eval")],
        cwd=REPO, env=_subprocess_env(env), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    printed = last_json(done.stdout)
    stable = printed["stable_score"]["text"]
    assert isinstance(stable, float) and math.isfinite(stable), printed
    accuracies = {task: metrics["accuracy"] for task, metrics in printed["tasks"].items()}
    assert set(accuracies) == set(PAPER_ENTRIES)
    for task, accuracy in accuracies.items():  # the same model on the same rows
        assert accuracy == paper_run["suite"][task]["score"], task
    # Stable score: mean of (accuracy - 1 / choices); BoolQ's uniform 0.5 is the default.
    want = sum(acc - 1 / PAPER_ENTRIES[t][2] for t, acc in accuracies.items()) / 9
    assert math.isclose(stable, want, abs_tol=1e-9), (stable, want)


# ---------------------------------------------------------------------- the subprocess


def _error_of(call) -> dict:
    """The exception ``call()`` raises, as {"type", "message"} ({"type": None} if none)."""
    try:
        call()
    except Exception as err:  # recorded, so that pytest shows whatever it was
        return {"type": type(err).__name__, "message": str(err)}
    return {"type": None, "message": ""}


def _child(out: Path, cache_root: Path) -> int:
    """Runs in the fake cache's environment: builds the checkpoint, runs the suite, removes
    data sets and records the errors; prints one JSON line."""
    from evaluation_helpers import save_tiny_checkpoint, small_shapesworld
    from megatron_vlm.evaluation.engine import EvalModel
    from megatron_vlm.evaluation.lm_eval_adapter import MegatronVLMLM
    from megatron_vlm.evaluation.text_suites import run_text_suite
    from megatron_vlm.runtime import initialize, shutdown

    tokenizer = small_shapesworld(out / "sw", 2) / "tokenizer" / "tokenizer.json"
    initialize(1, 1, device="cpu")
    try:
        checkpoint = save_tiny_checkpoint(out / "ckpt")
        # Batches of 8, as tools/evaluate_vlm.py scores them (evaluation.batch_size), so that
        # both runs give the same numbers.
        lm = MegatronVLMLM(EvalModel.from_checkpoint(checkpoint), tokenizer, batch_size=8)
        suite = run_text_suite(lm, "paper", limit=LIMIT)
        for entry in suite.values():  # each document's score: their count and mean
            items = entry.pop("items")
            entry["items"] = {"n": len(items), "value": items.value(),
                              "distinct_ids": len(set(items.ids))}
        report = {"checkpoint": str(checkpoint), "tokenizer": str(tokenizer), "suite": suite,
                  "missing": {}}
        path, entry = MISSING_DATASET
        shutil.rmtree(dataset_cache_dir(cache_root, path))
        report["missing"]["dataset"] = _error_of(
            lambda: run_text_suite(lm, [entry], limit=LIMIT))
        path, config, entry = MISSING_CONFIG
        assert fake_dataset(entry).config == config
        shutil.rmtree(dataset_cache_dir(cache_root, path) / config)
        report["missing"]["config"] = _error_of(
            lambda: run_text_suite(lm, [entry], limit=LIMIT))
    finally:
        shutdown()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":  # the guard matters: checkpoint saving starts spawned processes
    sys.exit(_child(Path(sys.argv[1]), Path(sys.argv[2])))
