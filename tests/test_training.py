"""pretrain_vlm.py / finetune_vlm.py end to end on the CPU: schedules continued from an x%
checkpoint, exact resume after SIGKILL, the stage chain, frozen vs trainable encoder, and
bad configs stopping at start."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from distributed import REPO, free_port, metrics_by_step

TINY = ["--recipe", "tiny", "train.global_batch_size=4", "train.micro_batch_size=2",
        "train.seq_length=64"]


def entry(script, *args, timeout=300, wait=True):
    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / script), *TINY, *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def final_weights(run_dir, step):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = run_dir / f"weights_{step}.pt"
    dcp_to_torch_save(str(run_dir / "checkpoints" / f"step_{step:07d}"), str(target))
    state = torch.load(target, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and "_extra_state" not in k
            and not k.startswith("optimizer")}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("text")
    proc = entry("pretrain_vlm.py", "data.kind=random", "train.train_iters=10",
                 "schedule.warmup_iters=2", "checkpoint.save_fractions=[0.2,0.8,1.0]",
                 f"output_dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_text_run_saves_checkpoints_at_schedule_fractions(text_run):
    names = sorted(p.name for p in (text_run / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step_0000002", "step_0000008", "step_0000010"]
    common = json.loads((text_run / "checkpoints" / "step_0000008" / "common.json").read_text())
    assert common["step"] == 8 and common["fraction"] == 0.8
    assert common["schedule"]["step"] == 8 and common["schedule"]["total_steps"] == 10
    assert common["loader"]["consumed_global_batches"] == 8


def test_continue_mode_cools_down_from_the_checkpoint_lr(text_run, tmp_path):
    from megatron_vlm.training.schedule import LRSchedule

    text = metrics_by_step(text_run)
    text_schedule = LRSchedule.warmup_cosine(10, 2, 3e-3, 1e-5)
    assert text[9]["lr"] == pytest.approx(text_schedule.lr(8), abs=1e-15)
    proc = entry("pretrain_vlm.py", "data.kind=random", "train.train_iters=6",
                 f"checkpoint.load={text_run}/checkpoints/step_0000008", "schedule.mode=continue",
                 "checkpoint.save_fractions=[1.0]", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mode=continue" in proc.stderr and "from its step 8/10" in proc.stderr
    lrs = [m["lr"] for _, m in sorted(metrics_by_step(tmp_path).items())]
    assert lrs[0] == pytest.approx(text_schedule.lr(8), rel=1e-12)  # the text run's LR at 80%
    assert lrs == sorted(lrs, reverse=True)
    # The schedule ends at the text run's final LR: the end-of-run checkpoint records it.
    from megatron_vlm.training.schedule import ScheduleMetadata

    end = json.loads((tmp_path / "checkpoints" / "step_0000006" / "common.json").read_text())
    meta = ScheduleMetadata.from_dict(end["schedule"])
    assert meta.step == meta.total_steps == 6 and meta.lr == 1e-5
    assert meta.parent.step == 8 and meta.mode == "continue"


def test_rewarmup_reaches_its_peak_at_the_end_of_warmup(text_run, tmp_path):
    proc = entry("pretrain_vlm.py", "data.kind=random", "train.train_iters=8", "train.lr=3e-3",
                 f"checkpoint.load={text_run}", "schedule.mode=rewarmup", "schedule.warmup_iters=3",
                 f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lrs = [m["lr"] for _, m in sorted(metrics_by_step(tmp_path).items())]
    assert lrs[:3] == pytest.approx([0.0, 1e-3, 2e-3]) and lrs[3] == pytest.approx(3e-3)


@pytest.mark.slow  # test_claims_rng covers exact resume in-process
def test_sigkill_and_resume_continue_the_same_losses_bitwise(tmp_path):
    args = ["data.kind=random", "train.train_iters=12", "checkpoint.save_interval=1",
            "checkpoint.keep_last=2", "schedule.warmup_iters=2"]
    straight = tmp_path / "straight"
    proc = entry("pretrain_vlm.py", *args, f"output_dir={straight}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tmp_path / "killed"
    kill_at = random.Random().randint(3, 9)
    victim = entry("pretrain_vlm.py", *args, f"output_dir={killed}", wait=False)
    deadline = time.time() + 240
    while time.time() < deadline:
        path = killed / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= kill_at:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert len(metrics_by_step(killed)) < 12
    proc = entry("pretrain_vlm.py", *args, f"output_dir={killed}")  # the same command resumes
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    a, b = metrics_by_step(straight), metrics_by_step(killed)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in a]  # bitwise
    assert [a[s]["lr"] for s in a] == [b[s]["lr"] for s in a]
    wa, wb = final_weights(straight, 12), final_weights(killed, 12)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    kept = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_0000011", "step_0000012"]


@pytest.mark.parametrize("frozen", [pytest.param(True, marks=pytest.mark.slow), False])
def test_frozen_encoder_stays_fixed_and_out_of_the_optimizer(tmp_path, frozen):
    proc = entry("pretrain_vlm.py", "data.kind=random", "train.train_iters=3",
                 "model.encoder.mode=online", f"model.encoder.frozen={str(frozen).lower()}",
                 "checkpoint.save_fractions=[1.0]", "checkpoint.save_interval=1", "checkpoint.keep_last=3",
                 f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # (a trainable SigLIP keeps its unused pooling head frozen: "partly trainable")
    expected = r"vision encoder +frozen" if frozen else r"vision encoder +(partly )?trainable"
    assert re.search(expected, proc.stderr), proc.stderr[-2000:]
    first, last = final_weights(tmp_path, 1), final_weights(tmp_path, 3)
    encoder = [k for k in first if k.startswith("vision_encoder.")]
    assert encoder
    changed = [k for k in encoder if not torch.equal(first[k], last[k])]
    if frozen:
        assert changed == []
    else:
        assert changed
    state = torch.load(tmp_path / "weights_3.pt", weights_only=False)
    optimizer_keys = " ".join(k for k in state if k.startswith("optimizer"))
    assert ("vision_encoder" in optimizer_keys) is (not frozen)


@pytest.mark.slow  # a dozen starts; test_cli_errors covers the one-line path
def test_bad_configs_stop_at_start_with_one_clear_error(text_run, tmp_path):
    missing = entry("pretrain_vlm.py", "data.kind=random", f"checkpoint.load={tmp_path}/nowhere",
                    f"output_dir={tmp_path}/a")
    assert missing.returncode == 2 and "pretrain_vlm: error:" in missing.stderr
    assert "nowhere does not exist" in missing.stderr and "Traceback" not in missing.stderr
    fraction = entry("pretrain_vlm.py", "data.kind=random", "checkpoint.save_fractions=[0.5,1.2]")
    assert fraction.returncode == 2 and "every fraction must be in (0, 1]" in fraction.stderr
    # a checkpoint without schedule metadata cannot be continued
    bare = tmp_path / "bare"
    import shutil

    shutil.copytree(text_run / "checkpoints" / "step_0000008", bare)
    common = json.loads((bare / "common.json").read_text())
    del common["schedule"]
    (bare / "common.json").write_text(json.dumps(common))
    no_meta = entry("pretrain_vlm.py", "data.kind=random", f"checkpoint.load={bare}",
                    "schedule.mode=continue", f"output_dir={tmp_path}/b")
    assert no_meta.returncode == 2 and "no schedule metadata" in no_meta.stderr
    other_vocab = entry("pretrain_vlm.py", "data.kind=random", "model.decoder.vocab_size=640",
                        f"checkpoint.load={text_run}", f"output_dir={tmp_path}/e")
    assert other_vocab.returncode == 2 and "model.decoder.vocab_size=512" in other_vocab.stderr
    needs_load = entry("finetune_vlm.py", "data.kind=random", f"output_dir={tmp_path}/c")
    assert needs_load.returncode == 2 and "checkpoint.load" in needs_load.stderr
    try:
        import wandb  # noqa: F401
    except ImportError:  # without the package, asking for W&B is one clear error
        no_wandb = entry("pretrain_vlm.py", "data.kind=random", "train.wandb_project=vlm",
                         f"output_dir={tmp_path}/d")
        assert no_wandb.returncode == 2 and "wandb is not installed" in no_wandb.stderr


@pytest.mark.slow  # test_checkpoint_rules covers pruning
def test_resume_with_another_schedule_stops_and_fraction_checkpoints_are_never_pruned(
        text_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(text_run, run)  # steps 2 (20%), 8 (80%) and 10 (100%) of 10
    (run / "checkpoints" / "latest").write_text("step_0000008")
    # another decoder: one line at start, not a silent resize or a traceback from the loader
    # (the resolved ffn width: test_checkpoint_layouts.py)
    other = entry("pretrain_vlm.py", "data.kind=random", "train.train_iters=10",
                  "schedule.warmup_iters=2", "checkpoint.save_fractions=[0.2,0.8,1.0]",
                  "model.decoder.vocab_size=640", f"output_dir={run}")
    assert other.returncode == 2 and "vocab_size=512 but this run has 640" in other.stderr, \
        other.stderr[-2000:]
    assert "Traceback" not in other.stderr
    longer = entry("pretrain_vlm.py", "data.kind=random", "train.train_iters=20",
                   "schedule.warmup_iters=2", "checkpoint.save_fractions=[0.2,0.8,1.0]",
                   f"output_dir={run}")
    assert longer.returncode == 2 and "Traceback" not in longer.stderr, longer.stderr[-2000:]
    assert "cannot resume from" in longer.stderr and \
        "train.train_iters: checkpoint 10, this run 20" in longer.stderr
    assert "checkpoint.allow_schedule_change=true" in longer.stderr
    # allowed: it resumes at step 8 and saves at 16 and 20 (keep_last=1), but the first run's
    # fraction checkpoints stay
    allowed = entry("pretrain_vlm.py", "data.kind=random", "train.train_iters=20",
                    "schedule.warmup_iters=2", "checkpoint.save_fractions=[0.2,0.8,1.0]",
                    "checkpoint.keep_last=1", "checkpoint.allow_schedule_change=true",
                    f"output_dir={run}")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "schedule settings changed" in allowed.stderr and "resumed from" in allowed.stderr
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step_0000002", "step_0000008", "step_0000010", "step_0000016",
                     "step_0000020"], names


@pytest.fixture(scope="module")
def shapesworld(tmp_path_factory):
    from megatron_vlm.data.prepare import prepare_shapesworld

    root = tmp_path_factory.mktemp("shapesworld")
    return prepare_shapesworld(root, "tiny", ["train.seq_length=64"], images=96, text_docs=600,
                               quiet=True)


@pytest.mark.slow  # three trainings; the stage tests below cover each stage
def test_text_then_image_text_from_80_percent_then_finetune(shapesworld, tmp_path):
    data = ["data.kind=blend", *shapesworld.overrides(), "train.lr=3e-3"]
    text, image, tuned = tmp_path / "text", tmp_path / "image", tmp_path / "tuned"
    proc = entry("pretrain_vlm.py", *data, "data.ratios={text: 1.0}", "train.train_iters=10",
                 "checkpoint.save_fractions=[0.8,1.0]", f"output_dir={text}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = entry("pretrain_vlm.py", *data, "data.ratios={text: 0.5, captions: 0.5}",
                 "train.train_iters=16", f"checkpoint.load={text}/checkpoints/step_0000008",
                 "schedule.mode=continue", "checkpoint.save_fractions=[1.0]", f"output_dir={image}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = entry("finetune_vlm.py", *data, "data.ratios={instructions: 1.0}",
                 "train.train_iters=16", f"checkpoint.load={image}", "checkpoint.load_optimizer=false",
                 f"output_dir={tuned}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "weights only" in proc.stderr and "mode=rewarmup" in proc.stderr

    def falls(run, key):
        values = [m[key] for _, m in sorted(metrics_by_step(run).items()) if key in m]
        return sum(values[-4:]) / 4 < sum(values[:4]) / 4

    assert falls(image, "loss/captions")
    assert falls(tuned, "loss/instructions")
    first_image_lr = metrics_by_step(image)[1]["lr"]
    from megatron_vlm.training.schedule import LRSchedule

    assert first_image_lr == pytest.approx(LRSchedule.warmup_cosine(10, 0, 3e-3, 1e-5).lr(8))


@pytest.mark.slow  # test_host_sync covers a trainable encoder step
def test_unfrozen_encoder_trains_on_image_shards_through_the_loader(shapesworld, tmp_path):
    """model.encoder.mode=online on ShapesWorld's image shards: the blend loader's worker
    decodes the images, the encoder trains; precomputed mode on the same shards is one clear
    error at start."""
    from megatron_vlm.data.prepare import prepare_image_shards

    prepare_image_shards(shapesworld.raw.parent, "tiny", ["train.seq_length=64"], quiet=True)
    common = ["data.kind=blend", *shapesworld.online_overrides(),
              "data.ratios={text: 0.5, captions: 0.5}", "train.train_iters=3", "train.lr=3e-3"]
    proc = entry("pretrain_vlm.py", *common, "model.encoder.mode=online",
                 "model.encoder.frozen=false", "data.num_workers=1",
                 "checkpoint.save_fractions=[1.0]", "checkpoint.save_interval=1",
                 "checkpoint.keep_last=3", f"output_dir={tmp_path}/online")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, last = final_weights(tmp_path / "online", 1), final_weights(tmp_path / "online", 3)
    encoder = [k for k in first if k.startswith("vision_encoder.")]
    assert encoder and [k for k in encoder if not torch.equal(first[k], last[k])]
    wrong = entry("pretrain_vlm.py", *common, "model.encoder.mode=precomputed",
                  f"output_dir={tmp_path}/precomputed")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr, wrong.stderr[-3000:]
    assert "holds images" in wrong.stderr and "model.encoder.mode=online" in wrong.stderr


@pytest.mark.slow  # two trainings
def test_projector_ablation_starts_from_the_text_run_decoder(text_run, tmp_path):
    """A linear projector cannot take the text run's 2-layer projector weights: the decoder
    alone loads (and, without load_parts=decoder, the mismatch is one clear error)."""
    common = ["data.kind=random", "train.train_iters=2", "model.projector.type=linear",
              f"checkpoint.load={text_run}/checkpoints/step_0000008", "schedule.mode=continue",
              "checkpoint.load_optimizer=false"]
    whole = entry("pretrain_vlm.py", *common, f"output_dir={tmp_path}/a")
    assert whole.returncode == 2 and "does not fit the model" in whole.stderr
    decoder = entry("pretrain_vlm.py", *common, "checkpoint.load_parts=decoder",
                    "checkpoint.save_fractions=[1.0]", f"output_dir={tmp_path}/b")
    assert decoder.returncode == 0, decoder.stderr[-3000:]
    assert "decoder weights only" in decoder.stderr
    with_optimizer = entry("pretrain_vlm.py", *common[:-1], "checkpoint.load_parts=decoder",
                           f"output_dir={tmp_path}/c")
    assert with_optimizer.returncode == 2 and "load_optimizer=false" in with_optimizer.stderr


# ---- the start and the throughput figure, in this process -----------------------------------

# The smallest run: 4 steps of 2 sequences of 32 positions, a log line every step.
SMALL = ["data.kind=random", "train.train_iters=4", "train.global_batch_size=2",
         "train.micro_batch_size=2", "train.seq_length=32", "train.log_interval=1"]


def test_the_data_is_checked_before_the_model_is_built(runtime, tmp_path, monkeypatch):
    """A missing data path used to stop the run only after the model was built (12 s of the
    tiny recipe on 2 cores), and leave an empty run directory behind."""
    from megatron_vlm.config import load_config
    from megatron_vlm.model import build
    from megatron_vlm.training.loop import train

    def no_model(cfg):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(build, "build_model", no_model)
    out = tmp_path / "run"
    cfg = load_config("tiny", [*SMALL, "data.kind=blend", "data.ratios={text: 1.0}",
                               f"data.tokenizer={tmp_path}/nowhere/tokenizer.json",
                               f"data.text={tmp_path}/nowhere/text", f"output_dir={out}"])
    with pytest.raises(FileNotFoundError, match="nowhere/tokenizer.json"):
        train(cfg)
    assert not out.exists()


def test_a_failed_start_removes_what_it_created_and_nothing_else(runtime, tmp_path, monkeypatch):
    """A start that fails once the run directory is made (a checkpoint that does not fit the
    model, Ctrl-C) removes the directory, or in one that was there, what it added."""
    from megatron_vlm.config import load_config
    from megatron_vlm.model import build
    from megatron_vlm.training.loop import train

    def failing_model(cfg):
        raise ValueError("the model does not build")

    monkeypatch.setattr(build, "build_model", failing_model)
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match="does not build"):
        train(load_config("tiny", [*SMALL, f"output_dir={fresh}"]))
    assert not fresh.exists()
    there = tmp_path / "there"
    (there / "notes").mkdir(parents=True)
    (there / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="does not build"):
        train(load_config("tiny", [*SMALL, f"output_dir={there}"]))
    assert sorted(p.name for p in there.iterdir()) == ["metrics.jsonl", "notes"]


def test_tokens_per_second_leave_out_checkpoint_saves(runtime, tmp_path, monkeypatch):
    """tokens/s jumped between 3.6k and 27k on one run: a log interval holding a checkpoint
    save counted the save as training. With a save that takes 2 s, the step after it still
    reports a step's speed, and the save's seconds are reported apart."""
    from megatron_vlm.config import load_config
    from megatron_vlm.training import checkpointing as ckpt
    from megatron_vlm.training.loop import train

    save_s = 2.0

    def slow_save(self, directory, model, optimizer, common, update_latest=True, on_done=None):
        time.sleep(save_s)
        on_done(directory)
        return directory

    monkeypatch.setattr(ckpt.CheckpointWriter, "save", slow_save)
    cfg = load_config("tiny", [*SMALL, "checkpoint.save_interval=2", f"output_dir={tmp_path}"])
    history = {m["step"]: m for m in train(cfg)}
    tokens_per_step = 2 * 32
    after_save = tokens_per_step / history[3]["tokens_per_s"]  # the seconds step 3 counted
    assert after_save < save_s / 2, history[3]
    assert history[3]["checkpoint_s"] >= save_s and "checkpoint_s" not in history[2]
    assert "loader_startup_s" in history[1]  # the first batch, timed apart too


def test_an_interrupted_run_says_where_it_stopped_and_how_to_go_on(tmp_path):
    """The line Ctrl-C prints (tests/test_process_lifecycle.py sends the signal): the last
    step, the checkpoint the same command resumes from, and that command."""
    from megatron_vlm.config import load_config
    from megatron_vlm.training.loop import where_it_stopped

    cfg = load_config("tiny", [f"output_dir={tmp_path}", "train.train_iters=10"])
    assert where_it_stopped(cfg, 3, "CMD") == \
        "after step 3 of 10, with no checkpoint saved; to start it again, run the same command: CMD"
    assert where_it_stopped(cfg, None, "CMD").startswith("during the start, with no checkpoint")
    step = tmp_path / "checkpoints" / "step_0000006"
    step.mkdir(parents=True)
    (step / "common.json").write_text(json.dumps({"step": 6}))
    (step.parent / "latest").write_text(step.name)
    assert where_it_stopped(cfg, 7, "CMD") == (
        f"after step 7 of 10; its last checkpoint is {step} (step 6); to resume from it, run the "
        "same command: CMD")
    cfg = load_config("tiny", [f"output_dir={tmp_path}", "checkpoint.resume=false"])
    assert where_it_stopped(cfg, 7, "CMD").endswith(
        "run the same command with checkpoint.resume=true: CMD")
