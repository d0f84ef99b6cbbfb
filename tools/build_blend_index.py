"""Build the exact token-ratio blend index (see docs/blend.md) and print its summary.

Dry run, with synthetic source sizes and no data (NAME:SEQUENCES:TOKENS_PER_SEQUENCE, or
NAME:SEQUENCES:LOW-HIGH for lengths drawn uniformly from LOW..HIGH):

    python tools/build_blend_index.py --dry-run \\
        --source text:25000000:1024 --source caption:3000000:760 --source instruction:665000:900 \\
        --ratio text=0.8 --ratio caption=0.1 --ratio instruction=0.1 \\
        --total-tokens 28e9 --seq-length 1024 --global-batch 256 --json

    python tools/build_blend_index.py --dry-run --source text:2.1B:2048 \\
        --source caption:3M:734-931 --ratio text=0.9 --ratio caption=0.1 \\
        --total-tokens 4.3T --seq-length 2048 --global-batch 1024

Real shards (NAME:KIND:PATH, KIND one of text | caption | instruction; text takes an
IndexedDataset prefix, several joined with commas):

    python tools/build_blend_index.py \\
        --source text:text:data/text/corpus --source caption:caption:data/captions \\
        --source llava:instruction:data/llava --n-img 729 \\
        --ratio text=0.9 --ratio caption=0.05 --ratio llava=0.05 \\
        --total-tokens 1e9 --seq-length 1024 --global-batch 256 --cache-dir data/blend-cache

The index is a function of its inputs: a build checks every global-batch boundary of runs up to
2**22 sequences and the last 64 of larger ones (the loader's fetches check the rest as it reads
them); --verify checks every boundary now. With --cache-dir the index's description is stored
under a hash of every input and reused by the next run with the same inputs (an interrupted
build leaves nothing behind and simply runs again).
--json prints one JSON object (the summary, with max_abs_error_sequences and build_seconds);
otherwise a table.
"""

from megatron_vlm.logs import configure_logging

import argparse
import json
import resource
import sys
from typing import Optional, Sequence

from megatron_vlm.cli import run_main

PROG = "build-blend-index"
_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_count(text: str, what: str) -> int:
    """``28000000000``, ``28e9`` or ``28B`` -> 28000000000 (must be a whole number)."""
    s = text.strip().upper().replace("_", "")
    scale = 1
    if s and s[-1] in _SUFFIXES:
        scale, s = _SUFFIXES[s[-1]], s[:-1]
    try:
        value = float(s) * scale if any(ch in s for ch in ".E") else int(s) * scale
    except ValueError:
        raise ValueError(f"{what}={text!r} is not a number (examples: 28000000000, 28e9, "
                         "28B)") from None
    if value != int(value):
        raise ValueError(f"{what}={text!r} is not a whole number")
    return int(value)


def parse_ratio(items: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--ratio {item!r} must look like NAME=FRACTION")
        if name in out:
            raise ValueError(f"--ratio names {name!r} twice")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"--ratio {item!r}: {value!r} is not a number") from None
    return out


def dry_run_sources(items: Sequence[str]):
    import numpy as np

    from megatron_vlm.data.blend import BlendSource

    sources = []
    for item in items:
        parts = item.split(":")
        if len(parts) != 3:
            raise ValueError(f"--source {item!r} must look like NAME:SEQUENCES:TOKENS_PER_SEQUENCE "
                             "(or NAME:SEQUENCES:LOW-HIGH) in a dry run")
        name, seqs, toks = parts
        count = parse_count(seqs, f"--source {name} SEQUENCES")
        low, dash, high = toks.partition("-")
        if not dash:
            sources.append(BlendSource(name, count,
                                       parse_count(toks, f"--source {name} TOKENS_PER_SEQUENCE")))
            continue
        low = parse_count(low, f"--source {name} LOW")
        high = parse_count(high, f"--source {name} HIGH")
        if not 1 <= low <= high:
            raise ValueError(f"--source {item!r}: LOW-HIGH must satisfy 1 <= LOW <= HIGH")
        # Synthetic lengths, uniform in [LOW, HIGH], the same for the same name.
        rng = np.random.default_rng(list(name.encode("utf-8")))
        sources.append(BlendSource(name, count, rng.integers(low, high + 1, count, dtype=np.int32)))
    return sources


def shard_sources(items: Sequence[str], args: argparse.Namespace):
    from megatron_vlm.data.blend import SHARD_KINDS, source_from_shards

    parsed = []
    for item in items:
        parts = item.split(":", 2)
        if len(parts) != 3 or parts[1] not in SHARD_KINDS:
            raise ValueError(f"--source {item!r} must look like NAME:KIND:PATH with KIND one of "
                             f"{', '.join(SHARD_KINDS)} (or use --dry-run with "
                             "NAME:SEQUENCES:TOKENS_PER_SEQUENCE)")
        parsed.append(parts)
    n_img = args.n_img
    if n_img is None:   # take it from a caption source of the same blend
        from megatron_vlm.data.embedding_shards import EmbeddingDataset

        for _, kind, path in parsed:
            if kind == "caption":
                n_img = EmbeddingDataset(path).n_img
                break
    return [source_from_shards(name, kind, path, args.seq_length, n_img=n_img,
                               eos_id=args.eos_id, count_padding=args.count_padding,
                               progress=not args.no_progress)
            for name, kind, path in parsed]


