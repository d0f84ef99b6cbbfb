"""The vision scorers against cases worked by hand from the official rules (vlm-evaluation's
VQAv2 code, TextVQA's EvalAI processor, POPE's official script, Acc@IoU for boxes)."""

from __future__ import annotations

import json

import pytest

from megatron_vlm.evaluation.answer_normalize import (EvalAIAnswerProcessor, normalize_vqa_answer,
                                                      process_punctuation, strip_answer_punctuation)
from megatron_vlm.evaluation.records import Example, Prediction
from megatron_vlm.evaluation.scorers import (TASK_SCORING, box_iou, gqa_match, parse_box,
                                             pope_answer, pope_text_answer, read_predictions,
                                             score, textvqa_accuracy, vqa_accuracy,
                                             write_predictions)


def ex(eid, answers=(), task="vqav2", split="val", box=None, **extra) -> Example:
    return Example(task=task, split=split, example_id=str(eid), question="q?",
                   answers=tuple(answers), box=box, extra=extra)


def preds(**answers) -> dict[str, Prediction]:
    return {k: Prediction(example_id=k, answer=v) for k, v in answers.items()}


# --- normalisation ------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"),          # period stripped, number word, lowercase
    ("the cat", "cat"), ("A cat", "cat"), ("an apple", "apple"),
    ("dont", "don't"), ("Isnt", "isn't"),
    ("3.5", "3.5"), ("3.5.", "3.5"), ("e.g.", "eg"),  # decimal points survive, others go
    ("yes!", "yes"), ("\tYes\n", "yes"),
    ("a-b\n-c", "ab c"),  # the newline becomes a space first, so "-" sits beside one
    ("1,000", "1000"),                # comma between digits: deleted
    ("red,blue", "red blue"),         # no space beside it: becomes a space
    ("red, blue", "red blue"),        # a space beside it: deleted
    ("1,000 red,blue", "1000 redblue"),  # a digit comma anywhere deletes every mark
    ("t-shirt", "t shirt"), ("none", "0"), ("ten", "10"), ("eleven", "eleven"),
    ("somebody'd", "somebodyd"),      # the official table's own quirk
    ("Im", "im"),                     # capitalised keys never match after lowercasing
])
def test_vqa_normalization(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_ground_truth_punctuation_step_alone():
    assert strip_answer_punctuation("yes!") == "yes "          # a space, and no strip
    assert strip_answer_punctuation("Two") == "Two"            # no lowercase, no digits
    assert strip_answer_punctuation("the t - shirt") == "the t  shirt"
    assert process_punctuation("a.b 2.5") == "ab 2.5"
    # Each mark's test reads the input, not the text after the earlier marks were replaced.
    assert strip_answer_punctuation("a;,b") == "a  b"


def test_evalai_processor():
    proc = EvalAIAnswerProcessor()
    assert proc("Coca-Cola") == "coca cola"
    assert proc("Man's hat?") == "man 's hat"
    assert proc("1,000") == "1000"
    assert proc("The Two Dogs.") == "2 dogs"
    assert proc("hello, world") == "hello world"
    assert proc("red,blue") == "redblue"  # its tokenizer deletes commas before the VQA steps


# --- VQA accuracy -------------------------------------------------------------------------------

@pytest.mark.parametrize("matches, expected", [
    (0, 0.0),
    (1, 0.3),   # left-out match: 0; 9 others: 1/3 each -> 9*(1/3)/10
    (2, 0.6),   # 2*(1/3) + 8*(2/3) over 10
    (3, 0.9),   # 3*(2/3) + 7*1 over 10
    (4, 1.0),   # every leave-one-out set still has >= 3 matches
    (10, 1.0),
])
def test_leave_one_annotator_out_average(matches, expected):
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)


def test_vlm_evaluation_rule_normalizes_a_unanimous_prediction():
    # The official script skips normalisation when all annotators agree (-> 0.0 there).
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert vqa_accuracy("The dog.", ["dog"] * 10) == 1.0


def test_ground_truth_is_not_lowercased_or_digit_mapped():
    assert vqa_accuracy("two", ["two"] * 10) == 0.0
    assert vqa_accuracy("Yes", ["Yes"] * 10) == 0.0
    # ... but it does lose its punctuation, like the prediction.
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 1.0


