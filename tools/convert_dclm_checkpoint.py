"""Convert a DCLM/OpenLM checkpoint into a megatron-core checkpoint of the VLM.

    python tools/convert_dclm_checkpoint.py --input epoch_5.pt --output ckpt/dclm1b_80 \\
        --tp 2 --pp 1 --schedule-fraction 0.8 --total-steps 100000 \\
        --warmup-steps 5000 --peak-lr 1e-2 --final-lr 1e-5 --tokenizer tokenizer.json

    torchrun --nproc_per_node 8 tools/convert_dclm_checkpoint.py --input ... --tp 4 --pp 2 ...

The input is an OpenLM ``epoch_K.pt`` (``stats_K.pt`` beside it is read too), a bare ``.pt``
state dict, or HF-layout safetensors (a file or a directory of shards). In one process the
model is built at TP=PP=1 and saved from there (megatron-core reshards it on load); under
torchrun with TP x PP ranks each rank converts and saves its own shard. The vocabulary is padded
with zero rows to a multiple of TP (times --vocab-multiple).

The checkpoint holds the weights (the projector at its initialization unless --projector names
a file from tools/export_dclm_checkpoint.py) and a common.json with the schedule metadata that
``schedule.mode=continue`` needs, built from --step / --total-steps / --schedule-fraction and
--warmup-steps / --peak-lr / --final-lr (the step defaults to the checkpoint's own). It has no
optimizer state: train from it with ``checkpoint.load=OUTPUT checkpoint.load_optimizer=false``.

Config: --recipe (default: the shipped recipe with the checkpoint's decoder shape) plus
key=value overrides for everything but the decoder shape, which comes from the checkpoint.
See docs/convert.md.
"""

from __future__ import annotations

import argparse

PROG = "convert_dclm_checkpoint"


def parse_args(argv=None) -> argparse.Namespace:
    from megatron_vlm.cli import OverridesParser

    p = OverridesParser(prog=PROG, description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, metavar="PATH",
                   help="OpenLM epoch_K.pt, a .pt state dict, or HF-layout safetensors "
                        "(file or directory)")
    p.add_argument("--output", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to convert for")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to convert for")
    p.add_argument("--recipe", default=None,
                   help="recipe or YAML config the checkpoint will train with (default: the "
                        "shipped recipe with the same decoder shape)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads (default: from the inv_freq buffers or a config.json "
                        "beside the weights)")
    p.add_argument("--vocab-multiple", type=int, default=1,
                   help="pad the vocabulary to a multiple of this times --tp (default 1)")
    p.add_argument("--projector", default=None, metavar="FILE",
                   help="projector weights (projector.safetensors from the export tool) "
                        "instead of a fresh initialization")
    s = p.add_argument_group("schedule metadata (what schedule.mode=continue continues)")
    s.add_argument("--step", type=int, default=None,
                   help="optimizer steps the source run had completed (default: the "
                        "checkpoint's step)")
    s.add_argument("--total-steps", type=int, default=None, help="steps of the source schedule")
    s.add_argument("--schedule-fraction", type=float, default=None,
                   help="where the checkpoint sits in the source schedule, in [0, 1]")
    s.add_argument("--warmup-steps", type=int, default=None, help="source warmup steps")
    s.add_argument("--peak-lr", type=float, default=None, help="source peak LR")
    s.add_argument("--final-lr", type=float, default=None, help="source final LR")
    s.add_argument("--decay-style", default="cosine", help="cosine | linear | constant")
    s.add_argument("--tokens-per-step", type=int, default=None,
                   help="source tokens per step (for tokens_seen)")
    s.add_argument("--no-schedule", action="store_true",
                   help="write no schedule metadata (only rewarmup/from_scratch runs can start)")
    t = p.add_argument_group("tokenizer check")
    t.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="local tokenizer.json to check against the embedding")
    t.add_argument("--eos-token", default=None, help="EOS token (default <|endoftext|>)")
    t.add_argument("--allow-other-eos", action="store_true",
                   help="warn instead of stopping when EOS is not id 0")
    p.add_argument("--no-hash", action="store_true",
                   help="skip the sha256 of the input files recorded in common.json")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_overrides("config overrides (not the decoder shape)")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_vlm.logs import configure_logging

    configure_logging()
    from megatron_vlm.convert.megatron_io import convert_openlm
    from megatron_vlm.convert.metadata import ScheduleArgs
    from megatron_vlm.runtime import initialize, shutdown
    from megatron_vlm.runtime.distributed import init_process_group_only

    if args.tp < 1 or args.pp < 1:
        raise ValueError(f"--tp {args.tp} and --pp {args.pp} must be positive")
    schedule = None
    if not args.no_schedule:
        schedule = ScheduleArgs(step=args.step, total_steps=args.total_steps,
                                fraction=args.schedule_fraction, warmup_steps=args.warmup_steps,
                                peak_lr=args.peak_lr, final_lr=args.final_lr,
                                decay_style=args.decay_style,
                                tokens_per_step=args.tokens_per_step)
    _, _, _, world = init_process_group_only()
    if world == 1:
        layout = (1, 1)
    elif world == args.tp * args.pp:
        layout = (args.tp, args.pp)
    else:
        raise ValueError(f"run in one process or under torchrun with --tp x --pp = "
                         f"{args.tp * args.pp} ranks; this job has {world}")
    initialize(*layout)
    try:
        convert_openlm(args.input, args.output, args.tp, args.pp, recipe=args.recipe,
                       overrides=args.overrides, schedule=schedule, tokenizer=args.tokenizer,
                       eos_token=args.eos_token, allow_other_eos=args.allow_other_eos,
                       num_heads=args.num_heads, vocab_multiple=args.vocab_multiple,
                       projector=args.projector, overwrite=args.overwrite,
                       hash_files=not args.no_hash)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    from megatron_vlm.cli import run_main

    run_main(main, PROG)
