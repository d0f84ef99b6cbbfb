"""Stable scores: accuracy minus chance, averaged per kind, with the documented exclusions."""

import pytest

from megatron_vlm.evaluation.stable_score import chance_levels, stable_score


def test_text_stable_score_subtracts_each_tasks_chance():
    chance = chance_levels()
    got = stable_score({"boolq": 0.70, "hellaswag": 0.45, "mathqa": 0.20}, chance, "text")
    # (0.70 - 0.50) + (0.45 - 0.25) + (0.20 - 0.20), over 3 tasks
    assert got["score"] == pytest.approx(0.4 / 3)
    assert got["tasks"] == 3 and got["terms"]["mathqa"] == pytest.approx(0.0)


def test_boolq_chance_is_a_choice():
    assert chance_levels("uniform")["boolq"] == 0.5
    majority = chance_levels("majority")
    assert majority["boolq"] == 0.62
    got = stable_score({"boolq": 0.70}, majority, "text")
    assert got["score"] == pytest.approx(0.08)
    with pytest.raises(ValueError, match="boolq_chance"):
        chance_levels("median")


def test_vision_excludes_reported_only_tasks_and_open_tasks_have_zero_chance():
    chance = chance_levels()
    got = stable_score({"vqav2": 0.6, "pope": 0.8, "vizwiz": 0.1, "textvqa_ocr": 0.9},
                       chance, "vision")
    assert got["tasks"] == 2
    assert got["score"] == pytest.approx(((0.6 - 0.0) + (0.8 - 0.5)) / 2)


def test_overrides_and_suite_levels():
    chance = chance_levels(overrides={"pubmedqa": 0.55}, suite_levels={"shapesworld_order": 0.5})
    assert chance["pubmedqa"] == 0.55 and chance["shapesworld_order"] == 0.5
    assert chance_levels()["pubmedqa"] == pytest.approx(1 / 3)


def test_unknown_text_task_and_bad_accuracy_are_errors():
    with pytest.raises(ValueError, match="evaluation.chance.mystery"):
        stable_score({"mystery": 0.5}, chance_levels(), "text")
    with pytest.raises(ValueError, match="not a fraction"):
        stable_score({"vqav2": 61.2}, chance_levels(), "vision")  # a percentage slipped in
    assert stable_score({}, chance_levels(), "text")["score"] is None