def format_table(summary: dict) -> str:
    head = (f"{'source':<14} {'target':>8} {'achieved':>9} {'sequences':>12} {'tokens':>16} "
            f"{'epochs':>9} {'loss tokens':>16} {'image pos':>15} {'max err (seq)':>13}")
    lines = [head, "-" * len(head)]
    for s in summary["sources"]:
        lines.append(f"{s['name']:<14} {s['target_fraction']:>8.4f} {s['achieved_fraction']:>9.6f} "
                     f"{s['sequences']:>12,} {s['tokens']:>16,} {s['epochs']:>9.3f} "
                     f"{s['loss_tokens']:>16,} {s['image_positions']:>15,} "
                     f"{s['max_abs_error_sequences']:>13.4f}")
    lines += [
        "",
        f"sequences {summary['num_sequences']:,} in {summary['num_batches']:,} global batches of "
        f"{summary['global_batch_size']} x {summary['seq_length']} positions; tokens "
        f"{summary['total_tokens']:,} (budget {summary['token_budget']}), padding "
        f"{summary['padding_positions']:,}",
        f"largest error at a global-batch boundary: {summary['max_abs_error_sequences']:.4f} "
        f"sequences ({summary['max_abs_error_tokens']:.1f} tokens); proved bound "
        f"{summary['error_bound_sequences']:.4f}; merge tree {summary['merge_tree']}",
        f"boundaries checked at build: {summary['boundaries_checked_at_build']:,} of "
        f"{summary['boundaries']:,}" + (
            f"; --verify: all, largest error {summary['verified_max_abs_error_sequences']:.4f} "
            "sequences" if "verified_boundaries" in summary else ""),
        f"built in {summary['build_seconds']:.2f} s" + (
            f"; loaded from cache {summary['cache_path']}" if summary.get("from_cache") else
            (f"; cached at {summary['cache_path']}" if summary.get("cache_path") else "")),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/build_blend_index.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", action="append", required=True, metavar="SPEC",
                   help="NAME:KIND:PATH for shards, or NAME:SEQUENCES:TOKENS_PER_SEQUENCE with "
                        "--dry-run; repeat per source")
    p.add_argument("--ratio", action="append", required=True, metavar="NAME=FRACTION",
                   help="target token fraction of a source; repeat per source; must sum to 1")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--total-tokens", help="token budget (e.g. 28e9 or 28B): the index holds "
                        "the fewest whole global batches reaching it")
    budget.add_argument("--num-batches", type=int, help="build exactly this many global batches")
    p.add_argument("--seq-length", type=int, required=True, help="positions per sequence")
    p.add_argument("--global-batch", type=int, required=True, help="sequences per global batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-epoch shuffles")
    p.add_argument("--dry-run", action="store_true",
                   help="synthetic sources NAME:SEQUENCES:TOKENS_PER_SEQUENCE, no data read")
    p.add_argument("--cache-dir", help="store the index here (and reuse it on the next run)")
    p.add_argument("--n-img", type=int, default=None,
                   help="image positions per image for instruction sources (default: the n_img "
                        "of a caption source in the blend)")
    p.add_argument("--eos-id", type=int, default=None,
                   help="EOS id: captions stored with a trailing EOS are then not counted twice")
    p.add_argument("--count-padding", action="store_true",
                   help="count every sequence as all seq_length positions of its source "
                        "(default: padding counts for nobody)")
    p.add_argument("--verify", action="store_true",
                   help="check every global-batch boundary now (reads the whole run once)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    from megatron_vlm.data.blend import build_blend_index

    fractions = parse_ratio(args.ratio)
    sources = dry_run_sources(args.source) if args.dry_run else shard_sources(args.source, args)
    total = (parse_count(args.total_tokens, "--total-tokens")
             if args.total_tokens is not None else None)
    index = build_blend_index(sources, fractions, total, args.seq_length, args.global_batch,
                              seed=args.seed, cache_dir=args.cache_dir,
                              num_batches=args.num_batches, progress=not args.no_progress)
    summary = index.summary()
    if args.verify:
        checked = index.verify(progress=not args.no_progress)
        summary["verified_boundaries"] = summary["num_batches"] + 1
        summary["verified_max_abs_error_sequences"] = float(
            checked["max_abs_error_tokens"].max()) / args.seq_length
    summary["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(summary) if args.json else format_table(summary))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
