"""Loads a checkpoint into EvalModel at a TP x PP layout, scores and generates a fixed set of
cases, and prints the results as one JSON line (rank 0), for tests/test_eval_engine.py.

    python -m torch.distributed.run --nproc_per_node 4 tests/scripts/eval_engine_parallel.py \
        --checkpoint DIR --cases cases.json --tp 2 --pp 2

``cases.json``: ``{"rows": [[ids]], "prompts": [{"tokens": [ids], "image": [[floats]] | null}],
"max_new_tokens": N, "stop_ids": [ids], "batch_size": B}``. Output: ``{"score": [[logprobs],
[greedy flags]] per row, "generate": [{"tokens", "stop", "first_logprobs"}] per prompt,
"ranks_agree": whether every rank got exactly rank 0's results, "world": ranks}``.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist


def main() -> None:
    from megatron_vlm.evaluation.engine import EvalModel, Prompt
    from megatron_vlm.runtime import initialize, shutdown

    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--cases", required=True, help="JSON file of rows and prompts")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    args = parser.parse_args()

    cases = json.loads(open(args.cases).read())
    initialize(args.tp, args.pp, seed=5, device="cpu")
    engine = EvalModel.from_checkpoint(args.checkpoint)
    scores = engine.score_tokens(cases["rows"], batch_size=cases["batch_size"])
    prompts = [Prompt(p["tokens"], None if p["image"] is None else torch.tensor(p["image"]))
               for p in cases["prompts"]]
    generations = engine.generate(prompts, max_new_tokens=cases["max_new_tokens"],
                                  stop_ids=cases["stop_ids"], batch_size=cases["batch_size"],
                                  first_logprobs=True)
    result = {
        "score": [[logp.tolist(), greedy.tolist()] for logp, greedy in scores],
        "generate": [{"tokens": g.tokens, "stop": g.stop,
                      "first_logprobs": g.first_logprobs.tolist()} for g in generations],
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result)
    if dist.get_rank() == 0:
        result["ranks_agree"] = all(other == everyone[0] for other in everyone)
        result["world"] = dist.get_world_size()
        print(json.dumps(result), flush=True)
    shutdown()


if __name__ == "__main__":  # megatron's checkpoint code starts helper processes
    main()
