"""The lm-eval adapter in its own processes, for tests/test_lm_eval_adapter.py.

    # loglikelihoods of the requests in REQ.json at each TPxPP layout in turn (DP = world /
    # (TP*PP)); every rank writes OUT/<TP>x<PP>/rank<R>.json with all the results it holds
    torchrun --nproc_per_node 4 tests/scripts/lm_eval_parallel.py score --checkpoint CKPT \
        --tokenizer TOK --requests REQ.json --layouts 2x2,1x2 --out OUT [--engine direct]

    # lm-eval's CLI (python -m megatron_vlm.lm_eval ARGS) with the direct engine standing in
    python tests/scripts/lm_eval_parallel.py cli -- --model megatron_vlm --model_args ...

``--engine engine`` (the default) loads the checkpoint with megatron_vlm.evaluation.engine's
EvalModel; ``--engine direct`` with :class:`DirectEngine`, a stand-in that runs the model's plain
forward pass (TP=PP=1 only), so the adapter's own logic (encoding, batching, the data-parallel
split and gather) can be tested without the inference engine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import torch


class DirectEngine:
    """EvalModel's interface on the checkpoint's model at TP=PP=1: right-padded batches through
    the plain forward pass for scoring, full recomputation per token for greedy generation."""

    def __init__(self, model, cfg, checkpoint=None):
        self.model = model.eval()
        self.cfg = cfg
        self.checkpoint = checkpoint
        self.max_length = int(cfg.model.decoder.max_seq_length)
        self.calls: list[list[list[int]]] = []  # the rows of every score_tokens call

    @classmethod
    def from_checkpoint(cls, checkpoint, overrides: Sequence[str] = ()) -> "DirectEngine":
        from megatron.core import parallel_state

        from megatron_vlm.config import config_from_dict
        from megatron_vlm.model.build import build_model
        from megatron_vlm.training.checkpointing import load_checkpoint, read_common

        if parallel_state.get_model_parallel_group().size() != 1:
            raise ValueError("DirectEngine runs at TP=PP=1 only")
        cfg = config_from_dict(read_common(checkpoint)["config"], overrides=overrides)
        model = build_model(cfg)
        load_checkpoint(checkpoint, model, optimizer=None, with_rng=False)
        return cls(model, cfg, checkpoint)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(tokens=tokens).float()

    def score_tokens(self, rows, batch_size: int = 8):
        rows = [list(r) for r in rows]
        self.calls.append(rows)
        out = []
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            width = max(len(r) for r in batch)
            if width > self.max_length:
                raise ValueError(f"row of {width} tokens > max_length {self.max_length}")
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            for i, r in enumerate(batch):
                tokens[i, :len(r)] = torch.tensor(r)
            logprobs = torch.log_softmax(self.logits(tokens), dim=-1)
            for i, r in enumerate(batch):
                n = len(r)
                target = tokens[i, 1:n]
                lp = logprobs[i, :n - 1].gather(-1, target[:, None])[:, 0]
                greedy = logprobs[i, :n - 1].argmax(-1) == target
                out.append((lp.double().numpy(), greedy.numpy().astype(bool)))
        return out

    def generate(self, prompts, max_new_tokens: int = 128, stop_ids=(), batch_size: int = 8,
                 first_logprobs: bool = False):
        from megatron_vlm.evaluation.engine import Generation

        out = []
        for prompt in prompts:
            tokens = list(prompt.tokens)
            new, stop = [], "length"
            while len(new) < max_new_tokens and len(tokens) < self.max_length:
                nxt = int(self.logits(torch.tensor([tokens]))[0, -1].argmax())
                if nxt in stop_ids:
                    stop = "stop"
                    break
                new.append(nxt)
                tokens.append(nxt)
            out.append(Generation(tokens=new, stop=stop))
        return out


def use_direct_engine() -> None:
    """Makes the adapter load checkpoints with :class:`DirectEngine`."""
    from megatron_vlm.evaluation import engine

    engine.EvalModel.from_checkpoint = classmethod(
        lambda cls, checkpoint, overrides=(): DirectEngine.from_checkpoint(checkpoint, overrides))


def requests_from(pairs) -> list:
    """lm-eval Instance look-alikes (what the adapter reads: args, task_name, doc_id)."""
    return [SimpleNamespace(args=tuple(p), task_name="t", doc_id=i) for i, p in enumerate(pairs)]


def score(args) -> int:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_vlm.evaluation.lm_eval_adapter import MegatronVLMLM
    from megatron_vlm.logs import configure_logging
    from megatron_vlm.runtime import shutdown

    configure_logging()
    if args.engine == "direct":
        use_direct_engine()
    spec = json.loads(Path(args.requests).read_text())
    for layout in args.layouts.split(","):
        tp, pp = (int(n) for n in layout.split("x"))
        # One process start for several layouts: the adapter builds the next layout's groups.
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        lm = MegatronVLMLM.create_from_arg_string(
            f"checkpoint={args.checkpoint},tokenizer={args.tokenizer},tensor_parallel={tp},"
            f"pipeline_parallel={pp},batch_size={args.batch_size}")
        results = {
            "loglikelihood": lm.loglikelihood(requests_from(spec["loglikelihood"]),
                                              disable_tqdm=True),
            "rolling": lm.loglikelihood_rolling(requests_from([[d] for d in spec["rolling"]]),
                                                disable_tqdm=True),
            "rank": dist.get_rank(), "layout": layout,
        }
        out = Path(args.out) / layout
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    shutdown()
    return 0


def cli(args) -> int:
    use_direct_engine()
    from megatron_vlm.cli import run_main
    from megatron_vlm.lm_eval import PROG, main

    run_main(lambda: main(args.lm_eval_args), PROG)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="loglikelihoods of REQ.json at TPxPP layouts")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json")
    p.add_argument("--requests", required=True,
                   help='JSON {"loglikelihood": [[ctx, cont], ...], "rolling": [text, ...]}')
    p.add_argument("--layouts", default="1x1",
                   help="comma-separated TPxPP layouts, scored one after the other")
    p.add_argument("--batch-size", type=int, default=3, help="rows per batch")
    p.add_argument("--out", required=True, help="folder for rank<R>.json")
    p.add_argument("--engine", choices=("engine", "direct"), default="engine",
                   help="EvalModel, or the DirectEngine stand-in (TP=PP=1)")
    c = sub.add_parser("cli", help="python -m megatron_vlm.lm_eval with the direct engine")
    c.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval CLI arguments")
    args = parser.parse_args(argv)
    if args.command == "cli" and args.lm_eval_args[:1] == ["--"]:
        args.lm_eval_args = args.lm_eval_args[1:]
    return score(args) if args.command == "score" else cli(args)


if __name__ == "__main__":
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
