"""Evaluation: the paper's vision benchmarks (vlm-evaluation conventions) and text benchmarks
(lm-eval), scored into stable scores, on the same megatron-core model at any TP/PP/DP.

One module per concern: ``records`` (the example and prediction records every part shares),
``tasks`` (loaders of the official annotation layouts), ``custom_task`` (one's own questions
from a JSON Lines file), ``prompts``, ``engine`` (a checkpoint loaded for inference; batched
log-likelihoods and greedy generation with a KV cache), ``scorers``, ``stable_score``,
``lm_eval_adapter`` and ``runner`` (``tools/evaluate_vlm.py``); ``items`` (each example's score,
``items/TASK.jsonl``), ``statistics`` (bootstrap intervals, paired tests, Holm),
``uncertainty`` (the intervals of results.json) and ``compare`` (``tools/compare_runs.py``).
"""
