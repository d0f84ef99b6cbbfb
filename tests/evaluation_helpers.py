"""Tiny random-init checkpoints for the evaluation tests (no training needed), and
results.json files with items written by hand (:func:`results_with_items`).

The decoder is initialised with a large std so that a random model's logits are far from
uniform: greedy generation then varies from prompt to prompt instead of repeating one token,
which makes "batched equals one at a time" a real check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

TINY_EVAL_OVERRIDES = ("model.decoder.init_method_std=0.5", "model.decoder.max_seq_length=96",
                       "train.seq_length=96")


def tiny_eval_config(overrides: Sequence[str] = ()):
    from megatron_vlm.config import load_config

    return load_config("tiny", [*TINY_EVAL_OVERRIDES, *overrides])


def save_tiny_checkpoint(directory: str | Path, overrides: Sequence[str] = (), seed: int = 11) -> Path:
    """Builds the tiny VLM (random init from ``seed``) and saves it as a weights-only
    checkpoint at ``directory``; megatron parallel state must be initialized (any TP/PP: every
    rank calls this). Returns the checkpoint directory."""
    from megatron_vlm.config import config_to_dict
    from megatron_vlm.model.build import build_model
    from megatron_vlm.runtime import set_seed
    from megatron_vlm.training.checkpointing import save_checkpoint

    cfg = tiny_eval_config(overrides)
    set_seed(seed)
    model = build_model(cfg)
    common = {"step": 0, "config": config_to_dict(cfg), "contents": ["model"],
              "loader": {"consumed_global_batches": 0}}
    return save_checkpoint(Path(directory), model, None, common, update_latest=False)


def small_shapesworld(out: str | Path, eval_images: int) -> Path:
    """A small ShapesWorld directory (about 0.1 s): its tokenizer and evaluation files."""
    from megatron_vlm.synthetic import ShapesWorldConfig, generate

    generate(out, ShapesWorldConfig(images=8, llava_images=8, eval_images=eval_images,
                                    text_docs=50, task_items=5, sentencepiece=False),
             progress=False, fsync=False)
    return Path(out)


def save_eval_run(root: str | Path, eval_images: int = 6) -> tuple[Path, Path]:
    """(ShapesWorld directory, checkpoint): a small ShapesWorld and a tiny random checkpoint in a
    run's layout, ``ROOT/run/checkpoints/step_0000000``, whose config names ShapesWorld's
    tokenizer and evaluation data as a trained run's does, so that
    :func:`megatron_vlm.evaluation.runner.evaluate` runs in-process on it; megatron parallel
    state must be initialized."""
    root = Path(root)
    sw = small_shapesworld(root / "sw", eval_images)
    checkpoint = save_tiny_checkpoint(root / "run" / "checkpoints" / "step_0000000",
                                      [f"data.tokenizer={sw / 'tokenizer' / 'tokenizer.json'}",
                                       f"evaluation.data_root={sw}"])
    return sw, checkpoint


def results_with_items(directory, tasks: dict) -> dict:
    """A results.json of ``tasks`` ({name: (kind, scores, groups, chance[, ids])}; ids default
    to the item's position) with items files in ``directory``, its accuracies and stable scores
    as the runner computes them (the dict is returned, not written)."""
    from megatron_vlm.evaluation.items import TaskItems, items_path, write_items
    from megatron_vlm.evaluation.stable_score import stable_score

    entries, chance, accuracies = {}, {}, {"vision": {}, "text": {}}
    for task, (kind, scores, groups, level, *ids) in tasks.items():
        ids = list(ids[0]) if ids else [str(i) for i in range(len(scores))]
        items = TaskItems(ids, [float(v) for v in scores], groups)
        write_items(items_path(directory, task), items)
        entries[task] = {"kind": kind, "metrics": {"accuracy": items.value(), "n": len(items)},
                         "items": f"items/{task}.jsonl"}
        chance[task] = level
        accuracies[kind][task] = items.value()
    return {"checkpoint": {"path": "ckpt", "step": 3}, "suite": "shapesworld", "limit": None,
            "tasks": entries, "chance": chance,
            "stable_score": {k: stable_score(a, chance, k) for k, a in accuracies.items() if a}}
