#!/usr/bin/env python
"""Benchmark of evaluation generation: VQA examples/s with batched greedy decoding (KV cache,
prompts of different lengths in one batch) against one example at a time, on the same model,
prompts and images, in one process. Batched output is checked to equal the batch-1 output.

The prompts are ShapesWorld VQA questions in the fine-tuning layout with random image
embeddings, answered by a recipe's model (random init unless --checkpoint): the figure is the
engine's speed, not the model's answers. Each configuration runs --repeats times, taking turns;
the best time counts.

  python bench/bench_eval.py [--recipe tiny] [--examples 64] [--batch-sizes 8 32] [--json]
  python bench/bench_eval.py --recipe 1b parallel.device=cuda --examples 256 --batch-sizes 16 64
"""

from megatron_vlm.logs import configure_logging  # noqa: I001  (first, before other imports)

import argparse
import json
import logging
import os
import platform
import tempfile
import time


def build_parser() -> argparse.ArgumentParser:
    from megatron_vlm.config import config_arg_parser

    parser = config_arg_parser(__doc__.split("\n\n")[0], default_recipe="tiny",
                               prog="bench/bench_eval.py")
    parser.add_argument("--checkpoint", help="evaluate this checkpoint's model instead of a "
                                             "random-init one of --recipe")
    parser.add_argument("--examples", type=int, default=64, help="VQA prompts")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32],
                        help="batched configurations (batch size 1 is always the baseline)")
    parser.add_argument("--max-new-tokens", type=int, default=16,
                        help="longest answer (VQA answers are a word or two)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def vqa_prompts(n: int, tokenizer_dir: str, cfg):
    """n ShapesWorld VQA prompts (tokens) with random image embeddings."""
    import torch

    from megatron_vlm.data.samples import resolve_separator, tokenize_prompt
    from megatron_vlm.data.tokenizer import load_tokenizer
    from megatron_vlm.evaluation.engine import Prompt
    from megatron_vlm.synthetic import ShapesWorldConfig, generate

    generate(tokenizer_dir, ShapesWorldConfig(images=8, llava_images=8, eval_images=max(8, n // 3 + 1),
                                              text_docs=200, task_items=20, sentencepiece=False),
             progress=False)
    tok = load_tokenizer(os.path.join(tokenizer_dir, "tokenizer", "tokenizer.json"))
    sep = resolve_separator(tok, "<|sep|>")
    with open(os.path.join(tokenizer_dir, "eval", "vqav2", "questions.json")) as f:
        questions = json.load(f)["questions"][:n]
    enc = cfg.model.encoder
    gen = torch.Generator().manual_seed(0)
    prompts = [Prompt(tokenize_prompt(f"{q['question']}\nAnswer the question using a single word "
                                      "or phrase.", tok, sep),
                      torch.randn(enc.num_image_tokens, enc.embed_dim, generator=gen))
               for q in questions]
    return prompts, [sep, tok.eos_id]


def save_random_checkpoint(cfg, directory: str) -> str:
    """The recipe's model at its random initialization, saved as a weights-only checkpoint."""
    from megatron_vlm.config import config_to_dict
    from megatron_vlm.model.build import build_model
    from megatron_vlm.training.checkpointing import save_checkpoint

    common = {"step": 0, "config": config_to_dict(cfg), "contents": ["model"]}
    return str(save_checkpoint(directory, build_model(cfg), None, common, update_latest=False))


def main(argv=None) -> int:
    configure_logging(logging.WARNING)
    args = build_parser().parse_intermixed_args(argv)
    import torch

    from megatron_vlm.config import load_config
    from megatron_vlm.evaluation.engine import EvalModel
    from megatron_vlm.runtime import initialize, shutdown

    cfg = load_config(args.recipe, args.overrides)
    initialize(1, 1, cfg.parallel.backend, seed=cfg.seed, device=cfg.parallel.device)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = save_random_checkpoint(cfg, os.path.join(tmp, "ckpt"))
        model = EvalModel.from_checkpoint(checkpoint, args.overrides if args.checkpoint else ())
        prompts, stops = vqa_prompts(args.examples, os.path.join(tmp, "sw"), cfg)
        configs = {1: None, **{b: None for b in args.batch_sizes}}
        best = {b: float("inf") for b in configs}
        outputs = {}
        for _ in range(args.repeats):
            for b in configs:
                start = time.perf_counter()
                gens = model.generate(prompts, max_new_tokens=args.max_new_tokens, stop_ids=stops,
                                      batch_size=b)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                best[b] = min(best[b], time.perf_counter() - start)
                outputs[b] = [g.tokens for g in gens]
    shutdown()
    same = {b: outputs[b] == outputs[1] for b in configs}
    rates = {b: args.examples / best[b] for b in configs}
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available()
              else platform.processor() or platform.machine(),
              "torch": torch.__version__, "recipe": cfg.name, "examples": args.examples,
              "examples_per_s": {str(b): round(r, 2) for b, r in rates.items()},
              "speedup_vs_batch1": {str(b): round(rates[b] / rates[1], 2) for b in configs},
              "equal_to_batch1": {str(b): same[b] for b in configs}}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"evaluation generation, {cfg.name} model, {args.examples} VQA prompts, "
              f"{result['device']}, torch {torch.__version__}")
        print(f"{'batch':>6} {'examples/s':>11} {'vs batch 1':>11} {'same output':>12}")
        for b in configs:
            print(f"{b:>6} {rates[b]:>11.2f} {rates[b] / rates[1]:>10.2f}x {str(same[b]):>12}")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    from megatron_vlm.cli import run_main

    run_main(main, "bench_eval")
