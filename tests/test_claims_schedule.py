"""A rewarmup run started from a checkpoint warms up to its own ``train.lr``, whatever the parent
checkpoint's peak LR or LR at its step were.

The parent here is the 80% checkpoint of a text run with another peak, and all three numbers
differ: train.lr = 4e-3, the parent's peak 1e-2, its LR at step 8 of 10 about 1.5e-3 (its
cosine, written out below). The schedule is the one the training loop builds from the config and
the parent's recorded metadata (``build_schedule``), on the loop's path, not a constructor call.
"""

import math

import pytest

from megatron_vlm.config import load_config

PARENT = {"step": 8, "total_steps": 10, "warmup_steps": 2, "peak_lr": 1e-2, "final_lr": 1e-5,
          "decay_style": "cosine", "tokens_seen": 8 * 512, "tokens_per_step": 512,
          "mode": "warmup_cosine", "parent": None, "parent_start_step": None}
LR, MIN_LR, WARMUP, STEPS = 4e-3, 1e-4, 4, 20


def test_rewarmup_peaks_at_train_lr_not_at_the_parents(tmp_path):
    from megatron_vlm.training.loop import build_schedule

    parent_lr = 1e-5 + (1e-2 - 1e-5) * 0.5 * (1 + math.cos(math.pi * (8 - 2) / (10 - 2)))
    assert len({LR, PARENT["peak_lr"], round(parent_lr, 6)}) == 3
    cfg = load_config("tiny", ["schedule.mode=rewarmup", f"train.lr={LR}", f"train.min_lr={MIN_LR}",
                               f"schedule.warmup_iters={WARMUP}", f"train.train_iters={STEPS}",
                               f"checkpoint.load={tmp_path}"])
    schedule = build_schedule(cfg, {"step": 8, "schedule": PARENT})
    lrs = [schedule.lr(k) for k in range(STEPS + 1)]
    # linear warmup from 0 to train.lr over the warmup steps, then down to train.min_lr
    assert lrs[:WARMUP + 1] == pytest.approx([LR * k / WARMUP for k in range(WARMUP + 1)],
                                             rel=1e-12)
    assert max(lrs) == pytest.approx(LR, rel=1e-12)
    assert lrs[STEPS] == pytest.approx(MIN_LR, rel=1e-12)
    middle = WARMUP + (STEPS - WARMUP) // 2  # cosine half way: the mean of peak and final
    assert lrs[middle] == pytest.approx((LR + MIN_LR) / 2, rel=1e-12)
    # the parent is recorded (provenance), and a checkpoint of this run rebuilds the same curve
    meta = schedule.metadata(5)
    assert meta.parent.step == 8 and meta.parent.peak_lr == PARENT["peak_lr"]
    assert meta.peak_lr == LR and meta.lr == pytest.approx(lrs[5], rel=1e-12)
