"""Paired comparisons of evaluations (megatron_vlm/evaluation/compare.py, tools/compare_runs.py
and tools/sweep.py --compare), on results.json and items files written by hand."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from distributed import REPO
from evaluation_helpers import results_with_items
from megatron_vlm.evaluation.compare import compare, load_arm

POPE_GROUPS = ["adversarial", "popular", "random"] * 40


def evaluation(directory, vqa, pope, arith, vqa_ids=None):
    """An evaluation folder (results.json + items) of three tasks with these item scores."""
    tasks = {"shapesworld_vqa": ("vision", vqa, None, 0.0),
             "shapesworld_pope": ("vision", pope, POPE_GROUPS, 0.5),
             "shapesworld_arith": ("text", arith, None, 0.25)}
    if vqa_ids is not None:
        tasks["shapesworld_vqa"] += (vqa_ids,)
    results = results_with_items(directory, tasks)
    (directory / "results.json").write_text(json.dumps(results))
    return directory


@pytest.fixture
def arms(tmp_path):
    """A baseline, the same evaluation with its VQA items in reverse order, and a better one:
    B gets a third of A's wrong POPE and arith items right and +0.25 on every VQA item."""
    rng = np.random.default_rng(0)
    vqa = np.round(rng.random(100) * 3) / 3  # soft VQA scores: 0, 1/3, 2/3, 1
    pope = (rng.random(120) < 0.6).astype(float)
    arith = (rng.random(90) < 0.4).astype(float)
    ids = [str(i) for i in range(100)]
    base = evaluation(tmp_path / "a", vqa, pope, arith)
    shuffled = evaluation(tmp_path / "a_reversed", vqa[::-1], pope, arith, ids[::-1])
    fixed = np.arange(len(pope)) % 3 == 0
    better = evaluation(tmp_path / "b", np.clip(vqa + 0.25, 0, 1),
                        np.where(fixed, 1.0, pope), np.where(np.arange(90) % 3 == 0, 1.0, arith))
    return base, shuffled, better


def rows(comparison):
    return {row.name: row for row in comparison.rows}


def test_an_evaluation_against_itself_differs_in_nothing(arms):
    base, shuffled, _ = arms
    # matched by id, not by line: the same items in another order are the same evaluation
    comparison = compare(load_arm(base), load_arm(shuffled), resamples=2000)
    assert list(rows(comparison)) == ["shapesworld_vqa", "shapesworld_pope", "shapesworld_arith",
                                      "stable_score.vision", "stable_score.text"]
    for row in comparison.rows:
        assert row.difference == pytest.approx(0.0, abs=1e-12), row.name
        # the same item in both arms on every line: every resample's difference is 0
        assert row.ci95 == (0.0, 0.0), row.name
        assert row.p_value == 1.0 and row.p_holm == 1.0, row.name
    assert comparison.notes == []


def test_a_systematic_difference_is_significant(arms):
    base, _, better = arms
    a, b = load_arm(base), load_arm(better)
    comparison = rows(compare(a, b, resamples=2000))
    for name, row in comparison.items():
        assert row.difference > 0 and row.ci95[0] > 0, name
        assert row.p_holm < 0.01 and row.p_holm >= row.p_value, name
    smallest = min(comparison.values(), key=lambda row: row.p_value)
    assert smallest.p_holm == pytest.approx(len(comparison) * smallest.p_value)  # Holm's m * p
    vqa = comparison["shapesworld_vqa"]
    assert vqa.test == "paired bootstrap"  # soft scores: no McNemar
    assert vqa.b - vqa.a == pytest.approx(vqa.difference)
    assert vqa.a == pytest.approx(a.results["tasks"]["shapesworld_vqa"]["metrics"]["accuracy"])
    # right/wrong items in equal-sized splits: McNemar, on the discordant pairs
    assert comparison["shapesworld_pope"].test == "McNemar exact"
    assert comparison["shapesworld_arith"].test == "McNemar exact"
    assert comparison["stable_score.vision"].test == "paired bootstrap"
    vision = b.results["stable_score"]["vision"]["score"] - a.results["stable_score"]["vision"][
        "score"]
    assert comparison["stable_score.vision"].difference == pytest.approx(vision)
    # the other way round: the same p-values, the difference negated
    backward = rows(compare(b, a, resamples=2000))
    for name, row in comparison.items():
        assert backward[name].difference == pytest.approx(-row.difference)
        assert backward[name].p_value == pytest.approx(row.p_value), name