def test_vqav2_score_with_answer_types():
    examples = [ex(1, ["yes"] * 10, answer_type="yes/no"),
                ex(2, ["no"] * 10, answer_type="yes/no"),
                ex(3, ["2"] * 3 + ["3"] * 7, answer_type="number")]
    metrics = score("vqav2", examples, preds(**{"1": "Yes", "2": "yes", "3": "two"}))
    assert metrics["accuracy"] == pytest.approx((1 + 0 + 0.9) / 3)
    assert metrics["accuracy/yes/no"] == pytest.approx(0.5)
    assert metrics["accuracy/number"] == pytest.approx(0.9)
    assert metrics["n"] == 3 and metrics["missing"] == 0


def test_vizwiz_answerable_breakdown():
    examples = [ex(1, ["unanswerable"] * 10, task="vizwiz", answerable=0),
                ex(2, ["red"] * 10, task="vizwiz", answerable=1),
                ex(3, ["blue"] * 10, task="vizwiz", answerable=1)]
    metrics = score("vizwiz", examples, preds(**{"1": "Unanswerable", "2": "red", "3": "green"}))
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["accuracy/unanswerable"] == 1.0
    assert metrics["accuracy/answerable"] == 0.5


def test_textvqa_processes_both_sides():
    answers = ["Coca-Cola"] * 4 + ["coke"] * 6
    assert textvqa_accuracy("coca cola", answers) == 1.0
    assert vqa_accuracy("coca cola", answers) == 0.0  # the VQAv2 rule keeps the answers' case
    assert textvqa_accuracy("coke", ["Coke"] * 2 + ["pepsi"] * 8) == pytest.approx(0.6)
    examples = [ex(1, answers, task="textvqa"), ex(2, ["STOP"] * 10, task="textvqa")]
    for task in ("textvqa", "textvqa_ocr"):
        metrics = score(task, examples, preds(**{"1": "Coca Cola", "2": "stop."}))
        assert metrics["accuracy"] == 1.0


def test_gqa_exact_match_after_punctuation_and_case():
    assert gqa_match("Yes.", "yes")
    assert not gqa_match("the table", "table")     # no article removal in GQA
    assert not gqa_match("two", "2")               # nor number words
    examples = [ex(1, ["yes"], task="gqa"), ex(2, ["table"], task="gqa")]
    assert score("gqa", examples, preds(**{"1": "YES!", "2": "the table"}))["accuracy"] == 0.5


# --- POPE ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("No", "no"), ("no", "no"),
    ("No, there is not.", "no"), ("Yes, there is a cat.", "yes"), ("There is no cat", "no"),
    ("I am not sure", "no"), ("Nope", "yes"),
    ("Yes. There is no dog.", "yes"),  # only the first sentence counts
    ("No!", "yes"),  # the official script splits on spaces only, so "No!" is not the word "No"
    # The comma is deleted before the words are split, so "No," is the word "No": kept, these
    # read as "yes" ("No, there is not." is "no" either way, because of "not").
    ("No, it is a dog.", "no"), ("no, a cat", "no"), ("It is not, sorry", "no"),
    ("Yes, it is a dog.", "yes"), ("Yes, there is a dog, no doubt.", "no"),
    ("No,it is a dog", "yes"),  # deleted, not made a space: "Noit" is not a word
    ("There is a dog. No.", "yes"),  # the first sentence only, whatever follows
])
def test_pope_text_reading(text, expected):
    assert pope_text_answer(text) == expected


# --- exact match (custom tasks) -----------------------------------------------------------------

def test_exact_match_normalises_both_sides_and_counts_answers_off_the_choices():
    from megatron_vlm.evaluation.scorers import TaskScoring, exact_match

    assert exact_match("Two.", ["2"]) and exact_match("the Red car", ["red car", "crimson"])
    assert exact_match("2", ["two"])  # unlike the VQA rule, the answers are normalised too
    assert not exact_match("red", ["red car"]) and not exact_match("", ["red"])
    examples = [ex(1, ["red"], task="mine", choices=("red", "blue")),
                ex(2, ["blue"], task="mine", choices=("red", "blue")),
                ex(3, ["3"], task="mine")]
    metrics = score("mine", examples, preds(**{"1": "Red.", "2": "green", "3": "three"}),
                    scoring=TaskScoring("exact"))
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["off_choices"] == 0.5  # "green" is no choice of example 2; examples with none
    vqa = score("mine", [ex(1, ["cat"] * 4)], preds(**{"1": "Cat"}), scoring=TaskScoring("vqa"))
    assert vqa["accuracy"] == 1.0
    with pytest.raises(ValueError, match="unknown task 'mine'"):
        score("mine", examples, {})


