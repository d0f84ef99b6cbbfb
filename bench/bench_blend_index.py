"""Benchmark: the exact token-ratio blend index against megatron-core's BlendedDataset index.

    python bench/bench_blend_index.py                       # 28B tokens, L=1024, B=256, 3 sources
    python bench/bench_blend_index.py --total-tokens 1e9 --repeat 1 --json

Sources (synthetic per-sequence positions, no data): text 25M packed windows of 1024 positions;
caption 3M records of [729 image positions][SEP][caption][EOS] with caption lengths drawn
log-normally (mean about 30 tokens); instruction 665K conversations, 90% with an image, lengths
drawn log-normally and cut at 1024. Blend text 0.8 / caption 0.1 / instruction 0.1 of tokens.

Prints, for our index: build seconds (each repeat and the median), peak RSS of the process after
the builds (resource.getrusage ru_maxrss, which includes the interpreter, numpy and the input
arrays) and the largest error at a global-batch boundary. Then, in the same process, megatron-core
0.16.1's own blending index (``megatron.core.datasets.helpers.build_blending_indices``, the
compiled ``helpers_cpp`` extension that ships prebuilt in the megatron-core wheel, run exactly as
``BlendedDataset._build_indices`` runs it) for the same number of samples and the same weights:
its seconds, the ratio ours / megatron, its largest per-sample count error over all prefixes, and
what its per-sample weights do to token fractions with these sequence lengths.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time

import numpy as np

from megatron_vlm.data.blend import BlendSource, build_blend_index, draw_epochs
from megatron_vlm.logs import configure_logging

FRACTIONS = {"text": 0.8, "caption": 0.1, "instruction": 0.1}


def make_sources(seq_length: int, n_img: int = 729, seed: int = 0) -> list[BlendSource]:
    rng = np.random.default_rng(seed)
    caption_len = np.clip(np.rint(rng.lognormal(3.3, 0.5, 3_000_000)), 3, 200).astype(np.int32)
    caption = np.minimum(n_img + 2 + caption_len, seq_length).astype(np.uint16)
    has_image = rng.random(665_000) < 0.9
    conv_len = np.clip(np.rint(rng.lognormal(5.2, 0.6, 665_000)), 20, 4000).astype(np.int32)
    instruction = np.minimum(np.where(has_image, n_img, 0) + conv_len + 1,
                             seq_length).astype(np.uint16)
    return [BlendSource("text", 25_000_000, seq_length),
            BlendSource("caption", caption.shape[0], caption, image_positions=n_img),
            BlendSource("instruction", instruction.shape[0], instruction,
                        image_positions=np.where(has_image, n_img, 0).astype(np.uint16))]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def megatron_blend(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """megatron-core's blending index, built the way BlendedDataset builds it."""
    from megatron.core.datasets import helpers

    t0 = time.perf_counter()
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    helpers.build_blending_indices(dataset_index, dataset_sample_index,
                                   np.asarray(weights, dtype=np.float64), len(weights), size, False)
    return dataset_index, dataset_sample_index, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--total-tokens", type=float, default=28e9)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = p.parse_args(argv)
    configure_logging()
    L, B = args.seq_length, args.global_batch
    total = int(args.total_tokens)

    sources = make_sources(L)
    rss_inputs = rss_mib()
    names = [s.name for s in sources]
    ours, index = [], None
    for r in range(args.repeat):
        index = None
        t0 = time.perf_counter()
        index = build_blend_index(sources, FRACTIONS, total, L, B, seed=r)
        ours.append(time.perf_counter() - t0)
        print(f"ours: repeat {r}: {ours[-1]:.2f} s", file=sys.stderr)
    rss_ours = rss_mib()
    summary = index.summary()
    n = index.num_sequences
    del index
    # The part of our time spent shuffling each source's epochs (megatron's blending index
    # does no shuffling: GPTDataset shuffles separately).
    t0 = time.perf_counter()
    for s, info in zip(sources, summary["sources"]):
        draw_epochs(s.num_sequences, info["sequences"], 0, s.name)
    shuffle_seconds = time.perf_counter() - t0

    weights = [FRACTIONS[k] for k in names]
    theirs = []
    for r in range(args.repeat):
        dataset_index, dataset_sample_index, secs = megatron_blend(weights, n)
        theirs.append(secs)
        print(f"megatron-core: repeat {r}: {secs:.2f} s", file=sys.stderr)
    # Per-sample error of megatron's index over every prefix, and its token fractions.
    steps = np.arange(1, n + 1, dtype=np.float64)
    sample_err = 0.0
    tok_batch = np.zeros((n // B + 1, len(names)), dtype=np.int64)
    for c, s in enumerate(sources):
        mask = dataset_index == c
        count = np.cumsum(mask, dtype=np.int64)
        sample_err = max(sample_err, float(np.abs(count - weights[c] * steps).max()))
        tps = s.tokens_per_sequence
        tok = (mask * tps) if isinstance(tps, int) else np.where(
            mask, tps[dataset_sample_index % s.num_sequences], 0)
        tok_batch[1:, c] = np.cumsum(tok[:n // B * B].reshape(-1, B).sum(axis=1))
        del mask, count, tok
    seen = tok_batch.sum(axis=1)
    tok_err = np.abs(tok_batch - seen[:, None] * np.asarray(weights)[None, :]).max()
    meg_fractions = {k: float(tok_batch[-1, c] / seen[-1]) for c, k in enumerate(names)}

    result = {
        "machine": f"{platform.machine()} {platform.system()}, 2-core CPU, 24 GiB, no GPU",
        "date": time.strftime("%Y-%m-%d"),
        "total_tokens": total, "seq_length": L, "global_batch_size": B,
        "num_sequences": n, "num_batches": summary["num_batches"],
        "ours_seconds": [round(x, 3) for x in ours],
        "ours_median_seconds": round(statistics.median(ours), 3),
        "ours_cold_seconds": round(ours[0], 3),
        "ours_shuffle_seconds": round(shuffle_seconds, 3),
        "ours_peak_rss_mib": round(rss_ours, 1),
        "rss_after_inputs_mib": round(rss_inputs, 1),
        "ours_max_abs_error_sequences": summary["max_abs_error_sequences"],
        "ours_error_bound_sequences": summary["error_bound_sequences"],
        "ours_achieved_fractions": {s["name"]: s["achieved_fraction"] for s in summary["sources"]},
        "ours_epochs": {s["name"]: round(s["epochs"], 4) for s in summary["sources"]},
        "merge_tree": summary["merge_tree"],
        "megatron_seconds": [round(x, 3) for x in theirs],
        "megatron_median_seconds": round(statistics.median(theirs), 3),
        "ratio_ours_over_megatron": round(statistics.median(ours) / statistics.median(theirs), 2),
        "megatron_max_abs_sample_count_error": round(sample_err, 4),
        "megatron_token_fractions": meg_fractions,
        "megatron_max_abs_token_error_sequences": round(float(tok_err) / L, 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
