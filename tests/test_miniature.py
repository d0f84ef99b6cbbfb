"""The paper in miniature's plan and report (megatron_vlm/experiments/miniature.py), without
training: the stages, the blank-image evaluation, --short, overrides, and the closing table read
from results files."""

import json
import re

import pytest

from megatron_vlm.experiments.miniature import SHORT, miniature_plan, report


def _arg(args, flag):
    return args[args.index(flag) + 1]


def test_plan_runs_every_stage_then_the_blank_evaluation():
    plan = miniature_plan()
    assert [r.id for r in plan.runs] == ["data", "text", "image_text/ckpt80",
                                         "finetune/ckpt80_ft12", "evaluate/finetune/ckpt80_ft12",
                                         "evaluate_blank/finetune/ckpt80_ft12"]
    image_text = plan.run("image_text/ckpt80")
    assert "checkpoint.load=runs/quickstart/text/checkpoints/step_0000240" in image_text.args
    evaluation, blank = plan.runs[-2], plan.runs[-1]
    # the same checkpoint, the vision tasks only, every image blank, its own results directory
    assert _arg(blank.args, "--checkpoint") == _arg(evaluation.args, "--checkpoint")
    assert _arg(evaluation.args, "--suite") == "shapesworld"
    assert _arg(blank.args, "--suite") == "shapesworld_vision"
    assert blank.args[-1] == "evaluation.blank_images=true"
    assert "evaluation.blank_images=true" not in evaluation.args
    assert blank.run_dir != evaluation.run_dir and blank.run_dir.name == "eval_blank"
    assert _arg(blank.args, "--output") == str(blank.run_dir)
    assert blank.tasks == ("shapesworld_vqa", "shapesworld_pope", "shapesworld_ref")
    assert blank.needs == [evaluation.id] and blank.limit == evaluation.limit
    assert blank.log != evaluation.log


def test_short_version_and_overrides_reach_every_training_stage():
    full, short = miniature_plan(), miniature_plan(short=True, overrides=["train.lr=1e-3"])
    assert str(miniature_plan(short=True).spec.output_root) == SHORT["output_root"]
    # other settings run elsewhere: a stage another setting finished is never taken as done
    assert str(short.spec.output_root).startswith(SHORT["output_root"] + "-")
    assert miniature_plan(overrides=["train.lr=1e-3"]).spec.output_root not in (
        full.spec.output_root, short.spec.output_root,
        miniature_plan(overrides=["train.lr=2e-3"]).spec.output_root)
    steps = {r.stage: r.train_iters for r in short.runs if r.train_iters}
    assert steps["text"] == SHORT["text"] and steps["image_text"] == SHORT["image_text"]
    per_epoch = short.spec.stages["finetune"].steps_per_epoch
    assert steps["finetune"] == SHORT["finetune_epochs"] * per_epoch
    assert all(s < r.train_iters for s, r in zip(steps.values(),
                                                  [r for r in full.runs if r.train_iters]))
    for run in short.runs:
        if run.train_iters:
            assert "train.lr=1e-3" in run.args, run.id
    with pytest.raises(ValueError, match="no_such_key"):
        miniature_plan(overrides=["train.no_such_key=1"])


# Training work between two saves of a quickstart stage, in tokens: what one core trains in
# about a minute (one thread trains about 7,600 tokens per CPU-second, measured for the text
# stage's 256-token and the image stages' 128-token sequences alike), so an interruption of a
# run on 2 cores loses less than a minute. The fine-tuning stage once saved only at its end:
# a rerun after an interruption redid up to its 4,956 steps.
MAX_TOKENS_BETWEEN_SAVES = 450_000


def test_every_training_stage_saves_often_enough_to_lose_under_a_minute():
    from megatron_vlm.training.schedule import checkpoint_steps

    for short in (False, True):
        for run in miniature_plan(short).runs:
            if run.resolved is None:  # data and evaluations: nothing to resume
                continue
            train, ckpt = run.resolved["train"], run.resolved["checkpoint"]
            steps, interval = train["train_iters"], ckpt["save_interval"]
            # the steps the training loop saves at, and the start a rerun would go back to
            saves = {0, steps, *checkpoint_steps(steps, ckpt["save_fractions"]),
                     *(range(interval, steps, interval) if interval else ())}
            order = sorted(saves)
            gap = max(b - a for a, b in zip(order, order[1:]))
            tokens = gap * train["global_batch_size"] * train["seq_length"]
            assert tokens <= MAX_TOKENS_BETWEEN_SAVES, (run.id, short, gap, tokens)
            # the newest interval checkpoint is all a resume needs: no disk for older ones
            assert ckpt["keep_last"] == 1, run.id


