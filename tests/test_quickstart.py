"""The quickstart entry point: a tiny VLM trained on the CPU, losses printed and falling."""

import os
import subprocess
import sys

from distributed import REPO, free_port


def run(*args, timeout=300):
    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "megatron_vlm.quickstart", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_quickstart_trains_and_prints_a_falling_loss(tmp_path):
    proc = run("train.train_iters=6", f"output_dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()]
    losses = [float(r[1]) for r in rows if len(r) == 2 and r[0].isdigit()]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert "runtime: CPU mode" in proc.stderr
    assert (tmp_path / "run" / "config.yaml").exists()


def test_quickstart_help_lists_config_keys():
    proc = run("--help")
    assert proc.returncode == 0
    assert "model.projector.type" in proc.stdout and "parallel.tensor_parallel" in proc.stdout


def test_impossible_layout_stops_with_one_clear_error():
    proc = run("parallel.tensor_parallel=3")
    assert proc.returncode != 0
    assert "tensor_parallel" in proc.stderr
