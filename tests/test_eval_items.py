"""Per-item scores (items/TASK.jsonl) and the intervals results.json gets from them: written and
read back, bad files named in one error, intervals that contain their values, and results
written before items were kept still render (without intervals)."""

from __future__ import annotations

import copy
import json

import pytest

from megatron_vlm.evaluation.items import TaskItems, items_path, read_items, write_items
from megatron_vlm.evaluation.runner import markdown_table
from megatron_vlm.evaluation.uncertainty import add_intervals

from evaluation_helpers import results_with_items


def test_items_round_trip(tmp_path):
    plain = TaskItems(["1", "q/2", "3"], [1.0, 0.6, 0.0])
    grouped = TaskItems(["adversarial/1", "random/1"], [1.0, 0.0], ["adversarial", "random"])
    for name, items in (("vqa", plain), ("pope", grouped)):
        path = items_path(tmp_path, name)
        write_items(path, items)
        assert path == tmp_path / "items" / f"{name}.jsonl"
        assert read_items(path) == items
    first = json.loads(items_path(tmp_path, "pope").read_text().splitlines()[0])
    assert first == {"id": "adversarial/1", "score": 1.0, "group": "adversarial"}
    assert plain.value() == pytest.approx(1.6 / 3) and grouped.value() == 0.5
    assert plain.subset(["3", "1"]) == TaskItems(["3", "1"], [0.0, 1.0])


@pytest.mark.parametrize("lines, message", [
    (['{"id": "1", "score": 1}', "{not json"], "line 2: not valid JSON"),
    (['{"id": "1"}'], r'line 1: expected \{"id": ID, "score": NUMBER\}'),
    (['{"id": "1", "score": 1.5}'], "line 1: field 'score' must be a number in"),
    (['{"id": "1", "score": true}'], "line 1: field 'score'"),
    (['{"id": [1], "score": 1}'], "line 1: field 'id'"),
    (['{"id": "1", "score": 1}', '{"id": 1, "score": 0}'], "line 2: field 'id': '1' appears twice"),
    (['{"id": "1", "score": 1, "group": "a"}', '{"id": "2", "score": 0}'],
     "item '2': field 'group' is on some lines only"),
    ([""], "no items"),
])
def test_a_bad_items_file_is_one_error_naming_it(tmp_path, lines, message):
    path = tmp_path / "items" / "t.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message) as err:
        read_items(path)
    assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_items(tmp_path / "nothing.jsonl")


def test_results_get_intervals_that_contain_their_values(tmp_path):
    results = results_with_items(tmp_path, {
        "shapesworld_vqa": ("vision", [1.0, 0.6, 0.0, 1.0, 0.3] * 8, None, 0.0),
        "shapesworld_pope": ("vision", [1, 0, 1, 1] * 10, ["adversarial", "random"] * 20, 0.5),
        "shapesworld_arith": ("text", [1, 0, 0, 1, 1] * 6, None, 0.25)})
    old = copy.deepcopy(results)
    add_intervals(results, tmp_path, {}, resamples=2000, seed=0)
    for task, entry in results["tasks"].items():
        lo, hi = entry["metrics"]["accuracy_ci95"]
        assert lo < entry["metrics"]["accuracy"] < hi, task
    for kind, stable in results["stable_score"].items():
        lo, hi = stable["ci95"]
        assert lo < stable["score"] < hi, kind
    assert results["uncertainty"] == {"method": "percentile bootstrap over items",
                                      "resamples": 2000, "seed": 0, "level": 0.95}
    table = markdown_table(results)
    vqa = results["tasks"]["shapesworld_vqa"]["metrics"]
    assert (f"| shapesworld_vqa | vision | {vqa['accuracy']:.4f} [{vqa['accuracy_ci95'][0]:.4f}, "
            f"{vqa['accuracy_ci95'][1]:.4f}] |") in table
    assert "95% percentile bootstrap over items (2000 resamples, seed 0" in table
    # the same seed gives the same intervals; the items in memory give those of the files
    again = copy.deepcopy(old)
    add_intervals(again, tmp_path, {"shapesworld_vqa": read_items(
        tmp_path / "items" / "shapesworld_vqa.jsonl")}, resamples=2000, seed=0)
    assert again == results


def test_results_without_items_render_without_intervals(tmp_path):
    results = results_with_items(tmp_path, {
        "shapesworld_vqa": ("vision", [1.0, 0.0, 0.5], None, 0.0),
        "shapesworld_ref": ("vision", [1.0, 0.0, 0.0], None, 0.0)})
    del results["tasks"]["shapesworld_ref"]["items"]  # scored before items were kept
    add_intervals(results, tmp_path, {}, resamples=500, seed=0)
    assert "accuracy_ci95" in results["tasks"]["shapesworld_vqa"]["metrics"]
    assert "accuracy_ci95" not in results["tasks"]["shapesworld_ref"]["metrics"]
    assert "ci95" not in results["stable_score"]["vision"]  # one of its tasks has no items
    table = markdown_table(results)
    assert "| shapesworld_ref | vision | 0.3333 | 0.000 |" in table
    old = {k: v for k, v in results.items() if k != "uncertainty"}
    for entry in old["tasks"].values():
        entry["metrics"].pop("accuracy_ci95", None)
        entry.pop("items", None)
    assert "[" not in markdown_table(old).split("\n", 1)[1]  # below the title: no interval


def test_items_that_are_not_the_results_are_refused(tmp_path):
    results = results_with_items(tmp_path, {"shapesworld_vqa": ("vision", [1.0, 0.0], None, 0)})
    results["tasks"]["shapesworld_vqa"]["metrics"]["accuracy"] = 0.75
    with pytest.raises(ValueError, match=r"items/shapesworld_vqa.jsonl: its 2 items average "
                                         r"0.500000, but task shapesworld_vqa's accuracy is 0.75"):
        add_intervals(results, tmp_path, {}, resamples=100, seed=0)
