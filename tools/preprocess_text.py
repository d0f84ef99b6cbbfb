#!/usr/bin/env python
"""Tokenize a text corpus (JSONL, parquet or plain text) into megatron-core IndexedDataset shards.

Writes PREFIX_00000.bin/.idx, PREFIX_00001.bin/.idx, ... (int32 tokens, one megatron document
per input document, EOS appended after every document, no BOS) and PREFIX.manifest.json.
An interrupted run resumes: shards whose files match the manifest's checksums are kept, the
rest are rewritten byte for byte as an uninterrupted run would write them. The manifest also
holds each input's size and sha256: a rerun after an input changed (even at the same size), or
with other settings, stops with an error naming what changed unless --overwrite. Inputs that
hold no documents are a warning (training refuses such a corpus).

Plain-text files (.txt, also .txt.gz / .txt.zst) hold one document per block of lines
separated by blank lines, or one document per file with --txt-document file.

  python tools/preprocess_text.py --input corpus/ --tokenizer tokenizer.json \\
      --output-prefix shards/text/corpus
  python tools/preprocess_text.py --input books/ --txt-document file --tokenizer tokenizer.json \\
      --output-prefix shards/text/books
"""

from megatron_vlm.logs import configure_logging

import argparse

from megatron_vlm.cli import (add_corpus_args, add_progress_arg, add_tokenizer_args, log_summary,
                              run_main)

PROG = "preprocess_text"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_args(p)
    add_tokenizer_args(p)
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="output path prefix: shards PREFIX_00000.bin/.idx, ... and "
                        "PREFIX.manifest.json")
    p.add_argument("--docs-per-shard", type=int, default=100_000, metavar="N",
                   help="documents per output shard (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="tokenizer processes; 1 tokenizes in this process (default: %(default)s)")
    p.add_argument("--chunk-size", type=int, default=512, metavar="N",
                   help="documents per tokenizer call (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the shards of an earlier run at this prefix and start over (needed "
                        "after an input or a setting changed)")
    add_progress_arg(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    log = configure_logging()
    args = parse_args(argv)
    from megatron_vlm.data.text_preprocess import preprocess_text

    summary = preprocess_text(
        args.input, args.tokenizer, args.output_prefix, docs_per_shard=args.docs_per_shard,
        field=args.field, workers=args.workers, max_skips=args.max_skips,
        eos_token=args.eos_token, overwrite=args.overwrite, progress=not args.no_progress,
        chunk_size=args.chunk_size, txt_document=args.txt_document)
    log_summary(log, PROG, summary)
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
