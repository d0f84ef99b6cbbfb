"""The useful-token ledger: per source what a run consumed, counted on the host from the blend
index, meeting the blend's ratio guarantee, saved with each checkpoint and continued after a
resume exactly as a run that went straight through counted it."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from megatron_vlm.config import load_config
from test_loader import config, make_loader, world  # noqa: F401  (world: a module fixture)

L = 32


def synthetic_blend():
    """Three sources of variable lengths: text (constant), captions (each with an image),
    instructions (some with an image); (index, sources, fractions)."""
    from megatron_vlm.data.blend import BlendSource, build_blend_index

    rng = np.random.default_rng(5)
    captions = rng.integers(10, L + 1, 40).astype(np.int32)
    instructions = rng.integers(3, L + 1, 25).astype(np.int32)
    instruction_images = np.where(rng.random(25) < 0.6, 8, 0).astype(np.int32)
    instructions = np.maximum(instructions, instruction_images + 1)
    sources = [BlendSource("text", 30, L, image_positions=0),
               BlendSource("captions", 40, captions, image_positions=8),
               BlendSource("instructions", 25, instructions, image_positions=instruction_images)]
    fractions = {"text": 0.5, "captions": 0.3, "instructions": 0.2}
    index = build_blend_index(sources, fractions, total_tokens=None, seq_length=L,
                              global_batch_size=8, seed=3, num_batches=40)
    return index, sources, fractions


def test_tallies_meet_the_blend_guarantee_and_split_real_tokens_from_padding():
    """Each source's real tokens, added up batch by batch as the ledger does, stay within the
    blend's proved bound of their share at every global-batch boundary (docs/blend.md); padding
    is the rest of each slot; images are the sequences with image positions."""
    from megatron_vlm.data.batch_tally import BlendTally
    from megatron_vlm.training.ledger import TokenLedger

    index, sources, fractions = synthetic_blend()
    tally = BlendTally(index, sources)
    ledger = TokenLedger(L, dict(tally.epoch_tokens))
    f = np.array([fractions[s.name] for s in sources])
    for b in range(index.num_batches):
        ledger.add(tally(b))
        real = np.array([ledger.sources[s.name].real_tokens for s in sources])
        assert (np.abs(real - f * real.sum()) <= index.bounds + 1e-6).all(), (b, real)
        assert (np.abs(real - f * real.sum()) < L).all()  # within one sequence
    end = {s["name"]: s for s in index.summary()["sources"]}
    for source in sources:
        counts = ledger.sources[source.name]
        assert counts.sequences == end[source.name]["sequences"]
        assert counts.real_tokens == end[source.name]["tokens"]
        assert counts.padding_tokens == counts.sequences * L - counts.real_tokens
        assert counts.image_positions == end[source.name]["image_positions"]
        assert ledger.epochs(source.name) == pytest.approx(
            counts.real_tokens / source.epoch_tokens)
    assert ledger.sources["text"].padding_tokens == 0 and ledger.sources["text"].images == 0
    assert ledger.sources["captions"].images == ledger.sources["captions"].sequences
    drawn = np.asarray(index.sample_ids)[np.asarray(index.source_ids) == 2]
    assert ledger.sources["instructions"].images == int(
        np.count_nonzero(sources[2].image_positions[drawn])) > 0
    assert ledger.sources["captions"].padding_tokens > 0  # captions shorter than their slots
    assert sum(s["share"] for s in ledger.summary()["sources"].values()) == pytest.approx(1.0)


def test_the_loader_tallies_each_global_batch_it_returns(world):  # noqa: F811
    """Through the real loader on shards: the tally of every step is that global batch's
    composition (rows of each source, positions that are not padding), read from the index."""
    from megatron_vlm.data.loader import SOURCE_ORDER

    cfg = config(world, "train.seq_length=64", "train.global_batch_size=8")
    loader, index = make_loader(cfg)
    for _ in range(4):
        microbatches = loader.next_step()
        rows = np.concatenate([mb["source_ids"].numpy() for mb in microbatches])
        real = np.concatenate([(mb["segment_ids"].numpy() >= 0).sum(axis=1)
                               for mb in microbatches])
        for name, counts in loader.last_tally.items():
            mine = rows == SOURCE_ORDER.index(name)
            assert counts.sequences == int(mine.sum()), name
            assert counts.real_tokens == int(real[mine].sum()), name


# A run on the shards, resumed from its step-1 checkpoint: the first invocation saves at step 1
# only, so the second one resumes there, as after a kill in step 2.
RUN = ["train.train_iters=3", "checkpoint.save_fractions=[0.34]", "train.seq_length=64",
       "train.global_batch_size=4", "train.micro_batch_size=2", "train.log_interval=1",
       "schedule.warmup_iters=1", "data.ratios={text: 0.5, captions: 0.3, instructions: 0.2}"]


def ledger_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("ledger/")}


def test_a_resumed_run_ends_with_the_ledger_of_a_straight_run(  # noqa: F811 (world)
        runtime, world, tmp_path, caplog):
    from megatron_vlm.training.loop import train

    cfg = config(world, *RUN, f"output_dir={tmp_path / 'run'}")
    straight = {m["step"]: m for m in train(cfg)}
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step_0000001" / "common.json")
                       .read_text())["ledger"]
    assert saved["steps"] == 1
    assert {name: c["real_tokens"] for name, c in saved["sources"].items()} == {
        name.split("/")[1]: v for name, v in ledger_metrics(straight[1]).items()
        if name.endswith("/real_tokens")}
    with caplog.at_level(logging.INFO, logger="megatron_vlm"):
        resumed = {m["step"]: m for m in train(cfg)}
    assert sorted(resumed) == [2, 3]
    assert ledger_metrics(resumed[3]) == ledger_metrics(straight[3])
    assert straight[3]["ledger/captions/padding_tokens"] > 0
    assert straight[3]["ledger/captions/images"] > 0 and straight[3]["ledger/text/images"] == 0
    # real tokens per second leave the padding out
    assert 0 < resumed[3]["real_tokens_per_s"] < resumed[3]["tokens_per_s"]
    assert "token ledger after 3 global batches" in caplog.text


def test_random_batches_count_one_source_with_every_position_real(runtime, tmp_path):
    from megatron_vlm.training.loop import make_batches

    cfg = load_config("tiny", ["data.kind=random", "train.global_batch_size=4",
                               "train.seq_length=32", f"output_dir={tmp_path}"])
    next_step, loader = make_batches(cfg, 0, 2, None)  # rank 0 of two: the tally is global
    next_step()
    counts = loader.last_tally["random"]
    assert (counts.sequences, counts.real_tokens, counts.padding_tokens) == (4, 4 * 32, 0)
    assert counts.images == 2 and counts.image_positions == 2 * 16
    assert loader.epoch_tokens == {"random": None}