def test_pope_probabilities_and_ties():
    assert pope_answer(Prediction("1", answer="No", yes_prob=0.6, no_prob=0.4)) == "yes"
    assert pope_answer(Prediction("1", answer="Yes", yes_prob=0.3, no_prob=0.7)) == "no"
    assert pope_answer(Prediction("1", answer="Yes", yes_prob=0.5, no_prob=0.5)) == "no"
    with pytest.raises(ValueError, match="together"):
        pope_answer(Prediction("1", yes_prob=0.5))


def test_pope_split_metrics_by_hand():
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    answers = ["yes", "no", "no", "yes", "no", "no"]  # tp 1, fn 2, fp 1, tn 2
    examples = [ex(i, [label], task="pope", split="random") for i, label in enumerate(labels)]
    metrics = score("pope", examples, preds(**{str(i): a for i, a in enumerate(answers)}))
    assert metrics["accuracy/random"] == pytest.approx(0.5)
    assert metrics["precision/random"] == pytest.approx(1 / 2)
    assert metrics["recall/random"] == pytest.approx(1 / 3)
    assert metrics["f1/random"] == pytest.approx(0.4)
    assert metrics["yes_ratio/random"] == pytest.approx(1 / 3)


def test_pope_accuracy_is_the_mean_of_split_accuracies():
    examples = [ex("a0", ["yes"], task="pope", split="popular"),
                ex("a1", ["no"], task="pope", split="popular")]
    examples += [ex(f"b{i}", [label], task="pope", split="adversarial")
                 for i, label in enumerate(["yes", "yes", "yes", "no", "no", "no"])]
    answers = {"a0": "yes", "a1": "no", "b0": "yes", "b1": "yes", "b2": "yes",
               "b3": "yes", "b4": "yes", "b5": "yes"}
    metrics = score("pope", examples, preds(**answers))
    assert metrics["accuracy/popular"] == 1.0 and metrics["accuracy/adversarial"] == 0.5
    assert metrics["accuracy"] == pytest.approx(0.75)  # pooled would be 5/8
    assert metrics["precision/popular"] == 1.0 and metrics["recall/adversarial"] == 1.0


def test_pope_bad_label_is_an_error():
    with pytest.raises(ValueError, match="'7'.*answers"):
        score("pope", [ex(7, ["maybe"], task="pope")], preds(**{"7": "yes"}))


# --- grounding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("[0.1, 0.2, 0.3, 0.4]", (0.1, 0.2, 0.3, 0.4)),
    ("0.1 0.2 0.3 0.4", (0.1, 0.2, 0.3, 0.4)),
    ("The box is [0.10,0.20,0.30,0.40].", (0.1, 0.2, 0.3, 0.4)),
    ("[0.5, 0.5, 0.5, 0.5, 0.9]", (0.5, 0.5, 0.5, 0.5)),  # the first four-number group
    ("[1, 2]", None), ("[0.1, 0.2, 0.3]", None), ("no box here", None), ("", None),
    ("[0.1, 0.2, 0.3, 0.4", (0.1, 0.2, 0.3, 0.4)),  # cut off before the bracket
    ("0.1, 0.2, 0.3, 0.4.", (0.1, 0.2, 0.3, 0.4)),  # a full stop after it
    ("0.1, 0.2, 0.3, 0.4.5", None), ("v2 0.1 0.2 0.3", None),  # no four whole numbers
])
def test_parse_box(text, expected):
    got = parse_box(text)
    assert got == (None if expected is None else pytest.approx(expected))


