"""Predictions for one vision task: prompts in the fine-tuning layout, batched greedy
generation, the answer text (and for POPE the "Yes"/"No" probabilities at the first generated
position).

Examples are sharded over data-parallel replicas (every ``dp``-th example) and generated in order
of prompt length, so a batch wastes few decode steps on prompts still being read; the
predictions come back gathered on every rank in the examples' own order, whatever the number of
replicas.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from megatron_vlm.evaluation.data_parallel import data_parallel_shard, gather_over_data_parallel
from megatron_vlm.evaluation.engine import EvalModel, Prompt
from megatron_vlm.evaluation.records import Example, Prediction
from megatron_vlm.progress import Progress

logger = logging.getLogger("megatron_vlm")


def predict(eval_model: EvalModel, examples: Sequence[Example], prompt_tokens, image_source,
            stop_ids: Sequence[int], decode, *, batch_size: int, max_new_tokens: int,
            yes_no: Optional[tuple[list[int], list[int]]] = None, progress: bool = True,
            desc: str = "") -> list[Prediction]:
    """Predictions for ``examples`` (all of them, gathered over data-parallel replicas, in their
    order). ``prompt_tokens(example)`` gives a prompt's token ids, ``decode(ids)`` the answer
    text; ``yes_no`` (POPE) the token ids whose probabilities decide yes or no."""
    dp_rank, dp_size = data_parallel_shard()
    mine = list(range(dp_rank, len(examples), dp_size))
    tokens = {i: prompt_tokens(examples[i]) for i in mine}
    order = sorted(mine, key=lambda i: (len(tokens[i]) + (examples[i].image is not None)
                                        * eval_model.num_image_tokens, i))
    bar = Progress(len(examples), desc, "examples", enabled=progress)
    chunk = batch_size * 4  # images are prepared a few batches at a time
    results: list[tuple[int, dict]] = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        images = image_source.images([examples[i] for i in part])
        prompts = [Prompt(tokens=tokens[i], image=img) for i, img in zip(part, images)]
        generations = eval_model.generate(prompts, max_new_tokens=max_new_tokens,
                                          stop_ids=stop_ids, batch_size=batch_size,
                                          first_logprobs=yes_no is not None)
        for i, gen in zip(part, generations):
            record = {"answer": decode(gen.tokens).strip()}
            if yes_no is not None:
                record["yes_prob"] = first_token_probability(gen.first_logprobs, yes_no[0])
                record["no_prob"] = first_token_probability(gen.first_logprobs, yes_no[1])
            results.append((i, record))
        bar.update(len(part) * dp_size)
    seconds = bar.close()
    gathered = dict(gather_over_data_parallel(results))
    if len(gathered) != len(examples):
        raise RuntimeError(f"gathered {len(gathered)} predictions for {len(examples)} examples")
    if progress:
        logger.info("%s: %d examples in %.1f s (%.2f examples/s)", desc, len(examples), seconds,
                    len(examples) / max(seconds, 1e-9))
    return [Prediction(example_id=examples[i].example_id, **gathered[i])
            for i in range(len(examples))]


def first_token_probability(logprobs: torch.Tensor, ids: Sequence[int]) -> float:
    """Total probability of ``ids`` under a [vocab] log-probability vector."""
    return float(logprobs.double().exp()[list(ids)].sum())
