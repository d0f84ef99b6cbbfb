"""Checkpoints across cluster sizes and asynchronous saving, on the CPU over gloo.

A DP=2 run's checkpoint resumed at DP=1 continues the DP=2 run's losses (plain and distributed
optimizer); a TP=2 checkpoint resumes at TP=1 with its RNG states skipped and one warning; the
earlier (PP, TP, DP)-keyed RNG format still loads; an asynchronous save equals a synchronous
one, becomes complete only when finalized, and leaves no process behind.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from distributed import REPO, free_port, last_json, metrics_by_step, torchrun

TINY = ["--recipe", "tiny", "train.global_batch_size=4", "train.micro_batch_size=2",
        "train.seq_length=64", "data.kind=random", "train.train_iters=4",
        "schedule.warmup_iters=1", "checkpoint.save_interval=2", "checkpoint.keep_last=4"]
SCRIPT = str(REPO / "tests" / "scripts" / "checkpoint_layouts.py")
SKIPPED_RNG = "its RNG states are not restored"
# A DP=1 continuation sums the same gradients in another order than DP=2.
TOLERANCE = 1e-5


def pretrain(nproc, out, *overrides):
    proc = torchrun(str(REPO / "pretrain_vlm.py"), [*TINY, f"output_dir={out}", *overrides],
                    nproc, module=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def resume_from(source, step, nproc, out, *overrides):
    """Runs pretrain_vlm.py in ``out`` after placing ``source``'s checkpoint of ``step`` there
    as the latest one: the same command then resumes from it."""
    name = f"step_{step:07d}"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / name, out / "checkpoints" / name)
    (out / "checkpoints" / "latest").write_text(name)
    proc = pretrain(nproc, out, *overrides)
    assert f"resumed from {out / 'checkpoints' / name} at step {step}" in proc.stderr
    return proc


def assert_continues(straight, resumed, first_step):
    a, b = metrics_by_step(straight), metrics_by_step(resumed)
    assert sorted(b) == list(range(first_step, 5))
    for step in b:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=TOLERANCE), step
        assert b[step]["lr"] == pytest.approx(a[step]["lr"], rel=1e-12)


# The distributed optimizer's state is sharded over DP and must be resharded at DP=1. The plain
# optimizer's is replicated: a checkpoint holds one copy whatever the DP size, which the
# two-host test (DP=2, saved and resumed, test_multihost.py) reads back; launching that case
# here too would cost a minute of CPU.
@pytest.mark.slow  # torchrun launches; the async-save test covers the writer in the default tier
@pytest.mark.parametrize("optimizer", ["distributed"])
def test_dp2_checkpoint_resumes_at_dp1_with_the_same_losses(tmp_path, optimizer):
    extra = ["parallel.use_distributed_optimizer=true"] if optimizer == "distributed" else []
    straight = tmp_path / "dp2"
    pretrain(2, straight, *extra)
    proc = resume_from(straight, 2, 1, tmp_path / "dp1", *extra)
    assert SKIPPED_RNG not in proc.stderr  # same TP and PP: restored
    # Steps 3 and 4: the weights, then the Adam moments and step count, as loaded.
    assert_continues(straight, tmp_path / "dp1", 3)
    common = json.loads((straight / "checkpoints" / "step_0000002" / "common.json").read_text())
    assert common["layout"] == {"tensor_parallel": 1, "pipeline_parallel": 1,
                                "data_parallel": 2, "world_size": 2}
    assert common["loader"] == {"consumed_global_batches": 2}  # global, not per rank
    assert ("optimizer_sharding" in common) is (optimizer == "distributed")


@pytest.mark.slow
def test_tp2_checkpoint_resumes_at_tp1_without_its_rng_states(tmp_path):
    straight = tmp_path / "tp2"
    pretrain(2, straight, "parallel.tensor_parallel=2")
    proc = resume_from(straight, 2, 1, tmp_path / "tp1")
    warnings = [line for line in proc.stderr.splitlines() if SKIPPED_RNG in line]
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert "saved at TP=2 PP=1 DP=1, world 2; this run is TP=1 PP=1 DP=1" in warnings[0]
    assert_continues(straight, tmp_path / "tp1", 3)  # dropout 0: RNG unused


@pytest.mark.slow  # torchrun launches; the async-save test covers the writer in the default tier
def test_rng_states_load_at_another_dp_size_and_earlier_checkpoints_still_load(tmp_path):
    saved = torchrun(SCRIPT, ["save", str(tmp_path)], 2, module=False)
    assert saved.returncode == 0, saved.stderr[-4000:]
    dp2 = last_json(saved.stdout)
    assert dp2["digests"][0] == dp2["digests"][1]  # DP ranks hold equal RNG states
    env = dict(os.environ, PYTHONPATH=str(REPO), MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1")
    loaded = subprocess.run([sys.executable, SCRIPT, "load", str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    report = last_json(loaded.stdout)
    # Saved at DP=2 in this format: restored at DP=1.
    assert report["current"]["digest"] == dp2["digests"][0] and not report["current"]["warnings"]
    # The earlier format (one RNG element per DP rank, no layout recorded): restored at the
    # DP size it was saved at, skipped with one warning at another.
    dp1 = report["legacy_dp1"]
    assert dp1["digest"] == dp1["saved_digest"] and not dp1["warnings"]
    legacy = report["legacy"]
    assert legacy["unchanged"] and legacy["step"] == 1
    assert len(legacy["warnings"]) == 1 and SKIPPED_RNG in legacy["warnings"][0]
    assert "saved at TP=1 PP=1 DP=2; this run is TP=1 PP=1 DP=1" in legacy["warnings"][0]


def test_an_optimizer_state_that_cannot_load_is_one_clear_error():
    from megatron_vlm.training.checkpointing import check_optimizer_fits

    layout = {"tensor_parallel": 2, "pipeline_parallel": 1, "data_parallel": 2, "world_size": 4}
    distributed = {"layout": layout, "optimizer_sharding": "dp_reshardable"}
    here = dict(layout, data_parallel=1, world_size=2)
    check_optimizer_fits("ck", distributed, True, here)  # another DP size: fine
    with pytest.raises(ValueError, match="use_distributed_optimizer=true; this run has false"):
        check_optimizer_fits("ck", distributed, False, here)
    with pytest.raises(ValueError, match="use_distributed_optimizer=false; this run has true"):
        check_optimizer_fits("ck", {"layout": layout}, True, here)
    other_tp = dict(here, tensor_parallel=1)
    with pytest.raises(ValueError, match=r"saved at TP=2 PP=1 DP=2, world 4, this run is TP=1 "
                                         r"PP=1 DP=1, world 2.*checkpoint.load_optimizer=false"):
        check_optimizer_fits("ck", distributed, True, other_tp)
    check_optimizer_fits("ck", {"layout": layout}, False, other_tp)  # the plain one reshards


def running(processes, wait=10.0):
    """Those of ``processes`` ([pid, start time] pairs) still running after up to ``wait``
    seconds."""
    deadline = time.time() + wait
    while True:
        alive = []
        for pid, started in processes:
            try:
                process = psutil.Process(pid)
                if (abs(process.create_time() - started) < 0.01
                        and process.status() != psutil.STATUS_ZOMBIE):
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)


def run_async(out, *flags):
    env = dict(os.environ, PYTHONPATH=str(REPO), MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, SCRIPT, "async", str(out), *flags], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, last_json(proc.stdout)


def test_async_save_equals_a_sync_save_and_completes_only_when_finalized(tmp_path):
    _, report = run_async(tmp_path)
    # save() returned: data being written to NAME.tmp, nothing looks complete yet.
    assert report["right_after_save"] == {"latest": False, "complete": False, "tmp": True,
                                          "on_done": [], "pending": ["step_0000002"],
                                          "resolves": False}
    assert report["writer_processes_seen"]  # megatron's writer really ran in the background
    assert report["completed_by_poll"] == ["step_0000002"]
    assert report["after_poll"] == {"latest": "step_0000002", "on_done": ["step_0000002"]}
    # A second save completes the one in flight before it starts.
    assert report["two_saves"] == {"latest": "step_0000003", "pending": ["step_0000004"]}
    assert report["finished"] == ["step_0000004"]
    assert report["latest_after_finish"] == "step_0000004"
    # Written while training went on, the checkpoint still holds the state of its step.
    assert report["same_tensor_names"] and report["tensor_count"] > 50
    assert report["tensors_differing"] == []
    resumed = report["losses"]
    assert resumed["async"] == resumed["sync"] == resumed["continued"]  # bitwise
    # Nothing left but Python's resource tracker, which serves the process until it exits.
    assert {pid for pid, _ in report["left_running_after_finish"]} <= {report["resource_tracker"]}
    assert running(report["writer_processes_seen"]) == []  # the tracker too, once it exited


@pytest.mark.slow  # torchrun launches; the async-save test covers the writer in the default tier
def test_a_process_exiting_during_an_async_save_leaves_no_writer_and_no_complete_checkpoint(
        tmp_path):
    proc, report = run_async(tmp_path, "--exit-without-finish")
    assert report["writer_processes_seen"]
    assert running(report["writer_processes_seen"]) == []
    assert "never completed; it stays incomplete as step_0000002.tmp" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "async").iterdir()) == ["step_0000002.tmp"]


def test_resume_point_when_latest_is_missing_or_dangling(tmp_path, caplog):
    """``latest`` naming a deleted checkpoint, or gone itself, must not send a run back to step
    0 (which would overwrite the checkpoints there): the newest complete one is used, with a
    warning; with none left, one clear error."""
    from megatron_vlm.training.checkpointing import latest_checkpoint

    ckpts = tmp_path / "checkpoints"
    assert latest_checkpoint(ckpts) is None  # a new run: nothing to resume
    for step in (4, 8):
        (ckpts / f"step_{step:07d}").mkdir(parents=True)
        (ckpts / f"step_{step:07d}" / "common.json").write_text("{}")
    (ckpts / "step_0000012").mkdir()  # an incomplete one: no common.json
    (ckpts / "latest").write_text("step_0000008")
    assert latest_checkpoint(ckpts) == ckpts / "step_0000008"
    (ckpts / "latest").write_text("step_0000012")
    with caplog.at_level("WARNING", logger="megatron_vlm"):
        assert latest_checkpoint(ckpts) == ckpts / "step_0000008"
    assert "names 'step_0000012', which is missing or incomplete" in caplog.text
    (ckpts / "latest").unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="megatron_vlm"):
        assert latest_checkpoint(ckpts) == ckpts / "step_0000008"
    assert "latest is missing" in caplog.text
    (ckpts / "latest").write_text("step_0000016")
    for step in (4, 8):
        (ckpts / f"step_{step:07d}" / "common.json").unlink()
    with pytest.raises(FileNotFoundError, match="names 'step_0000016'.*no complete checkpoint"):
        latest_checkpoint(ckpts)


def test_pruning_keeps_fraction_checkpoints_of_any_earlier_run(tmp_path):
    """Interval checkpoints beyond keep_last go; a checkpoint saved as a fraction checkpoint
    (``"kept": true``) stays even when this run's fractions fall on other steps."""
    from megatron_vlm.training.checkpointing import prune_checkpoints

    for step, kept in ((2, True), (4, False), (6, False), (8, True), (10, False)):
        d = tmp_path / f"step_{step:07d}"
        d.mkdir()
        (d / "common.json").write_text(json.dumps({"step": step, "kept": kept}))
    (tmp_path / "step_0000012.tmp").mkdir()
    prune_checkpoints(tmp_path, keep_last=1, keep={"step_0000004"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_0000002", "step_0000004", "step_0000008", "step_0000010"]


def test_resume_schedule_check_lists_every_difference(caplog):
    from megatron_vlm.config import config_to_dict, load_config
    from megatron_vlm.training.checkpoint_checks import check_resume_schedule

    saved = {"config": config_to_dict(load_config("tiny"))}
    here = config_to_dict(load_config("tiny", ["train.train_iters=60", "train.lr=1e-3",
                                                "parallel.data_parallel=2", "train.log_interval=5"]))
    with pytest.raises(ValueError) as err:
        check_resume_schedule(saved, here, "ckpt", allow=False)
    message = str(err.value)
    assert message.startswith("cannot resume from ckpt: train.train_iters: checkpoint 30, this "
                              "run 60; train.lr: checkpoint 0.003, this run 0.001. ")
    # another data-parallel size or log interval is no reason to refuse
    assert "data_parallel" not in message and "log_interval" not in message
    with caplog.at_level("WARNING", logger="megatron_vlm"):
        check_resume_schedule(saved, here, "ckpt", allow=True)
    assert "train.train_iters: checkpoint 30, this run 60" in caplog.text
    check_resume_schedule({"config": here}, here, "ckpt", allow=False)  # same settings
    check_resume_schedule({}, here, "ckpt", allow=False)  # a checkpoint without a config


def test_decoder_check_compares_the_resolved_ffn_width():
    from megatron_vlm.config import config_to_dict, load_config
    from megatron_vlm.training.checkpointing import check_decoder_matches

    saved = {"config": config_to_dict(load_config("tiny"))}  # ffn_hidden_size null: 256
    assert saved["config"]["model"]["decoder"]["ffn_hidden_size"] is None
    check_decoder_matches(saved, load_config("tiny", ["model.decoder.ffn_hidden_size=256"])
                          .model.decoder, "ckpt")
    with pytest.raises(ValueError, match="ffn_hidden_size=256 but this run has 512"):
        check_decoder_matches(saved, load_config(
            "tiny", ["model.decoder.ffn_hidden_size=512"]).model.decoder, "ckpt")
    with pytest.raises(ValueError, match="hidden_size=64 but this run has 128"):
        check_decoder_matches(saved, load_config(
            "tiny", ["model.decoder.hidden_size=128"]).model.decoder, "ckpt")
