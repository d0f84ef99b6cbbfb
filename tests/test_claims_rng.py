"""Random number generators across a resume, and the CPU redirect layer's RNG.

* A run resumed from a checkpoint draws, step for step, what the run that went straight through
  drew from every generator: python's ``random``, numpy's global one, torch's default and
  megatron's model-parallel tracker (through its fork, as tensor-parallel dropout does). The
  tiny model has no dropout, so each forward pass draws from all four itself, where dropout
  masks and augmentations would; every generator moves between steps, so a generator not saved,
  or not restored, on resume gives another draw.
* In CPU mode torch.cuda's and megatron's CUDA RNG get/set are the CPU generator's and
  round-trip, and the tracker's fork draws from a stream of its own (megatron's seed + 2718 + TP
  rank), continues it from one fork to the next and leaves the default stream where it was.
  The expected draws come from fresh ``torch.Generator`` objects seeded by hand.
"""

import random

import numpy as np
import pytest
import torch

from megatron_vlm.config import load_config

# Two steps, one checkpoint after the first (the fraction 0.5).
RUN = ["data.kind=random", "train.train_iters=2", "checkpoint.save_fractions=[0.5]",
       "train.global_batch_size=2", "train.micro_batch_size=2", "train.seq_length=32",
       "schedule.warmup_iters=1"]


def draw_from_every_generator() -> dict:
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracker = torch.rand(2).tolist()
    return {"random": random.random(), "numpy": float(np.random.rand()),
            "torch": torch.rand(2).tolist(), "tracker": tracker}


def train_recording_draws(cfg) -> dict:
    """Runs (or resumes) training in this process; returns step -> the draws made in that
    step's forward passes."""
    from megatron_vlm.training import step as step_module
    from megatron_vlm.training.loop import train

    forward, draws, by_step = step_module.forward_step, [], {}

    def forward_drawing(data_iterator, model):
        draws.append(draw_from_every_generator())
        return forward(data_iterator, model)

    def record(step, _metrics):
        by_step[step] = list(draws)
        draws.clear()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step_module, "forward_step", forward_drawing)
        train(cfg, on_step=record)
    return by_step


def test_a_resumed_run_draws_what_the_straight_run_drew(runtime, tmp_path):
    cfg = load_config("tiny", [*RUN, f"output_dir={tmp_path}"])
    straight = train_recording_draws(cfg)
    # The same command again resumes from the step-1 checkpoint, as after a kill in step 2.
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000001"
    resumed = train_recording_draws(cfg)
    assert list(resumed) == [2]
    for kind in straight[2][0]:  # one assertion per generator: the failure names it
        assert [d[kind] for d in resumed[2]] == [d[kind] for d in straight[2]], kind
    first, second = straight[1][0], straight[2][0]
    assert all(first[kind] != second[kind] for kind in first)  # every generator moved


def test_cuda_rng_get_and_set_round_trip_on_the_cpu_generator(runtime):
    from megatron.core.tensor_parallel import random as mcore_random

    reference = torch.Generator().manual_seed(11)
    first, second = torch.rand(3, generator=reference), torch.rand(3, generator=reference)
    for get, set_ in ((torch.cuda.get_rng_state, torch.cuda.set_rng_state),
                      (mcore_random._get_cuda_rng_state, mcore_random._set_cuda_rng_state)):
        torch.cuda.manual_seed(11)  # "the CUDA generator" is the CPU one in CPU mode
        assert torch.equal(torch.rand(3), first)
        state = get()
        assert torch.equal(torch.rand(3), second)
        torch.manual_seed(99)
        set_(state)
        assert torch.equal(torch.rand(3), second), get


def test_tracker_fork_draws_its_own_stream_and_leaves_the_default_one(runtime):
    from megatron.core import tensor_parallel

    from megatron_vlm.runtime.distributed import set_seed

    set_seed(5)  # pipeline rank 0: the default stream seeded 5, the fork 5 + 2718 (TP rank 0)
    default = torch.Generator().manual_seed(5)
    forked = torch.Generator().manual_seed(5 + 2718)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork():
        a = torch.rand(4)
    b = torch.rand(4)
    with tracker.fork():
        c = torch.rand(4)
    d = torch.rand(4)
    assert torch.equal(a, torch.rand(4, generator=forked))
    assert torch.equal(c, torch.rand(4, generator=forked))  # continued, not repeated
    assert torch.equal(b, torch.rand(4, generator=default))  # untouched by the forks
    assert torch.equal(d, torch.rand(4, generator=default))
