"""Checkpoint scenarios for tests/test_checkpoint_layouts.py, each printing one JSON line.

    torchrun --nproc_per_node 2 tests/scripts/checkpoint_layouts.py save OUT
        trains the tiny model one step at DP=2 and saves OUT/current (RNG keyed by (PP, TP))
        and OUT/legacy (RNG keyed by (PP, TP, DP), no layout recorded: the earlier format)
    python tests/scripts/checkpoint_layouts.py load OUT
        loads both at DP=1, and saves then loads a legacy checkpoint at DP=1: which RNG
        states came back, and the warnings
    python tests/scripts/checkpoint_layouts.py async OUT [--exit-without-finish]
        a synchronous and an asynchronous save of the same state, resumes from each, the
        moments the asynchronous one becomes complete, and the writer processes seen
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import pickle
import random
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.distributed as dist

TINY = ["train.global_batch_size=4", "train.micro_batch_size=2", "train.seq_length=64",
        "data.kind=random", "train.lr=3e-3"]


class Warnings(logging.Handler):
    """Collects the project logger's warning lines."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        logging.getLogger("megatron_vlm").addHandler(self)

    def emit(self, record):
        self.lines.append(record.getMessage())


def rng_digest() -> str:
    """A hash of every RNG state a checkpoint stores."""
    from megatron.core import tensor_parallel

    h = hashlib.sha256()
    h.update(torch.get_rng_state().numpy().tobytes())
    h.update(pickle.dumps(random.getstate()))
    state = np.random.get_state()
    h.update(state[1].tobytes() + pickle.dumps(state[2:]))
    for name, value in sorted(tensor_parallel.get_cuda_rng_tracker().get_states().items()):
        h.update(name.encode() + value.numpy().tobytes())
    return h.hexdigest()


def setup(extra=()):
    """(cfg, train state, next-batch function, loader) for the tiny model at this process's
    layout."""
    from megatron.core import parallel_state

    from megatron_vlm.config import load_config
    from megatron_vlm.model.build import build_model
    from megatron_vlm.runtime import initialize
    from megatron_vlm.training.loop import make_batches
    from megatron_vlm.training.step import setup_training

    cfg = load_config("tiny", [*TINY, *extra])
    initialize(1, 1, seed=cfg.seed)
    state = setup_training(build_model(cfg), cfg)
    next_step, loader = make_batches(cfg, parallel_state.get_data_parallel_rank(),
                                     parallel_state.get_data_parallel_world_size(), None)
    return cfg, state, next_step, loader


def train(cfg, state, next_step, steps: int) -> list[float]:
    from megatron_vlm.training.step import train_step

    losses = []
    for _ in range(steps):
        microbatches = next_step()
        losses.append(float(train_step(state, iter(microbatches), len(microbatches), cfg)["loss"]))
    return losses


def save_legacy(directory: Path, state, common: dict) -> None:
    """A checkpoint as the code before layouts were recorded wrote it."""
    from megatron_vlm.training import checkpointing as ckpt

    current = ckpt._rng_sharded_object
    ckpt._rng_sharded_object = lambda keyed_by_dp=False: current(keyed_by_dp=True)
    try:
        ckpt.save_checkpoint(directory, state.model, state.optimizer, common)
    finally:
        ckpt._rng_sharded_object = current
    if dist.get_rank() == 0:
        path = directory / ckpt.COMMON
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items()
                                    if k != ckpt.LAYOUT}))
    dist.barrier()


def cmd_save(out: Path) -> dict:
    from megatron_vlm.training import checkpointing as ckpt

    cfg, state, next_step, loader = setup()
    train(cfg, state, next_step, 1)
    common = {"step": 1, "loader": loader.state_dict()}
    ckpt.save_checkpoint(out / "current", state.model, state.optimizer, common)
    save_legacy(out / "legacy", state, common)
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, rng_digest())
    return {"digests": digests, "layout": ckpt.parallel_layout()}


def cmd_load(out: Path) -> dict:
    from megatron_vlm.training import checkpointing as ckpt

    warnings = Warnings()
    cfg, state, next_step, loader = setup()
    train(cfg, state, next_step, 1)
    save_legacy(out / "legacy_dp1", state, {"step": 1, "loader": loader.state_dict()})
    saved_dp1 = rng_digest()
    report = {}
    for name in ("current", "legacy", "legacy_dp1"):
        torch.manual_seed(999)  # so a restore is visible
        random.seed(999)
        before = rng_digest()
        start = len(warnings.lines)
        common = ckpt.load_checkpoint(out / name, state.model, state.optimizer)
        report[name] = {"digest": rng_digest(), "unchanged": rng_digest() == before,
                        "warnings": warnings.lines[start:], "step": common["step"]}
    report["legacy_dp1"]["saved_digest"] = saved_dp1
    return report