def test_box_iou_by_hand():
    assert box_iou([0, 0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]) == pytest.approx(0.0625 / 0.4375)
    assert box_iou([0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]) == 0.0
    assert box_iou([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(1.0)


def test_grounding_validity_and_threshold():
    truth = (0.0, 0.0, 1.0, 0.5)
    texts = {
        "exact": "[0, 0, 1, 0.5]",
        "half": "[0, 0, 1, 1]",          # IoU exactly 0.5: counts
        "taller": "[0, 0, 1, 0.75]",     # IoU 0.5 / 0.75 = 0.667: correct
        "low": "[0, 0, 1, 0.2]",         # IoU 0.2 / 0.5 = 0.4: wrong
        "degenerate": "[0.2, 0.1, 0.2, 0.4]",  # x1 == x2
        "outside": "[0.0, 0.0, 1.2, 0.5]",     # out of [0, 1]
        "swapped": "[1, 0.5, 0, 0]",           # x1 > x2
        "words": "the left one",               # unparsable
    }
    examples = [ex(k, task="refcoco", box=truth) for k in texts]
    metrics = score("refcoco", examples, preds(**texts))
    assert metrics["accuracy"] == pytest.approx(3 / 8)
    assert metrics["unparsable"] == pytest.approx(1 / 8)
    assert metrics["invalid"] == pytest.approx(3 / 8)


def test_iou_exactly_at_threshold_counts_and_ocid_uses_quarter():
    quarter = [ex(1, task="ocid_ref", box=(0.0, 0.0, 1.0, 0.25), clutter="dense"),
               ex(2, task="ocid_ref", box=(0.0, 0.0, 1.0, 0.125), clutter="free")]
    full = preds(**{"1": "[0, 0, 1, 1]", "2": "[0, 0, 1, 1]"})  # IoU 0.25 and 0.125
    ocid = score("ocid_ref", quarter, full)
    assert ocid["accuracy"] == 0.5
    assert ocid["accuracy/dense"] == 1.0 and ocid["accuracy/free"] == 0.0
    assert score("refcoco", quarter, full)["accuracy"] == 0.0
    half = [ex(1, task="refcoco", box=(0.0, 0.0, 1.0, 0.5))]
    assert score("refcoco", half, preds(**{"1": "[0, 0, 1, 1]"}))["accuracy"] == 1.0


def test_prediction_box_wins_over_text():
    examples = [ex(1, task="shapesworld_ref", box=(0.25, 0.25, 0.75, 0.75))]
    given = {"1": Prediction("1", answer="[0, 0, 0.1, 0.1]", box=[0.25, 0.25, 0.75, 0.75])}
    metrics = score("shapesworld_ref", examples, given)
    assert metrics["accuracy"] == 1.0 and metrics["unparsable"] == 0.0


def test_item_scores_are_what_the_accuracy_averages():
    """item_scores: each example's own score by the task's rule, keyed by id; their mean (of
    each split's mean for POPE) is the accuracy."""
    from megatron_vlm.evaluation.items import TaskItems
    from megatron_vlm.evaluation.scorers import item_groups, item_scores, score_items

    vqa = [ex(1, ["2"] * 10), ex(2, ["red"] * 2 + ["blue"] * 8), ex(3, ["cat"] * 10)]
    # soft VQA accuracy: 1; 2 matching answers of 10 -> (8 * 2/3 + 2 * 1/3) / 10 = 0.6; 0
    items = item_scores("vqav2", vqa, preds(**{"1": "two", "2": "red", "3": "dog"}))
    assert items == pytest.approx({"1": 1.0, "2": 0.6, "3": 0.0})
    pope = [ex("p0", ["yes"], task="pope", split="popular"),
            ex("a0", ["yes"], task="pope", split="adversarial"),
            ex("a1", ["no"], task="pope", split="adversarial"),
            ex("a2", ["no"], task="pope", split="adversarial")]
    metrics, items = score_items("pope", pope, preds(p0="yes", a0="no", a1="no", a2="yes"))
    assert items == {"p0": 1.0, "a0": 0.0, "a1": 1.0, "a2": 0.0}
    groups = item_groups("pope", pope)
    assert groups == {"p0": "popular", "a0": "adversarial", "a1": "adversarial",
                      "a2": "adversarial"}
    assert TaskItems(list(items), list(items.values()), list(groups.values())).value() == \
        pytest.approx(metrics["accuracy"]) == pytest.approx((1.0 + 1 / 3) / 2)
    boxes = [ex(k, task="refcoco", box=(0.0, 0.0, 1.0, 0.5)) for k in ("hit", "miss", "words")]
    assert item_scores("refcoco", boxes, preds(hit="[0, 0, 1, 0.75]", miss="[0, 0, 1, 0.2]",
                                                words="left")) == {"hit": 1.0, "miss": 0.0,
                                                                   "words": 0.0}
    assert item_groups("refcoco", boxes) is None
    gqa = [ex(1, ["yes"], task="gqa"), ex(2, ["table"], task="gqa")]
    assert item_scores("gqa", gqa, preds(**{"1": "YES!", "2": "the table"})) == \
        {"1": 1.0, "2": 0.0}


def test_grounding_needs_a_ground_truth_box():
    with pytest.raises(ValueError, match="'1'.*'box'"):
        score("refcoco", [ex(1, task="refcoco")], preds(**{"1": "[0, 0, 1, 1]"}))


# --- registry, ids, missing predictions ---------------------------------------------------------

def test_task_table_and_unknown_task():
    assert set(TASK_SCORING) == {"vqav2", "vizwiz", "textvqa", "textvqa_ocr", "gqa", "pope",
                                 "refcoco", "refcoco+", "refcocog", "ocid_ref",
                                 "shapesworld_vqa", "shapesworld_pope", "shapesworld_ref"}
    with pytest.raises(ValueError, match="unknown task 'vqa3'.*vqav2.*ocid_ref"):
        score("vqa3", [ex(1, ["a"])], preds(**{"1": "a"}))


def test_prediction_for_an_unknown_id_is_an_error():
    with pytest.raises(ValueError, match=r"p\.jsonl.*'99'"):
        score("vqav2", [ex(1, ["a"] * 10)], preds(**{"1": "a", "99": "b"}), source="p.jsonl")


def test_missing_predictions():
    examples = [ex(i, ["red"] * 10) for i in range(8)]
    with pytest.raises(ValueError, match=r"6 of 8 .*'2', '3', '4', '5', '6' \.\.\."):
        score("vqav2", examples, preds(**{"0": "red", "1": "red"}))
    metrics = score("vqav2", examples, preds(**{"0": "red", "1": "red"}), allow_missing=True)
    assert metrics["accuracy"] == pytest.approx(2 / 8)
    assert metrics["missing"] == 6 and metrics["n"] == 8
    pope = [ex(1, ["yes"], task="pope"), ex(2, ["no"], task="pope")]
    pope_metrics = score("pope", pope, {}, allow_missing=True)
    assert pope_metrics["accuracy"] == 0.0 and pope_metrics["missing"] == 2


# --- predictions files --------------------------------------------------------------------------

def test_predictions_round_trip(tmp_path):
    written = {"1": Prediction("1", "a cat"), "q2": Prediction("q2", "", box=[0.1, 0.2, 0.3, 0.4]),
               "3": Prediction("3", "Yes", yes_prob=0.25, no_prob=0.75)}
    path = tmp_path / "sub" / "p.jsonl"
    write_predictions(path, written)
    assert read_predictions(path) == written
    write_predictions(path, list(written.values()))
    assert read_predictions(path) == written


def test_official_vqa_results_list(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps([{"question_id": 5, "answer": "two"},
                                {"question_id": 6, "answer": "no"}]))
    assert read_predictions(path) == preds(**{"5": "two", "6": "no"})


@pytest.mark.parametrize("lines, message", [
    (['{"question_id": 1, "answer": "a"}', '{"answer": "b"}'],
     r"line 2: missing field 'question_id'"),
    (['{"question_id": 1, "answer": 3}'], r"line 1: field 'answer'"),
    (['{"question_id": 1, "answer": "a"}', "", '{"question_id": "1", "answer": "b"}'],
     r"line 3: field 'question_id': id '1' appears twice"),
    (['{"question_id": 1, "answer": "a"', ], r"line 1: not valid JSON"),
    (['{"question_id": 1, "box": [0.1, 0.2]}'], r"line 1: field 'box'"),
    (['{"question_id": 1, "answer": "", "yes_prob": 0.2}'],
     r"line 1: fields 'yes_prob' and 'no_prob'"),
    (['{"question_id": true, "answer": "a"}'], r"line 1: field 'question_id'"),
])
def test_malformed_predictions(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl: {message}"):
        read_predictions(path)


def test_malformed_record_in_a_list_and_missing_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"question_id": 1, "answer": "a"}, {"question_id": 2}]))
    with pytest.raises(ValueError, match=r"r\.json: record 1: missing field 'answer'"):
        read_predictions(path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_predictions(tmp_path / "nope.jsonl")
