#!/usr/bin/env python
"""Tokenize the LLaVA-1.5 instruction JSON into instruction shards.

Input: the JSON list of records {"id", "image" (optional, relative to --image-root),
"conversations": [{"from": "human"|"gpt", "value": ...}, ...]}. Output: instruction shards in
--output-dir (tokens, a loss mask where only responses and the separator after each response
are targets, and the image's relative path as image key), plus images.txt, the distinct image
paths the conversations need (input for tools/precompute_image_embeddings.py, which must key
the embeddings by the same relative paths), and preprocess_summary.json.

Token layout: [system prompt][SEP] then [question][SEP][response][SEP] for every turn; the
image (if any) and a final EOS are added when samples are built (megatron_vlm.data.samples).
Malformed records, missing images and colliding ids are skipped and listed, up to --max-skips.
An interrupted run resumes after the last finished shard; a rerun after the JSON changed (its
sha256 is stored with the shards) or with other settings stops with an error. A JSON that yields
no conversations is a warning (training refuses such a directory).
"""

from megatron_vlm.logs import configure_logging

import argparse

from megatron_vlm.cli import add_progress_arg, add_tokenizer_args, log_summary, run_main

PROG = "preprocess_llava"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, metavar="JSON",
                   help="the LLaVA-1.5 conversation JSON (for example llava_v1_5_mix665k.json)")
    p.add_argument("--image-root", required=True, metavar="DIR",
                   help="folder the records' 'image' paths are relative to")
    add_tokenizer_args(p)
    p.add_argument("--output-dir", required=True, metavar="DIR",
                   help="instruction shard directory to write (index.json, shards, images.txt)")
    p.add_argument("--separator-token", required=True, metavar="TOKEN",
                   help="the separator after every question and every response; must be a "
                        "single token of the tokenizer")
    p.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="text put before every conversation, followed by the separator, "
                        "masked from the loss (default: none)")
    p.add_argument("--max-skips", type=int, default=0, metavar="N",
                   help="records to skip and list (malformed, missing image, colliding id) "
                        "before stopping with an error (default: %(default)s)")
    p.add_argument("--records-per-shard", type=int, default=8192, metavar="N",
                   help="input records per output shard (default: %(default)s)")
    p.add_argument("--seq-length", type=int, default=1024, metavar="N",
                   help="training sequence length, for the count of conversations that will be "
                        "truncated (default: %(default)s)")
    p.add_argument("--num-image-tokens", type=int, default=729, metavar="N",
                   help="image positions per image, for the same count (default: %(default)s)")
    add_progress_arg(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    log = configure_logging()
    args = parse_args(argv)
    from megatron_vlm.data.llava_preprocess import preprocess_llava

    summary = preprocess_llava(
        args.input, args.image_root, args.tokenizer, args.output_dir,
        separator_token=args.separator_token, system_prompt=args.system_prompt,
        max_skips=args.max_skips, records_per_shard=args.records_per_shard,
        eos_token=args.eos_token, seq_length=args.seq_length,
        num_image_tokens=args.num_image_tokens, progress=not args.no_progress)
    log_summary(log, PROG, summary)
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
