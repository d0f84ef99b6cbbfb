"""Which checkpoints a run keeps (checkpoint.keep_last counts interval checkpoints only), and the
one line a checkpoint of another model shape stops a resume or a fine-tune with, listing every
field that differs. No model is built: fake checkpoint directories and configs."""

import json

import pytest

from megatron_vlm.config import config_to_dict, load_config


def _save(directory, step, fraction):
    """A checkpoint directory as the training loop leaves it (common.json written last)."""
    path = directory / f"step_{step:07d}"
    path.mkdir(parents=True)
    (path / "common.json").write_text(json.dumps({"step": step, "kept": fraction}))


def test_fraction_checkpoints_never_count_against_keep_last(tmp_path):
    """The issue's run: save_interval=10, a fraction at 80% (step 24), 30 steps, keep_last=2.
    Pruned after each save, as the loop does: 20 and 30 stay as the two newest interval
    checkpoints, 24 as a fraction checkpoint (it used to push 20 out)."""
    from megatron_vlm.training.checkpointing import prune_checkpoints

    keep = {"step_0000024"}
    for step in (10, 20, 24, 30):
        _save(tmp_path, step, fraction=f"step_{step:07d}" in keep)
        prune_checkpoints(tmp_path, keep_last=2, keep=keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_0000020", "step_0000024", "step_0000030"]
    # The final checkpoint saved as a fraction (1.0) is kept besides the keep_last newest
    # interval ones, even when its step is also on the interval.
    _save(tmp_path, 40, fraction=True)
    prune_checkpoints(tmp_path, keep_last=1, keep=set())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_0000024", "step_0000030", "step_0000040"]


def _checkpoint_of(tmp_path, overrides):
    """A checkpoint directory whose common.json records the tiny recipe with ``overrides``."""
    path = tmp_path / "saved" / "checkpoints" / "step_0000002"
    path.mkdir(parents=True)
    config = config_to_dict(load_config("tiny", overrides))
    (path / "common.json").write_text(json.dumps({"step": 2, "config": config}))
    (path.parent / "latest").write_text(path.name)
    return path


EVERY_DIFFERENCE = ("was saved with another model shape: model.decoder.num_layers=4 but this "
                    "run has 2; model.decoder.hidden_size=128 but this run has 64; "
                    "model.decoder.ffn_hidden_size=512 but this run has 256")


def test_another_shape_lists_every_differing_field(tmp_path):
    from megatron_vlm.training.checkpointing import check_decoder_matches, read_common

    saved = _checkpoint_of(tmp_path, ["model.decoder.num_layers=4",
                                      "model.decoder.hidden_size=128"])
    with pytest.raises(ValueError) as err:
        check_decoder_matches(read_common(saved), load_config("tiny").model.decoder, saved)
    assert str(err.value) == f"checkpoint {saved} {EVERY_DIFFERENCE}"


@pytest.mark.parametrize("path", ["resume", "checkpoint.load"])
def test_resume_and_fine_tune_name_every_differing_field(tmp_path, monkeypatch, path):
    """Both ways a run starts from a checkpoint stop before any model is built, with the whole
    list (the process group is stubbed: the resume check comes right after it is set up)."""
    from megatron_vlm import runtime
    from megatron_vlm.runtime import distributed
    from megatron_vlm.training.loop import train

    monkeypatch.setattr(distributed, "init_process_group_only", lambda *a: (None, None, 0, 1))
    monkeypatch.setattr(runtime, "initialize", lambda *a, **k: None)
    saved = _checkpoint_of(tmp_path, ["model.decoder.num_layers=4",
                                      "model.decoder.hidden_size=128"])
    run_dir = saved.parents[1] if path == "resume" else tmp_path / "finetune"
    load = [] if path == "resume" else [f"checkpoint.load={saved.parent}"]
    cfg = load_config("tiny", ["data.kind=random", "parallel.device=cpu", f"output_dir={run_dir}",
                               *load])
    with pytest.raises(ValueError, match=EVERY_DIFFERENCE):
        train(cfg)
