"""Under torchrun with 2 ranks: converted OpenLM weights against the reference at TP=2 and PP=2.

    torchrun --nproc_per_node 2 tests/scripts/convert_check.py --openlm epoch_3.pt \\
        --converted DIR --workdir DIR --vocab 501 --num-heads 4

``--converted`` is a checkpoint converted in one process (saved at TP=PP=1, vocabulary padded
for TP=2). Phases, each comparing full-vocabulary logits of a random token batch (gathered over
TP, on the last pipeline stage, through megatron's forward-only schedule) with the fp32
reference of tests/reference/openlm_reference.py:

* ``tp2``: ``--converted`` loaded at TP=2 (resharded by megatron-core);
* ``tp2_torchrun``: converted under torchrun at TP=2 (each rank saves its shard), loaded at TP=2;
* ``pp2``: the TP=2-saved checkpoint loaded at PP=2;
* ``pp2_torchrun``: converted under torchrun at PP=2, loaded at PP=2.

Prints one JSON line (rank 0) with the largest difference of each phase, the largest padded
logit, and the schedule step read back from each torchrun-written common.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from reference.openlm_reference import openlm_logits  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--openlm", required=True)
    p.add_argument("--converted", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--vocab", type=int, required=True, help="OpenLM vocabulary (unpadded)")
    p.add_argument("--num-heads", type=int, required=True)
    return p.parse_args()


def logits_on_last_stage(model, tokens: torch.Tensor):
    """Full-vocabulary logits through megatron's forward-only schedule (None off the last stage)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    def step(data_iterator, module):
        batch = next(data_iterator)
        out = module(tokens=batch)
        return out, lambda output, non_loss_data=True: \
            gather_from_tensor_model_parallel_region(output).detach()

    with torch.no_grad():
        data = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([tokens]), model=[model],
            num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
            forward_only=True, collect_non_loss_data=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return torch.cat(data, dim=0)


def world_max(value: float) -> float:
    t = torch.tensor([value if value == value else float("inf")], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def main() -> int:
    args = parse_args()
    from megatron.core import parallel_state

    from megatron_vlm.config import load_config
    from megatron_vlm.convert.megatron_io import convert_openlm
    from megatron_vlm.convert.metadata import ScheduleArgs
    from megatron_vlm.logs import configure_logging
    from megatron_vlm.model.build import build_model
    from megatron_vlm.runtime import initialize, shutdown
    from megatron_vlm.training.checkpointing import load_checkpoint, read_common

    configure_logging()
    state = torch.load(args.openlm, weights_only=True)["state_dict"]
    tokens = torch.randint(0, args.vocab, (2, 24), generator=torch.Generator().manual_seed(5))
    reference = openlm_logits(state, tokens, args.num_heads)
    workdir = Path(args.workdir)
    schedule = ScheduleArgs(total_steps=100, warmup_steps=10, peak_lr=3e-3, final_lr=1e-5)
    result: dict = {}
    padded_max = 0.0

    def measure(name, tp, pp, checkpoint):
        nonlocal padded_max
        vocab = read_common(checkpoint)["config"]["model"]["decoder"]["vocab_size"]
        result[f"{name}_model_vocab"] = vocab
        cfg = load_config("tiny", [f"model.decoder.vocab_size={vocab}",
                                   f"parallel.tensor_parallel={tp}",
                                   f"parallel.pipeline_parallel={pp}"])
        model = build_model(cfg)
        load_checkpoint(checkpoint, model, None, with_rng=False)
        logits = logits_on_last_stage(model, tokens)
        diff = 0.0
        if logits is not None:
            diff = float((logits[..., :args.vocab] - reference).abs().max())
            if logits.shape[-1] > args.vocab:
                padded_max = max(padded_max, float(logits[..., args.vocab:].abs().max()))
        result[name] = world_max(diff)

    for tp, pp in ((2, 1), (1, 2)):
        initialize(tp, pp, seed=11)
        tag = "tp2" if tp == 2 else "pp2"
        out = workdir / f"{tag}_torchrun"
        convert_openlm(args.openlm, out, tp, pp, schedule=schedule, num_heads=args.num_heads,
                       hash_files=False)
        common = read_common(out)
        result[f"{tag}_torchrun_saved_layout"] = common["saved_layout"]
        result[f"{tag}_torchrun_schedule_step"] = common["schedule"]["step"]
        measure(tag, tp, pp, args.converted if tp == 2 else workdir / "tp2_torchrun")
        measure(f"{tag}_torchrun", tp, pp, out)
        dist.barrier()
        parallel_state.destroy_model_parallel()
    result["padded_logits_max"] = world_max(padded_max)
    if dist.get_rank() == 0:
        print(json.dumps(result))
    shutdown()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