def process_tree() -> set[tuple[int, float]]:
    """This process's descendants as (pid, start time): a pid alone may be reused."""
    tree = set()
    for child in psutil.Process().children(recursive=True):
        try:
            tree.add((child.pid, child.create_time()))
        except psutil.NoSuchProcess:
            pass
    return tree


def parameters_and_optimizer(state) -> dict[str, torch.Tensor]:
    """Every parameter and every optimizer state tensor, by name."""
    from megatron_vlm.training.checkpointing import unwrap

    tensors = {f"param/{n}": p.detach().clone() for n, p in unwrap(state.model).named_parameters()}
    for i, part in enumerate(getattr(state.optimizer, "chained_optimizers", [state.optimizer])):
        for j, (param, values) in enumerate(part.optimizer.state.items()):
            for key, value in values.items():
                tensors[f"opt{i}/{j}/{key}"] = value.detach().clone()
    return tensors


def cmd_async(out: Path, exit_without_finish: bool) -> dict:
    from megatron_vlm.training import checkpointing as ckpt

    base = process_tree()
    cfg, state, next_step, loader = setup()
    train(cfg, state, next_step, 2)
    common = {"step": 2, "loader": loader.state_dict()}
    synced = out / "sync" / ckpt.step_dir_name(2)
    ckpt.save_checkpoint(synced, state.model, state.optimizer, common)
    writer = ckpt.CheckpointWriter(async_save=True)
    done: list[str] = []
    target = out / "async" / ckpt.step_dir_name(2)
    writer.save(target, state.model, state.optimizer, common,
                on_done=lambda path: done.append(path.name))
    report = {"right_after_save": {
        "latest": (out / "async" / ckpt.LATEST).exists(), "complete": target.exists(),
        "tmp": target.with_name(target.name + ".tmp").is_dir(), "on_done": list(done),
        "pending": [p.name for p in writer.pending],
        "resolves": ckpt.latest_checkpoint(out / "async") is not None}}
    report["writer_processes_seen"] = sorted(process_tree() - base)
    if exit_without_finish:
        return report
    # Training goes on while the save is written: the checkpoint must hold the state of step 2.
    continued = train(cfg, state, next_step, 2)
    completed, deadline = [], time.time() + 120
    while not completed and time.time() < deadline:
        completed = writer.poll()
        time.sleep(0.05)
    report["completed_by_poll"] = [p.name for p in completed]
    report["after_poll"] = {"latest": (out / "async" / ckpt.LATEST).read_text().strip(),
                            "on_done": list(done)}
    # A second save while one is in flight completes the first before it starts.
    writer.save(out / "async" / ckpt.step_dir_name(3), state.model, state.optimizer, common)
    writer.save(out / "async" / ckpt.step_dir_name(4), state.model, state.optimizer, common)
    report["two_saves"] = {"latest": (out / "async" / ckpt.LATEST).read_text().strip(),
                           "pending": [p.name for p in writer.pending]}
    report["finished"] = [p.name for p in writer.finish()]
    report["latest_after_finish"] = (out / "async" / ckpt.LATEST).read_text().strip()
    report["left_running_after_finish"] = sorted(process_tree() - base)
    # Python's resource tracker (started by the first spawn-context process, here megatron's
    # results manager) serves the whole process until it exits; it is no writer.
    from multiprocessing import resource_tracker

    report["resource_tracker"] = resource_tracker._resource_tracker._pid

    resumed, tensors = {}, {}
    for name, path in (("sync", synced), ("async", target)):
        _, run, _, _ = setup()
        torch.manual_seed(4321)  # so that a missed RNG restore would show
        loaded = ckpt.load_checkpoint(path, run.model, run.optimizer)
        tensors[name] = parameters_and_optimizer(run)
        from megatron_vlm.training.loop import make_batches

        batches, _ = make_batches(cfg, 0, 1, loaded["loader"])
        resumed[name] = train(cfg, run, batches, 2)
    a, b = tensors["sync"], tensors["async"]
    report["same_tensor_names"] = sorted(a) == sorted(b)
    report["tensors_differing"] = [k for k in a if k in b and not torch.equal(a[k], b[k])]
    report["tensor_count"] = len(a)
    report["losses"] = {"continued": continued, **resumed}
    return report


def main() -> None:
    from megatron_vlm.logs import configure_logging
    from megatron_vlm.runtime import shutdown

    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["save", "load", "async"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--exit-without-finish", action="store_true")
    args = parser.parse_args()
    configure_logging()
    if args.command == "save":
        report = cmd_save(args.out)
    elif args.command == "load":
        report = cmd_load(args.out)
    else:
        report = cmd_async(args.out, args.exit_without_finish)
    if dist.get_rank() == 0:
        print(json.dumps(report), flush=True)
    sys.stdout.flush()
    if not args.exit_without_finish:
        shutdown()


if __name__ == "__main__":  # spawned helper processes re-import this file
    main()