def _results(path, tasks, vision, text=None):
    path.mkdir(parents=True, exist_ok=True)
    stable = {"vision": {"score": vision}}
    if text is not None:
        stable["text"] = {"score": text}
    entries = {t: {"kind": kind, "metrics": {"accuracy" if kind == "vision" else "acc": acc}}
               for t, (kind, acc) in tasks.items()}
    (path / "results.json").write_text(json.dumps({"tasks": entries, "stable_score": stable}))


def test_report_reads_both_evaluations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the plan's paths are relative to the working directory
    plan = miniature_plan(short=True)
    evaluation, blank = plan.runs[-2], plan.runs[-1]
    _results(evaluation.run_dir, {"shapesworld_vqa": ("vision", 0.8),
                                  "shapesworld_pope": ("vision", 0.75),
                                  "shapesworld_arith": ("text", 0.4)}, vision=0.275, text=0.15)
    _results(blank.run_dir, {"shapesworld_vqa": ("vision", 0.45),
                             "shapesworld_pope": ("vision", 0.5)}, vision=0.0)
    text, drop = report(plan)
    assert drop == pytest.approx(0.275)
    assert "| shapesworld_vqa | 0.800 | 0.450 |" in text
    assert "| shapesworld_arith | 0.400 | - |" in text
    assert "| **vision stable score** | 0.275 | 0.000 |" in text
    assert "vision stable score with images 0.275, with blank images 0.000: the images are " \
           "worth +0.275" in text
    root = tmp_path / SHORT["output_root"]
    assert "| shapesworld_pope | 0.750 | 0.500 |" in (root / "results.md").read_text()
    assert (root / "plots" / "tasks.png").stat().st_size > 5_000


def test_report_tests_the_images_worth_as_a_paired_difference(tmp_path, monkeypatch):
    """With items beside both evaluations, the drop of the vision stable score comes with its
    paired interval and p-value, in the printed text and in results.md."""
    from evaluation_helpers import results_with_items

    monkeypatch.chdir(tmp_path)
    plan = miniature_plan(short=True)
    evaluation, blank = plan.runs[-2], plan.runs[-1]
    pope_groups = ["adversarial", "popular", "random"] * 20
    for run, vqa, pope in ((evaluation, [1.0, 0.6, 1.0, 0.0] * 15, [1, 1, 0, 1] * 15),
                           (blank, [0.0, 0.3, 0.0, 0.0] * 15, [1, 0, 0, 1] * 15)):
        tasks = {"shapesworld_vqa": ("vision", vqa, None, 0.0),
                 "shapesworld_pope": ("vision", pope, pope_groups, 0.5)}
        if run is evaluation:
            tasks["shapesworld_arith"] = ("text", [1, 0, 0, 0] * 10, None, 0.25)
        (run.run_dir / "results.json").write_text(json.dumps(results_with_items(run.run_dir,
                                                                                tasks)))
    text, drop = report(plan)
    match = re.search(r"the images are worth (\+[\d.]+) \(95% CI \[(\+[\d.]+), (\+[\d.]+)\], "
                      r"p = ([\d.e-]+), paired bootstrap over the same 120 items\)", text)
    assert match, text
    worth, lo, hi, p = map(float, match.groups())
    assert worth == pytest.approx(drop, abs=1e-3) and 0 < lo < worth < hi and p < 0.001
    results_md = (tmp_path / SHORT["output_root"] / "results.md").read_text()
    assert f"With images against blank images, vision stable score {drop:+.3f} (95% CI" in \
        results_md


def test_prepare_command_line(tmp_path):
    import subprocess
    import sys

    from distributed import REPO

    def prepare(*args):
        return subprocess.run([sys.executable, "-m", "megatron_vlm.data.prepare", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=300)

    proc = prepare("--help")
    assert proc.returncode == 0 and "--max-shapes" in proc.stdout and "--images" in proc.stdout
    proc = prepare(str(tmp_path / "data"), "--max-shapes", "9", "--images", "4")
    assert proc.returncode == 2
    assert "max_shapes=9" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "prepare: error: tools/make_synthetic_data.py failed with status 2")
