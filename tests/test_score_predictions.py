"""tools/score_predictions.py on ShapesWorld's evaluation files (real formats, made in < 1 s)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "score_predictions.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("score_predictions_tool", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


@pytest.fixture(scope="module")
def sw(tmp_path_factory) -> Path:
    from megatron_vlm.synthetic import ShapesWorldConfig, generate

    out = tmp_path_factory.mktemp("sw")
    generate(out, ShapesWorldConfig(images=8, eval_images=12, sentencepiece=False, text_docs=50,
                                    task_items=10), progress=False)
    return out / "eval"


def vqa_files(sw: Path) -> list[str]:
    return [str(sw / "vqav2" / "questions.json"), str(sw / "vqav2" / "annotations.json")]


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def perfect_vqa(sw: Path) -> list[dict]:
    annotations = json.loads((sw / "vqav2" / "annotations.json").read_text())["annotations"]
    return [{"question_id": a["question_id"], "answer": a["multiple_choice_answer"]}
            for a in annotations]


def run_tool(argv, capsys) -> tuple[int, str, str]:
    """Runs the tool in-process as its __main__ does; (exit status, stdout, stderr)."""
    from megatron_vlm.cli import run_main

    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: tool.main(argv), tool.PROG)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_perfect_vqa_predictions_score_one(sw, tmp_path, capsys):
    records = perfect_vqa(sw)
    preds = write_jsonl(tmp_path / "p.jsonl", records)
    status, out, _ = run_tool(["--task", "shapesworld_vqa", "--predictions", preds,
                               "--annotations", *vqa_files(sw), "--json"], capsys)
    assert status == 0
    metrics = json.loads(out)
    assert metrics["accuracy"] == 1.0
    assert metrics["n"] == len(records) > 20 and metrics["missing"] == 0
    assert {"accuracy/yes/no", "accuracy/number", "accuracy/other"} <= set(metrics)


def test_one_wrong_answer_costs_exactly_one_question(sw, tmp_path, capsys):
    records = perfect_vqa(sw)
    records[0]["answer"] = "definitely not an answer"
    preds = write_jsonl(tmp_path / "p.jsonl", records)
    assert tool.main(["--task", "shapesworld_vqa", "--predictions", preds,
                      "--annotations", *vqa_files(sw), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] == pytest.approx(1 - 1 / len(records))


def test_pope_all_yes_by_probabilities(sw, tmp_path, capsys):
    files = [str(sw / "pope" / f"{split}.jsonl") for split in ("random", "popular", "adversarial")]
    records = []
    for split in ("random", "popular", "adversarial"):
        for line in (sw / "pope" / f"{split}.jsonl").read_text().splitlines():
            qid = json.loads(line)["question_id"]
            # The text says "No", but the probabilities decide.
            records.append({"question_id": f"{split}/{qid}", "answer": "No",
                            "yes_prob": 0.9, "no_prob": 0.1})
    preds = write_jsonl(tmp_path / "pope.jsonl", records)
    tool.main(["--task", "shapesworld_pope", "--predictions", preds, "--annotations", *files,
               "--json"])
    metrics = json.loads(capsys.readouterr().out)
    for split in ("random", "popular", "adversarial"):  # each split is exactly half "yes"
        assert metrics[f"accuracy/{split}"] == 0.5
        assert metrics[f"yes_ratio/{split}"] == 1.0 and metrics[f"recall/{split}"] == 1.0
    assert metrics["accuracy"] == 0.5


def test_grounding_boxes_as_text_and_table_output(sw, tmp_path, capsys):
    lines = (sw / "refcoco" / "val.jsonl").read_text().splitlines()
    records = [{"question_id": r["id"], "answer": "[{}, {}, {}, {}]".format(*r["bbox"])}
               for r in map(json.loads, lines)]
    records[0]["answer"] = "I cannot tell"
    preds = write_jsonl(tmp_path / "ref.jsonl", records)
    assert tool.main(["--task", "shapesworld_ref", "--predictions", preds,
                      "--annotations", str(sw / "refcoco" / "val.jsonl")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "shapesworld_ref:"
    rows = dict(line.split() for line in out[1:])
    assert float(rows["accuracy"]) == pytest.approx(1 - 1 / len(records), abs=1e-4)
    assert float(rows["unparsable"]) == pytest.approx(1 / len(records), abs=1e-4)
    assert rows["n"] == str(len(records))
    assert len({len(line) for line in out[1:]}) == 1  # aligned columns


def test_unknown_id_exits_2_with_one_line(sw, tmp_path, capsys):
    records = perfect_vqa(sw) + [{"question_id": 987654321, "answer": "yes"}]
    preds = write_jsonl(tmp_path / "extra.jsonl", records)
    status, out, err = run_tool(["--task", "shapesworld_vqa", "--predictions", preds,
                                 "--annotations", *vqa_files(sw)], capsys)
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("score_predictions: error: ")
    assert "'987654321'" in err and "extra.jsonl" in err


def test_missing_predictions_fail_unless_allowed(sw, tmp_path, capsys):
    records = perfect_vqa(sw)
    preds = write_jsonl(tmp_path / "half.jsonl", records[::2])
    argv = ["--task", "shapesworld_vqa", "--predictions", preds, "--annotations", *vqa_files(sw),
            "--json"]
    status, _, err = run_tool(argv, capsys)
    assert status == 2 and f"{len(records) - len(records[::2])} of {len(records)}" in err
    status, out, _ = run_tool([*argv, "--allow-missing"], capsys)
    metrics = json.loads(out)
    assert status == 0 and metrics["missing"] == len(records) - len(records[::2])
    assert metrics["accuracy"] == pytest.approx(len(records[::2]) / len(records))


def test_malformed_predictions_file_exits_2(sw, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 0, "answer": "no"}\n{"question_id": 1}\n')
    status, _, err = run_tool(["--task", "shapesworld_vqa", "--predictions", str(bad),
                               "--annotations", *vqa_files(sw)], capsys)
    assert status == 2 and "bad.jsonl: line 2: missing field 'answer'" in err


def test_help_runs_as_a_script():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--allow-missing" in proc.stdout and "ocid_ref" in proc.stdout
