"""Your own questions as a task (megatron_vlm.evaluation.custom_task): the JSON Lines format,
its errors (one line naming the file, the line and the field), the prompt template, the config
key, and an evaluation of a tiny random checkpoint whose results go to the run's eval/ folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from megatron_vlm.evaluation.custom_task import (CustomTask, load_custom_task,
                                                 parse_custom_tasks, prompt_text)


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


GOOD = {"image": "img/a.jpg", "question": "What colour?", "answers": ["red"]}


# ------------------------------------------------------------------------------ the file


def test_records_become_examples_in_file_order(tmp_path):
    path = write_jsonl(tmp_path / "q" / "questions.jsonl", [
        GOOD,
        "",  # blank lines are skipped (and still counted)
        {"image": "/abs/b.png", "question": "Which?", "answers": ["Two"], "id": 7,
         "choices": ["one", "two"]},
        {"image": "c.jpg", "question": "Q?", "answers": ["x", "y"], "id": "z"},
    ])
    examples = load_custom_task(CustomTask("mine", str(path)))
    assert [e.example_id for e in examples] == ["1", "7", "z"]  # default id: the line number
    assert {e.task for e in examples} == {"mine"} and {e.split for e in examples} == {"val"}
    root = str(tmp_path / "q")
    assert examples[0].image_path == os.path.join(root, "img", "a.jpg")  # relative to the file
    assert examples[1].image_path == "/abs/b.png" and examples[1].image == "/abs/b.png"
    assert examples[1].extra["choices"] == ("one", "two") and examples[1].answers == ("Two",)
    assert examples[2].answers == ("x", "y") and "choices" not in examples[2].extra
    assert [e.example_id for e in load_custom_task(CustomTask("mine", str(path)), limit=2)] == \
        ["1", "7"]


@pytest.mark.parametrize("record, line_field, message", [
    ("{not json", "line 2", "not valid JSON"),
    ('["a list"]', "line 2", "expected an object"),
    ({"question": "Q?", "answers": ["a"]}, "line 2, field 'image'", "missing"),
    ({"image": "a.jpg", "answers": ["a"]}, "line 2, field 'question'", "missing"),
    ({"image": "a.jpg", "question": "Q?"}, "line 2, field 'answers'", "missing"),
    ({"image": "a.jpg", "question": "Q?", "answers": "a"}, "line 2, field 'answers'",
     "expected a list"),
    ({"image": "a.jpg", "question": "Q?", "answers": []}, "line 2, field 'answers'",
     "non-empty list"),
    ({"image": "a.jpg", "question": "Q?", "answers": ["a", 3]}, "line 2, field 'answers'",
     "non-empty strings"),
    ({"image": "", "question": "Q?", "answers": ["a"]}, "line 2, field 'image'",
     "non-empty string"),
    ({"image": "a.jpg", "question": "Q?", "answer": ["a"]}, "line 2, field 'answer'",
     "unknown field"),
    ({"image": "a.jpg", "question": "Q?", "answers": ["green"], "choices": ["red", "blue"]},
     "line 2, field 'answers'", "'green' is not one of the choices"),
    ({"image": "a.jpg", "question": "Q?", "answers": ["red"], "choices": ["red"]},
     "line 2, field 'choices'", "two or more different choices"),
    ({"image": "a.jpg", "question": "Q?", "answers": ["red"], "choices": ["Red", "red."]},
     "line 2, field 'choices'", "two or more different choices"),
    ({"image": "a.jpg", "question": "Q?", "answers": ["a"], "id": 1}, "line 2, field 'id'",
     "'1' is also the id of line 1"),
    ({"image": "a.jpg", "question": "Q?", "answers": ["a"], "id": True}, "line 2, field 'id'",
     "an integer or a non-empty string"),
])
def test_a_malformed_line_is_one_error_naming_file_line_and_field(tmp_path, record, line_field,
                                                                   message):
    path = write_jsonl(tmp_path / "q.jsonl", [GOOD, record])
    with pytest.raises(ValueError) as err:
        load_custom_task(CustomTask("mine", str(path)))
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: {line_field}") and message in text, text
    assert "(task mine)" in text


def test_vqa_scoring_needs_four_answers_and_a_choices_prompt_needs_choices(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [GOOD])
    with pytest.raises(ValueError, match=r"line 1, field 'answers': 1 answer\(s\); scoring 'vqa' "
                                         r"needs at least 4"):
        load_custom_task(CustomTask("mine", str(path), scoring="vqa"))
    with pytest.raises(ValueError, match=r"line 1, field 'choices': missing; the prompt"):
        load_custom_task(CustomTask("mine", str(path), prompt="{question} ({choices})"))
    with pytest.raises(FileNotFoundError, match=r"evaluation.custom_tasks.mine: .*nope.jsonl not "
                                                r"found"):
        load_custom_task(CustomTask("mine", str(tmp_path / "nope.jsonl")))
    with pytest.raises(ValueError, match="no questions"):
        load_custom_task(CustomTask("mine", str(write_jsonl(tmp_path / "empty.jsonl", [""]))))


def test_prompt_template_defaults_and_the_fine_tuning_layout(tmp_path):
    from megatron_vlm.data.samples import tokenize_prompt
    from megatron_vlm.evaluation.custom_task import prompt_tokens
    from megatron_vlm.evaluation.records import Example

    plain = Example("mine", "val", "1", " What colour? ", image="a.jpg", answers=("red",))
    chosen = Example("mine", "val", "2", "What colour?", image="a.jpg", answers=("red",),
                     extra={"choices": ("red", "blue")})
    default = CustomTask("mine", "q.jsonl")
    assert prompt_text(default, plain) == "<image>\nWhat colour?"
    assert prompt_text(default, chosen) == "<image>\nWhat colour?\nred, blue"
    templated = CustomTask("mine", "q.jsonl", prompt="Q: {question} Options: {choices}. {{x}}")
    assert prompt_text(templated, chosen) == "<image>\nQ: What colour? Options: red, blue. {x}"

    class Letters:  # one token per character: the layout is visible in the ids
        def encode(self, text):
            return [ord(c) for c in text]

    # laid out as a fine-tuning conversation: [system][SEP][question][SEP], no placeholder
    ids = prompt_tokens(default, plain, Letters(), 0, "sys")
    assert ids == [*map(ord, "sys"), 0, *map(ord, "What colour?"), 0]
    assert ids == tokenize_prompt("What colour?", Letters(), 0, "sys")


@pytest.mark.parametrize("value, message", [
    ("{m: {file: a.jsonl, scoring: bleu}}", "evaluation.custom_tasks.m.scoring='bleu' must be one "
                                            "of 'exact', 'vqa'"),
    ("{m: {file: a.jsonl, prompt: 'Say {answer}'}}", "evaluation.custom_tasks.m.prompt='Say "
                                                     "{answer}' must hold {question}"),
    ("{m: {file: a.jsonl, prompt: '{question'}}", "evaluation.custom_tasks.m.prompt="),
    ("{m: {path: a.jsonl}}", "evaluation.custom_tasks.m.path: unknown field"),
    ("{m: {scoring: exact}}", "evaluation.custom_tasks.m.file=None must be the path"),
    ("{'my task': a.jsonl}", "evaluation.custom_tasks.my task: a task name is letters"),
    ("{m: 3}", "evaluation.custom_tasks.m=3 must be a file"),
])
def test_bad_config_entries_name_their_key(value, message):
    from megatron_vlm.config import load_config

    with pytest.raises(ValueError) as err:
        load_config("tiny", [f"evaluation.custom_tasks={value}"])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_config_forms_and_task_selection():
    from megatron_vlm.config import load_config
    from megatron_vlm.evaluation.runner import select_tasks

    cfg = load_config("tiny", ['evaluation.custom_tasks={a: q.jsonl, b: {file: r.jsonl, scoring: '
                               'vqa,\n prompt: "{question}\\nAnswer briefly."}}'])
    tasks = parse_custom_tasks(cfg.evaluation.custom_tasks)
    assert tasks["a"] == CustomTask("a", "q.jsonl")
    assert tasks["b"] == CustomTask("b", "r.jsonl", "vqa", "{question}\nAnswer briefly.")
    assert select_tasks("custom", None, ["a", "b"]) == (["a", "b"], [])
    assert select_tasks("custom", None) == ([], [])  # a sweep plans `suite: custom` without them
    vision, _ = select_tasks("shapesworld", None, ["a"])
    assert vision == ["shapesworld_vqa", "shapesworld_pope", "shapesworld_ref", "a"]
    assert select_tasks("shapesworld_vision", ["a", "shapesworld_ref"], ["a"]) == \
        (["shapesworld_ref", "a"], [])
    with pytest.raises(ValueError, match="evaluation.custom_tasks.pope: the name of a built-in"):
        select_tasks("custom", None, ["pope"])


# ------------------------------------------------------------------------- where results go


def test_default_output_is_the_runs_eval_folder_named_by_step(tmp_path, monkeypatch):
    from megatron_vlm.evaluation.runner import default_output_dir

    run = tmp_path / "runs" / "x"
    assert default_output_dir(run / "checkpoints" / "step_0000120") == \
        run / "eval" / "step_0000120"
    # not a run's checkpoint (a converted DCLM checkpoint, a copy): beside it, never inside
    assert default_output_dir(tmp_path / "ckpt" / "dclm1b_80") == \
        tmp_path / "ckpt" / "eval" / "dclm1b_80"
    monkeypatch.chdir(tmp_path)  # a relative path gets an absolute folder (the one printed)
    assert default_output_dir(Path("ckpt/dclm1b_80")) == tmp_path / "ckpt" / "eval" / "dclm1b_80"


# ------------------------------------------------------------------ evaluation, in-process


@pytest.fixture(scope="module")
def eval_run(runtime, tmp_path_factory):
    from evaluation_helpers import save_eval_run

    return save_eval_run(tmp_path_factory.mktemp("custom"), eval_images=4)


def evaluate_custom(checkpoint, file, *overrides, **request):
    from megatron_vlm.evaluation.runner import EvalRequest, evaluate

    return evaluate(EvalRequest(
        checkpoint=str(checkpoint), suite="custom", progress=False,
        overrides=[f"evaluation.custom_tasks={{mine: {file}}}", "evaluation.max_new_tokens=6",
                   "evaluation.batch_size=4", *overrides], **request))


def test_custom_task_evaluation_end_to_end(eval_run, tmp_path, caplog):
    sw, checkpoint = eval_run
    images = sorted((sw / "eval" / "images").iterdir())
    shutil.copy(images[0], tmp_path / "first.jpg")
    records = [{"image": "first.jpg", "question": "What shape is it?", "answers": ["circle"]},
               {"image": str(images[1]), "question": "Which colour?", "answers": ["red"],
                "choices": ["red", "blue"], "id": "c1"},
               {"image": "first.jpg", "question": "How many shapes?", "answers": ["2"]}]
    path = write_jsonl(tmp_path / "questions.jsonl", records)
    results = evaluate_custom(checkpoint, path)
    out = checkpoint.parent.parent / "eval" / "step_0000000"  # the run's eval/, by step
    assert results["output_dir"] == str(out)
    saved = json.loads((out / "results.json").read_text())
    entry = saved["tasks"]["mine"]
    assert entry["custom"] is True and entry["kind"] == "vision"
    assert entry["metrics"]["n"] == 3 and "off_choices" in entry["metrics"]
    assert "stable_score" in saved and "vision" not in saved["stable_score"]  # not averaged
    assert "| mine | vision (custom" in (out / "results.md").read_text()
    lines = [json.loads(x) for x in (out / "predictions" / "mine.jsonl").read_text().splitlines()]
    assert [p["question_id"] for p in lines] == ["1", "c1", "3"]
    # The model's own answers as the correct ones: exact scoring gives full marks, and the
    # edited file (another sha256) is scored again rather than reused.
    answered = [dict(r, answers=[p["answer"]]) for r, p in zip(records, lines) if p["answer"]
                and "choices" not in r]
    assert answered
    write_jsonl(path, answered)
    again = evaluate_custom(checkpoint, path)
    assert again["tasks"]["mine"]["metrics"]["accuracy"] == 1.0
    with caplog.at_level("INFO", logger="megatron_vlm"):
        evaluate_custom(checkpoint, path)
    assert "mine: already scored" in caplog.text


def test_suite_custom_without_tasks_and_a_missing_image_are_one_line(eval_run, tmp_path):
    from megatron_vlm.evaluation.runner import EvalRequest, evaluate

    _, checkpoint = eval_run
    with pytest.raises(ValueError, match="suite 'custom' has no tasks: name your own in "
                                         "evaluation.custom_tasks"):
        evaluate(EvalRequest(checkpoint=str(checkpoint), suite="custom", progress=False))
    with pytest.raises(ValueError, match=r"--tasks names other, not in suite 'custom' \(its "
                                         r"tasks: mine\)"):
        evaluate_custom(checkpoint, tmp_path / "q.jsonl", tasks=["other"])
    path = write_jsonl(tmp_path / "q.jsonl", [GOOD])
    with pytest.raises(FileNotFoundError, match=r"task mine, example 1: cannot read image "
                                                r".*img/a.jpg"):
        evaluate_custom(checkpoint, path, output_dir=str(tmp_path / "out"))
