#!/usr/bin/env python
"""Train a byte-level BPE tokenizer.json on your own corpus, for experiments from scratch.

The corpus is read as tools/preprocess_text.py reads it (JSONL, parquet, plain .txt; the same
--field, --txt-document and --max-skips). The tokenizer has the special tokens the project needs:
<|endoftext|> = 0 (end of document) and <|sep|> = 1 (data.separator_token), then any
--special-token, in order; no image token is needed. It is lossless (decode(encode(text)) ==
text) and adds no BOS. The summary gives the model.decoder.vocab_size to train with: at least
the tokenizer's vocabulary, padded to a multiple of 128. A checkpoint converted from DCLM needs
DCLM's own tokenizer instead (docs/data.md, "Which tokenizer").

  python tools/train_tokenizer.py --input corpus/ --vocab-size 32000 \\
      --output tokenizer/tokenizer.json
  python tools/train_tokenizer.py --input books/ --txt-document file --max-documents 200000 \\
      --vocab-size 16000 --output tokenizer/tokenizer.json
  python tools/preprocess_text.py --input corpus/ --tokenizer tokenizer/tokenizer.json \\
      --output-prefix shards/text/corpus
"""

from megatron_vlm.logs import configure_logging

import argparse

from megatron_vlm.cli import add_corpus_args, add_progress_arg, log_summary, run_main

PROG = "train_tokenizer"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_args(p)
    p.add_argument("--output", required=True, metavar="PATH",
                   help="the tokenizer.json to write; an existing file is refused unless "
                        "--overwrite")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help="vocabulary size, special tokens included (fewer result when the corpus "
                        "has too few repeated pairs; the summary says)")
    p.add_argument("--max-documents", type=int, default=None, metavar="N",
                   help="train on the first N documents only (default: all)")
    p.add_argument("--special-token", action="append", default=[], metavar="TOKEN",
                   help="one more special token after <|endoftext|> and <|sep|> (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    add_progress_arg(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    log = configure_logging()
    args = parse_args(argv)
    from megatron_vlm.data.tokenizer_training import train_tokenizer

    summary = train_tokenizer(
        args.input, args.output, args.vocab_size, field=args.field,
        txt_document=args.txt_document, max_skips=args.max_skips,
        max_documents=args.max_documents, extra_special_tokens=args.special_token,
        overwrite=args.overwrite, progress=not args.no_progress)
    log_summary(log, PROG, summary)
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
