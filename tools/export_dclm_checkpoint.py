"""Export a checkpoint of the VLM to OpenLM-layout safetensors (decoder) plus the projector.

    python tools/export_dclm_checkpoint.py --input runs/image_text/checkpoints/step_0001000 \\
        --output export/ [--vocab-size 50432 | --tokenizer tokenizer.json] [--layout hf]

The checkpoint may come from any TP/PP layout: it is loaded at TP=PP=1 in one process
(megatron-core reshards it), so the host needs memory for the whole model. Written to --output:

    model.safetensors            the decoder with OpenLM keys (tok_embeddings.weight,
                                 layers.N.attention.in_proj.weight rows [Q; K; V], ...,
                                 layers.N.attention.pos_embed.inv_freq); with --layout hf every
                                 key is prefixed "model."
    projector.safetensors        the projector's parameters (megatron names, e.g.
                                 encoder.linear_fc1.weight), for convert --projector
    vision_encoder.safetensors   the online vision tower, when the config has one
    openlm_config.json           dimensions (heads included) and provenance

Embedding and output rows kept: --vocab-size, else the tokenizer's vocabulary, else the rows of
the OpenLM checkpoint the model was converted from (recorded in common.json), else all rows.
See docs/convert.md.
"""

from __future__ import annotations

import argparse
import os

PROG = "export_dclm_checkpoint"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, metavar="CKPT",
                   help="checkpoint directory (or a run's checkpoint directory: its latest)")
    p.add_argument("--output", required=True, metavar="DIR", help="directory to write")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="embedding/output rows to keep (drops TP padding)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="keep as many rows as this tokenizer.json's vocabulary")
    p.add_argument("--eos-token", default=None, help="EOS token of --tokenizer")
    p.add_argument("--layout", choices=("openlm", "hf"), default="openlm",
                   help="openlm: bare keys; hf: keys prefixed 'model.'")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_vlm.logs import configure_logging

    configure_logging()
    if int(os.environ.get("WORLD_SIZE", 1)) != 1:
        raise ValueError("run the export in one process (it loads the checkpoint at TP=PP=1)")
    from megatron_vlm.convert.megatron_io import export_openlm
    from megatron_vlm.runtime import initialize, shutdown

    initialize(1, 1)
    try:
        export_openlm(args.input, args.output, vocab_size=args.vocab_size,
                      tokenizer=args.tokenizer, eos_token=args.eos_token, layout=args.layout,
                      overwrite=args.overwrite)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    from megatron_vlm.cli import run_main

    run_main(main, PROG)
