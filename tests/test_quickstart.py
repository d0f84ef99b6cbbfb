"""The quickstart: ShapesWorld raw files -> the real data tools -> exact blend -> loader -> the
VLM training on the CPU, with losses printed per source and falling."""

import os
import subprocess
import sys

from distributed import REPO, free_port


def run(*args, timeout=600):
    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "megatron_vlm.quickstart", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def loss_rows(stdout):
    rows = [line.split() for line in stdout.splitlines()]
    return [r for r in rows if r and r[0].isdigit() and len(r) >= 2]


def test_end_to_end_from_raw_files_to_a_falling_loss(tmp_path):
    proc = run("train.train_iters=12", f"output_dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for tool in ("make_synthetic_data.py", "preprocess_text.py", "precompute_image_embeddings.py",
                 "preprocess_llava.py"):
        assert f"$ tools/{tool}" in out, tool
    header = next(line.split() for line in out.splitlines() if line.strip().startswith("step"))
    assert header == ["step", "loss", "text", "captions", "instructions"]
    rows = loss_rows(out)
    assert len(rows) == 12
    losses = [float(r[1]) for r in rows]
    assert sum(losses[-3:]) < sum(losses[:3])
    caption_losses = [float(r[3]) for r in rows if r[3] != "-"]
    assert caption_losses[-1] < caption_losses[0]
    assert "runtime: CPU mode" in proc.stderr
    assert (tmp_path / "run" / "config.yaml").exists()
    assert (tmp_path / "run" / "data" / "shards" / "captions" / "index.json").exists()
    # then the final checkpoint is evaluated on ShapesWorld's vision and text tasks
    assert "evaluation of the final checkpoint" in out
    for task in ("shapesworld_vqa", "shapesworld_pope", "shapesworld_ref", "shapesworld_arith"):
        assert f"| {task} |" in out, task
    assert "| vision |" in out and "| text |" in out
    assert (tmp_path / "run" / "eval" / "results.json").exists()
    # a rerun trains again (it does not resume at the end of the first run) and re-evaluates
    again = run("train.train_iters=4", "--eval-limit", "2", f"output_dir={tmp_path}/run")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(loss_rows(again.stdout)) == 4 and "evaluation of the final checkpoint" in again.stdout


def test_random_batches_mode_and_help(tmp_path):
    proc = run("--data", "random", "train.train_iters=4", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(loss_rows(proc.stdout)) == 4
    proc = run("--help")
    assert proc.returncode == 0
    assert "model.projector.type" in proc.stdout and "data.ratios" in proc.stdout


def test_impossible_layout_stops_with_one_clear_error():
    proc = run("--data", "random", "parallel.tensor_parallel=3")
    assert proc.returncode == 2
    assert "quickstart: error:" in proc.stderr and "tensor_parallel" in proc.stderr
