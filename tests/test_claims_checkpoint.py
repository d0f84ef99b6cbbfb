"""A checkpoint save that dies part way leaves nothing that looks complete, and ``latest`` still
names the previous checkpoint.

Checkpoints are written to ``NAME.tmp``, completed with ``common.json``, renamed to ``NAME`` and
only then named in ``latest``. The failure is injected at the two points a crash can hit: after
the sharded data is written (``dist_checkpointing.save`` raising once its files are there) and
while ``common.json`` is written. Writing in place, writing
``common.json`` or ``latest`` before the data, or renaming before ``common.json`` all leave a
``step_0000002`` directory or a ``latest`` naming it, which the assertions refuse.
``latest_checkpoint`` falls back to the newest complete checkpoint when ``latest`` names an
incomplete one, so the ``latest`` file itself is read.
"""

from pathlib import Path

import pytest

from megatron_vlm.config import load_config


class DiskFull(OSError):
    pass


@pytest.fixture(scope="module")
def trainer(runtime):
    from megatron_vlm.model.build import build_model
    from megatron_vlm.training.step import setup_training

    cfg = load_config("tiny", ["train.seq_length=32"])
    return setup_training(build_model(cfg), cfg)


@pytest.fixture
def megatron_save(monkeypatch):
    """megatron's sharded writer replaced by one that writes files of the same names at once:
    the real one forks writer processes (seconds per save on a busy CPU), and what is under test
    is this project's directory protocol around it. Returns a switch: ``fail=True`` makes the
    next save raise once its files are written (the process dying after the data)."""
    from megatron_vlm.training import checkpointing

    switch = {"fail": False}

    def save(sharded_state_dict, checkpoint_dir, **kwargs):
        assert "rng_state" in sharded_state_dict and "optimizer" in sharded_state_dict
        (Path(checkpoint_dir) / "__0_0.distcp").write_bytes(b"shards")
        (Path(checkpoint_dir) / "metadata.json").write_text("{}")
        if switch["fail"]:
            switch["fail"] = False
            raise DiskFull("injected: the process dies once the sharded data is written")

    monkeypatch.setattr(checkpointing.dist_checkpointing, "save", save)
    return switch


def save(trainer, directory: Path, step: int) -> None:
    from megatron_vlm.training.checkpointing import save_checkpoint

    save_checkpoint(directory, trainer.model, trainer.optimizer, {"step": step})


def fail_after_the_data(megatron_save, monkeypatch):
    megatron_save["fail"] = True


def fail_writing_common(megatron_save, monkeypatch):
    from megatron_vlm.training import checkpointing

    real = checkpointing.write_text_atomic

    def write(path, text):
        if Path(path).name == checkpointing.COMMON:
            raise DiskFull("injected: common.json cannot be written")
        return real(path, text)

    monkeypatch.setattr(checkpointing, "write_text_atomic", write)


@pytest.mark.parametrize("inject", [fail_after_the_data, fail_writing_common])
def test_a_save_failing_midway_leaves_the_previous_checkpoint_latest(trainer, tmp_path,
                                                                     megatron_save, inject):
    from megatron_vlm.training.checkpointing import (
        COMMON,
        LATEST,
        latest_checkpoint,
        read_common,
    )

    ckpts = tmp_path / "checkpoints"
    save(trainer, ckpts / "step_0000001", 1)
    assert (ckpts / LATEST).read_text() == "step_0000001"

    with pytest.MonkeyPatch.context() as patch:
        inject(megatron_save, patch)
        with pytest.raises(DiskFull):
            save(trainer, ckpts / "step_0000002", 2)

    assert (ckpts / LATEST).read_text() == "step_0000001"
    assert not (ckpts / "step_0000002").exists()  # no directory under the final name at all
    complete = sorted(p.name for p in ckpts.iterdir() if (p / COMMON).is_file())
    assert complete == ["step_0000001"]
    assert latest_checkpoint(ckpts) == ckpts / "step_0000001"
    assert read_common(ckpts)["step"] == 1

    # The next save of the same step over the leftover completes normally.
    save(trainer, ckpts / "step_0000002", 2)
    assert (ckpts / LATEST).read_text() == "step_0000002"
    assert read_common(ckpts)["step"] == 2
    assert sorted(p.name for p in ckpts.iterdir()) == [LATEST, "step_0000001", "step_0000002"]


def test_a_writer_keeps_the_write_results_manager_between_its_saves(trainer, tmp_path,
                                                                    megatron_save, monkeypatch):
    """A fresh write-results manager imports torch to read the first result: 5 to 15 s of
    every save on a busy 2-core machine, paid at each interval save (every minute in the
    quickstart). A writer starts it once and stops it when it finishes; a one-off
    save_checkpoint stops it after its save."""
    from megatron_vlm.training import checkpointing

    calls = []
    monkeypatch.setattr(checkpointing, "start_write_results_manager",
                        lambda: calls.append("start"))
    monkeypatch.setattr(checkpointing, "stop_write_results_manager",
                        lambda: calls.append("stop"))
    writer = checkpointing.CheckpointWriter()
    for step in (1, 2, 3):
        writer.save(tmp_path / f"step_{step:07d}", trainer.model, trainer.optimizer,
                    {"step": step})
    assert "stop" not in calls
    writer.finish()
    assert calls[-1] == "stop" and calls.count("stop") == 1
    save(trainer, tmp_path / "step_0000004", 4)
    assert calls[-1] == "stop"