def test_only_common_items_are_compared_with_a_note(tmp_path, arms):
    base, _, _ = arms
    a = load_arm(base)
    vqa = [1.0] * 100
    ids = [str(i) for i in range(3, 100)] + ["new1", "new2", "new3", "new4"]
    other = evaluation(tmp_path / "other", [1.0] * 101, [1.0] * 120, [1.0] * 90, ids)
    comparison = compare(a, load_arm(other), tasks=["shapesworld_vqa"], resamples=500)
    row = rows(comparison)["shapesworld_vqa"]
    assert row.n == 97 and row.b == 1.0
    a_items = a.items("shapesworld_vqa")
    assert row.a == pytest.approx(np.mean(a_items.scores[3:]))
    assert "shapesworld_vqa: 97 common items; 3 only in A, 4 only in B" in comparison.notes
    stable = rows(comparison)["stable_score.vision"]
    assert stable.note == "over 1 of its 2 tasks"
    disjoint = evaluation(tmp_path / "disjoint", vqa, [1.0] * 120, [1.0] * 90,
                          [f"x{i}" for i in range(100)])
    with pytest.raises(ValueError, match="task shapesworld_vqa: no example id in common"):
        compare(a, load_arm(disjoint), resamples=100)


def test_a_run_or_checkpoint_stands_for_its_default_evaluation(tmp_path, arms):
    import shutil

    base, _, _ = arms
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "step_0000005").mkdir(parents=True)
    (checkpoints / "step_0000005" / "common.json").write_text("{}")
    (checkpoints / "latest").write_text("step_0000005")
    with pytest.raises(FileNotFoundError, match=r"no results.json there, nor in its checkpoint's "
                                                r"evaluation folder \(.*run/eval/step_0000005"):
        load_arm(tmp_path / "run")
    shutil.copytree(base, tmp_path / "run" / "eval" / "step_0000005")
    for path in (tmp_path / "run", checkpoints / "step_0000005"):
        assert load_arm(path).directory == tmp_path / "run" / "eval" / "step_0000005"


def test_bad_input_is_one_error_naming_the_file(tmp_path, arms):
    base, _, better = arms
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        load_arm(tmp_path / "nowhere")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{")
    with pytest.raises(ValueError, match="broken/results.json: not valid JSON"):
        load_arm(tmp_path / "broken")
    with pytest.raises(ValueError,
                       match=r"/a/results.json: no task 'vqav2' \(its tasks: shapesworld_vqa"):
        compare(load_arm(base), load_arm(better), tasks=["vqav2"])
    (better / "items" / "shapesworld_pope.jsonl").write_text('{"id": "0", "score": 2}\n')
    with pytest.raises(ValueError, match=r"shapesworld_pope.jsonl: line 1: field 'score'"):
        compare(load_arm(base), load_arm(better))
    results = json.loads((better / "results.json").read_text())
    del results["tasks"]["shapesworld_vqa"]["items"]
    (better / "results.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match="task shapesworld_vqa has no items file"):
        compare(load_arm(base), load_arm(better), tasks=["shapesworld_vqa"])


def test_the_tool_prints_the_table_and_writes_the_files(tmp_path, arms):
    base, _, better = arms

    def tool(*args):
        return subprocess.run([sys.executable, str(REPO / "tools" / "compare_runs.py"), *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)

    done = tool(str(base), str(better), "--resamples", "300", "--output", "cmp")
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "cmp"
    md = (out / "comparison.md").read_text()
    assert "| shapesworld_pope |" in done.stdout and "| **stable_score.text** |" in md
    assert md in done.stdout
    saved = json.loads((out / "comparison.json").read_text())
    assert [r["name"] for r in saved["rows"]][:1] == ["shapesworld_vqa"]
    assert saved["uncertainty"]["resamples"] == 300 and saved["difference"] == "b - a"
    assert (out / "comparison.png").stat().st_size > 5_000
    missing = tool(str(base), str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [
        f"compare_runs: error: {tmp_path / 'nowhere'} does not exist (give an evaluation folder "
        "holding results.json, or a checkpoint)"]
    helped = tool("--help")
    assert helped.returncode == 0 and "compare_runs.py" in helped.stdout and "--tasks" in \
        helped.stdout
