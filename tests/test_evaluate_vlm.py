"""tools/evaluate_vlm.py end to end: a tiny VLM trained on ShapesWorld, evaluated on the
ShapesWorld vision and text suites; results files, skipping what is scored, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from distributed import REPO, free_port


def tool(script, *args, timeout=600):
    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny VLM trained a few steps on ShapesWorld captions and conversations (its config
    records where the evaluation data is, as examples/tiny_cpu does)."""
    from megatron_vlm.data.prepare import prepare_shapesworld

    root = tmp_path_factory.mktemp("sw")
    data = prepare_shapesworld(root / "data", "tiny", images=64, text_docs=300, quiet=True)
    run = root / "run"
    proc = tool("pretrain_vlm.py", "--recipe", "tiny", "data.kind=blend", *data.overrides(),
                "data.ratios={captions: 0.3, instructions: 0.7}", "train.train_iters=6",
                "checkpoint.save_fractions=[1.0]", f"output_dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, run


@pytest.mark.slow  # the trained fixture trains and prepares ShapesWorld (minutes); the blank-images test below covers the runner at a smaller size
def test_shapesworld_suite_writes_results_and_skips_what_is_scored(trained, tmp_path):
    data, run = trained
    out = tmp_path / "eval"
    proc = tool("tools/evaluate_vlm.py", "--checkpoint", str(run), "--suite", "shapesworld",
                "--limit", "6", "--output", str(out), "--no-progress", "--json",
                "evaluation.batch_size=4", "evaluation.max_new_tokens=12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    results = json.loads((out / "results.json").read_text())
    tasks = results["tasks"]
    assert {"shapesworld_vqa", "shapesworld_pope", "shapesworld_ref"} <= set(tasks)
    assert any(entry["kind"] == "text" for entry in tasks.values())
    for task, entry in tasks.items():
        assert 0.0 <= entry["metrics"]["accuracy"] <= 1.0, task
    pope = tasks["shapesworld_pope"]["metrics"]
    assert {"accuracy/random", "accuracy/popular", "accuracy/adversarial"} <= set(pope)
    assert set(results["stable_score"]) == {"vision", "text"}
    assert printed["stable_score"]["vision"] == results["stable_score"]["vision"]["score"]
    assert printed["output"] == str(out)
    lines = (out / "predictions" / "shapesworld_vqa.jsonl").read_text().splitlines()
    assert len(lines) == tasks["shapesworld_vqa"]["metrics"]["n"]
    table = (out / "results.md").read_text()
    assert "| shapesworld_vqa | vision |" in table and "| vision |" in table
    # the predictions file re-scores offline to the same accuracy
    sw = data.raw
    rescored = tool("tools/score_predictions.py", "--task", "shapesworld_vqa", "--predictions",
                    str(out / "predictions" / "shapesworld_vqa.jsonl"), "--annotations",
                    str(sw / "eval" / "vqav2" / "questions.json"),
                    str(sw / "eval" / "vqav2" / "annotations.json"), "--json",
                    "--allow-missing")
    assert rescored.returncode == 0, rescored.stderr[-2000:]
    # a second run finds every task scored for this checkpoint and runs nothing
    again = tool("tools/evaluate_vlm.py", "--checkpoint", str(run), "--suite", "shapesworld",
                 "--limit", "6", "--output", str(out), "--no-progress",
                 "evaluation.batch_size=4", "evaluation.max_new_tokens=12")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.rstrip().endswith(f"results in {out}")
    assert again.stderr.count("already scored") == len(tasks)
    assert json.loads((out / "results.json").read_text())["tasks"] == tasks
    # --redo of one suite runs its tasks again and keeps the other suite's results
    text_only = tool("tools/evaluate_vlm.py", "--checkpoint", str(run), "--suite",
                     "shapesworld_text", "--limit", "6", "--output", str(out), "--no-progress",
                     "--redo", "evaluation.batch_size=4")
    assert text_only.returncode == 0, text_only.stderr[-3000:]
    assert "already scored" not in text_only.stderr and "keeping 3 earlier results" in text_only.stderr
    merged = json.loads((out / "results.json").read_text())
    assert set(merged["tasks"]) == set(tasks)
    assert merged["stable_score"]["vision"] == results["stable_score"]["vision"]


@pytest.mark.slow  # the trained fixture trains and prepares ShapesWorld (minutes); the blank-images test below covers the runner at a smaller size
def test_bad_inputs_get_one_clear_line(trained, tmp_path):
    _, run = trained
    missing = tool("tools/evaluate_vlm.py", "--checkpoint", str(run), "--suite",
                   "shapesworld_vision", "--tasks", "shapesworld_vqa", "--output",
                   str(tmp_path / "a"), f"evaluation.data_root={tmp_path}/nothing-here")
    assert missing.returncode == 2
    assert "evaluate_vlm: error:" in missing.stderr and "Traceback" not in missing.stderr
    other_shape = tool("tools/evaluate_vlm.py", "--checkpoint", str(run), "--suite",
                       "shapesworld_vision", "--output", str(tmp_path / "b"),
                       "model.decoder.hidden_size=128")
    assert other_shape.returncode == 2, other_shape.stderr[-2000:]
    assert "hidden_size" in other_shape.stderr and "Traceback" not in other_shape.stderr
    no_ckpt = tool("tools/evaluate_vlm.py", "--checkpoint", str(tmp_path / "none"), "--suite",
                   "shapesworld")
    assert no_ckpt.returncode == 2 and "does not exist" in no_ckpt.stderr
    unknown_task = tool("tools/evaluate_vlm.py", "--checkpoint", str(run), "--suite",
                        "shapesworld", "--tasks", "vqav2")
    assert unknown_task.returncode == 2 and "not in suite" in unknown_task.stderr
    assert tool("tools/evaluate_vlm.py", "--help").returncode == 0


@pytest.mark.slow  # the trained fixture trains and prepares ShapesWorld (minutes); the blank-images test below covers the runner at a smaller size
def test_data_parallel_replicas_give_the_single_process_predictions(trained, tmp_path):
    """Two replicas split the examples (an odd number: unequal shares) and gather them back in
    the examples' order: the files equal a one-process run's."""
    from distributed import torchrun

    _, run = trained
    args = ["--checkpoint", str(run), "--suite", "shapesworld_vision", "--tasks",
            "shapesworld_vqa", "shapesworld_ref", "--limit", "5", "--no-progress",
            "evaluation.batch_size=2", "evaluation.max_new_tokens=8"]
    single = tool("tools/evaluate_vlm.py", *args, "--output", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-3000:]
    replicas = torchrun("tools/evaluate_vlm.py", [*args, "--output", str(tmp_path / "two")],
                        nproc=2, module=False)
    assert replicas.returncode == 0, replicas.stderr[-3000:]
    for task in ("shapesworld_vqa", "shapesworld_ref"):
        one = (tmp_path / "one" / "predictions" / f"{task}.jsonl").read_text()
        two = (tmp_path / "two" / "predictions" / f"{task}.jsonl").read_text()
        assert len(one.splitlines()) == 5 and one == two, task


@pytest.fixture(scope="module")
def eval_run(runtime, tmp_path_factory):
    """A tiny random checkpoint in a run's layout and a small ShapesWorld (in-process tests)."""
    from evaluation_helpers import save_eval_run

    return save_eval_run(tmp_path_factory.mktemp("eval_run"), eval_images=4)


def test_blank_images_run_never_sees_the_images(eval_run, tmp_path):
    """evaluation.blank_images=true answers from one blank image: its results say so, its
    answers differ from those with the images, and it runs without the image files at all."""
    from megatron_vlm.evaluation.runner import EvalRequest, evaluate

    sw, checkpoint = eval_run
    # ShapesWorld's evaluation files without its images
    no_images = tmp_path / "no_images"
    shutil.copytree(sw / "eval", no_images / "eval", ignore=shutil.ignore_patterns("images"))

    def run(name, *overrides):
        out = tmp_path / name
        results = evaluate(EvalRequest(
            checkpoint=str(checkpoint), suite="shapesworld_vision", tasks=["shapesworld_vqa"],
            limit=6, output_dir=str(out), progress=False,
            overrides=["evaluation.max_new_tokens=6", *overrides]))
        lines = (out / "predictions" / "shapesworld_vqa.jsonl").read_text().splitlines()
        return (results["tasks"]["shapesworld_vqa"]["settings"]["images"],
                [json.loads(line)["answer"] for line in lines])

    images, with_images = run("images")
    blank, without = run("blank", "evaluation.blank_images=true")
    assert "BLANK" not in images and blank.startswith("BLANK images")
    assert len(without) == len(with_images) > 1 and without != with_images
    assert run("blank_no_files", "evaluation.blank_images=true",
               f"evaluation.data_root={no_images}") == (blank, without)
    with pytest.raises(FileNotFoundError, match="cannot read image"):
        run("no_files", f"evaluation.data_root={no_images}")


def test_items_and_intervals_are_written_for_every_task(eval_run, tmp_path):
    """Each task's items (one score per example, POPE's by split) land in items/TASK.jsonl,
    average to its accuracy, and give results.json its intervals; a rerun that reuses the
    scores recomputes the same intervals from the files."""
    from megatron_vlm.evaluation.compare import compare, load_arm
    from megatron_vlm.evaluation.items import read_items
    from megatron_vlm.evaluation.runner import EvalRequest, evaluate

    _, checkpoint = eval_run
    out = tmp_path / "eval"

    def run():
        return evaluate(EvalRequest(
            checkpoint=str(checkpoint), suite="shapesworld_vision", limit=2, output_dir=str(out),
            progress=False, overrides=["evaluation.max_new_tokens=4",
                                       "evaluation.bootstrap_resamples=500"]))

    results = run()
    for task, entry in results["tasks"].items():
        assert entry["items"] == f"items/{task}.jsonl"
        items = read_items(out / entry["items"])
        metrics = entry["metrics"]
        assert len(items) == metrics["n"] and items.value() == pytest.approx(metrics["accuracy"])
        lo, hi = metrics["accuracy_ci95"]
        assert lo <= metrics["accuracy"] <= hi, task
    assert read_items(out / "items" / "shapesworld_pope.jsonl").groups == \
        ["adversarial"] * 2 + ["popular"] * 2 + ["random"] * 2
    vision = results["stable_score"]["vision"]
    assert vision["ci95"][0] <= vision["score"] <= vision["ci95"][1]
    assert results["uncertainty"]["resamples"] == 500
    saved = json.loads((out / "results.json").read_text())
    assert saved["tasks"] == results["tasks"] and saved["stable_score"] == results["stable_score"]
    assert "] | 0.500 |" in (out / "results.md").read_text()  # POPE's interval beside it
    again = run()  # every task reused: the intervals come from the items files
    assert again["tasks"] == results["tasks"]
    assert again["stable_score"] == results["stable_score"]
    same = compare(load_arm(out), load_arm(out), resamples=200)
    assert all(row.p_value == 1.0 and row.difference == 0.0 for row in same.rows)
